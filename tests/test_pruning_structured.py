"""Structured pruning on tiny random Llama- and GPT-2-style models: exact sizes, functional equivalence, reload."""
from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama

from evaluators.memory import weight_bytes
from search_spaces.structure.importance import structural_importance
from search_spaces.layers import weight_out_in
from search_spaces.structure.anatomy import UnsupportedArchitecture, attention_parts, mlp_parts
from search_spaces.structure.shape import Structure, estimate_size, fit_choices, kept, structured_config
from search_spaces.structure.surgery import drop_layers, needed_scores, prune_heads, prune_mlp, restructure

# Tiny Llama (conftest): vocab 128, hidden 32, intermediate 64, 2 layers, 4 heads / 2 KV heads, head_dim 8,
# tied embeddings, no biases. Per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 = 3072; MLP 3 * 32*64 = 6144;
# two RMSNorms 2*32 = 64. Model: embedding 128*32 = 4096 + layers + final norm 32.
LLAMA_FULL = 4096 + 2 * (3072 + 6144 + 64) + 32  # 22688
LLAMA_CASES = [
    (Structure(mlp_keep=0.5), 4096 + 2 * (3072 + 3 * 32 * 32 + 64) + 32),  # 16544
    # one KV group of two: q 32*16, k 32*8, v 32*8, o 16*32 = 1536
    (Structure(heads_keep=0.5), 4096 + 2 * (1536 + 6144 + 64) + 32),  # 19616
    (Structure(depth_keep=0.5), 4096 + 1 * (3072 + 6144 + 64) + 32),  # 13408
    (Structure(0.5, 0.5, 0.5), 4096 + 1 * (1536 + 3072 + 64) + 32),  # 8800
]
# Tiny GPT-2: vocab 128, n_embd 32, 2 layers, 4 heads, n_positions 256, n_inner None = 4 * 32 = 128, biases.
# Per block: ln_1 64 + c_attn 32*96+96 + attn c_proj 32*32+32 + ln_2 64 + c_fc 32*128+128 + c_proj 128*32+32
# = 12704. Model: wte 128*32 + wpe 256*32 + blocks + ln_f 64 (LM head tied).
GPT2_FULL = 4096 + 8192 + 2 * 12704 + 64  # 37760
GPT2_HALF_MLP_BLOCK = 64 + 3168 + 1056 + 64 + (32 * 64 + 64) + (64 * 32 + 32)  # 8544
GPT2_CASES = [
    (Structure(mlp_keep=0.5), 4096 + 8192 + 2 * GPT2_HALF_MLP_BLOCK + 64),  # 29440
    (Structure(depth_keep=0.5), 4096 + 8192 + 12704 + 64),  # 25056
    (Structure(depth_keep=0.5, mlp_keep=0.5), 4096 + 8192 + GPT2_HALF_MLP_BLOCK + 64),  # 20896
]
CALIBRATION = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def llama(**overrides):
    """A tiny Llama like conftest's, with any config field overridable (conftest's fixes the head counts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).eval()


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def pruned(model, structure: Structure):
    scores = structural_importance(model, CALIBRATION, **needed_scores(model, structure))
    restructure(model, structure, scores)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_sizes_match_the_hand_counts():
    assert parameters(make_tiny_llama()) == LLAMA_FULL == 22688
    assert parameters(make_tiny_gpt2()) == GPT2_FULL == 37760


@pytest.mark.parametrize("make, structure, expected", [(make_tiny_llama, s, n) for s, n in LLAMA_CASES]
                         + [(make_tiny_gpt2, s, n) for s, n in GPT2_CASES])
def test_structured_pruning_gives_exact_parameter_counts_and_estimates(make, structure, expected):
    model = make()
    estimate = estimate_size(structured_config(model.config, structure), model)
    pruned(model, structure)
    assert parameters(model) == expected
    assert estimate.parameters == expected
    assert estimate.weight_bytes == weight_bytes(model).total_bytes == expected * 4


def test_estimate_follows_the_model_dtype():
    model = make_tiny_llama().to(torch.float16)
    structure = Structure(0.5, 0.5, 0.5)
    estimate = estimate_size(structured_config(model.config, structure), model)
    pruned(model, structure)
    assert estimate.weight_bytes == weight_bytes(model).total_bytes == 8800 * 2


@pytest.mark.parametrize("make, structure", [(make_tiny_llama, Structure(0.5, 0.5, 0.5)),
                                             (make_tiny_gpt2, Structure(depth_keep=0.5, mlp_keep=0.5))])
def test_pruned_model_reloads_with_identical_logits(make, structure, tmp_path):
    model = pruned(make(), structure)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(logits(model, ids), logits(reloaded, ids))
    # And decoding through the KV cache works on the renumbered layers.
    out = reloaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def _zero_columns(projection, columns):
    """Zero the given input columns of a projection (so those inputs contribute nothing)."""
    with torch.no_grad():
        weight_out_in(projection.module)[:, columns] = 0  # a view, also for Conv1D's (in, out) storage


def test_removing_neurons_equals_silencing_them():
    """Cutting MLP neurons must compute exactly what the full model computes with their output columns zeroed."""
    for make in (make_tiny_llama, make_tiny_gpt2):
        reference, model = make(), make()
        width = mlp_parts(model, 0).width
        keep = {0: list(range(0, width, 2)), 1: list(range(1, width, 2))}
        for layer, kept_neurons in keep.items():
            dropped = sorted(set(range(width)) - set(kept_neurons))
            _zero_columns(mlp_parts(reference, layer).output, dropped)
        prune_mlp(model, keep)
        ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_removing_kv_groups_equals_silencing_their_query_heads():
    """With 8 query heads on 4 KV heads (2 per group), keeping groups {1, 3} keeps query heads {2, 3, 6, 7}."""
    reference = llama(num_attention_heads=8, num_key_value_heads=4)
    model = llama(num_attention_heads=8, num_key_value_heads=4)
    head_dim = 4
    for layer in range(2):
        dropped_heads = [0, 1, 4, 5]
        columns = [h * head_dim + d for h in dropped_heads for d in range(head_dim)]
        _zero_columns(attention_parts(reference, layer).output, columns)
    prune_heads(model, {0: [1, 3], 1: [3, 1]})
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_gqa_head_pruning_keeps_the_group_ratio(tmp_path):
    model = llama(num_attention_heads=8, num_key_value_heads=4)
    pruned(model, Structure(heads_keep=0.5))
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 4)
    assert config.num_attention_heads % config.num_key_value_heads == 0
    for layer in range(2):
        parts = attention_parts(model, layer)
        assert parts.owner.num_key_value_groups == 2
        assert [p.out_features for p in parts.queries] == [16]
        assert [p.out_features for p in parts.key_values] == [8, 8]
    model.save_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path).config.num_key_value_heads == 2


def test_head_keep_ratios_round_to_whole_kv_groups():
    config = llama(num_attention_heads=6, num_key_value_heads=3, hidden_size=48).config
    for ratio, groups in ((1.0, 3), (0.67, 2), (0.5, 2), (0.3, 1), (0.01, 1)):
        new = structured_config(config, Structure(heads_keep=ratio))
        assert (new.num_key_value_heads, new.num_attention_heads) == (groups, 2 * groups)
    assert kept(30, 26 / 30) == 26 and kept(1536, 0.75) == 1152


def test_fitted_choices_drop_counts_the_config_rejects():
    # hidden 20 with 10 heads of 2 on 5 KV heads: Llama's config wants the head count to divide hidden,
    # so 8 and 6 heads are refused, 4 are fine.
    model = llama(hidden_size=20, num_attention_heads=10, num_key_value_heads=5, head_dim=2)
    assert fit_choices(model, "heads_keep", (1.0, 0.8, 0.6, 0.4, 0.45)) == (1.0, 0.4)
    assert fit_choices(model, "depth_keep", (1.0, 0.9, 0.5, 0.4)) == (1.0, 0.5)


def test_gpt2_heads_cannot_be_pruned_and_the_space_says_so():
    model = make_tiny_gpt2()
    assert fit_choices(model, "heads_keep", (1.0, 0.5)) == (1.0,)
    with pytest.raises(UnsupportedArchitecture) as caught:
        restructure(model, Structure(heads_keep=0.5), None)
    assert caught.value.field == "heads_keep"
    assert parameters(model) == GPT2_FULL  # refused before any surgery


def test_dropped_layers_are_renumbered_for_the_kv_cache():
    model = llama(num_hidden_layers=4)
    drop_layers(model, [3, 1])
    indices = [block.self_attn.layer_idx for block in model.model.layers]
    assert indices == [0, 1] and model.config.num_hidden_layers == 2


def test_surgery_refuses_uneven_or_bad_indices():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="same number"):
        prune_mlp(model, {0: [0, 1], 1: [0]})
    with pytest.raises(ValueError, match="distinct"):
        prune_mlp(model, {0: [0, 0], 1: [0, 1]})
    with pytest.raises(ValueError, match="every layer"):
        prune_heads(model, {0: [0]})
    assert parameters(model) == LLAMA_FULL
