"""Structured pruning on every causal-LM decoder of the installed transformers that builds from a tiny config.

Each architecture is built at random from a tiny config (2 layers, hidden 64, 4 heads, 2 key/value heads where
the config has such a field, MLP width 128 under whatever name the config gives it). The pruning technique fits
the default cuts to it: every ratio it leaves out must come with a reason (`fit_reasons`), and dropping half the
layers must stay in for every architecture. Every cut left in is then applied through
`search_spaces.pruning.apply` (each alone, then all together): it must build, give finite logits, be sized
exactly as the technique estimated, and reload with plain `from_pretrained` to the very same logits.
`LEFT_OUT` pins the cuts that are genuinely impossible and why. (The vocabulary is the tiny test tokenizer's,
about 300 entries, so calibration text can be tokenized.)
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_gpt2, make_tiny_tokenizer

from evaluators.corpus import Document
from search_spaces.base import TECHNIQUES, BuildContext
from search_spaces.pruning import PruneSpace, PruneSpec, apply
from search_spaces.specs import SpecError
from search_spaces.structure.shape import PER_LAYER_FIELDS, RATIO_FIELDS
from search_spaces.structure.surgery import drop_layers

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "stablelm", "phi",
         "phi3", "glm", "glm4", "gpt_neox", "gpt2", "gptj", "opt", "bloom", "falcon", "mpt", "starcoder2", "cohere",
         "granite", "smollm3", "codegen", "gpt_bigcode", "persimmon", "exaone4"]
SPACE = PruneSpace(mlp_keep=(1.0, 0.5), heads_keep=(1.0, 0.5), depth_keep=(1.0, 0.5), heal=(False,))
# The first of each tuple the config has (through its attribute_map: GPT-2's n_embd answers to hidden_size).
SIZES = {("hidden_size",): 64, ("num_hidden_layers",): 2, ("num_attention_heads",): 4,
         ("num_key_value_heads", "num_kv_heads"): 2,
         ("max_position_embeddings", "max_seq_len"): 128,  # MPT's is max_seq_len; Bloom (ALiBi) has none
         ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"): 128,  # Bloom's, MPT's: 4 x hidden, fixed
         ("rotary_dim",): 8,  # GPT-J's, CodeGen's rotary width (64 by default) must fit in a head of 16
         ("sliding_window",): 4}  # shorter than IDS, so sliding layers compute something else than full ones
# Per-layer settings made to differ between the two layers, so dropping one must slice the config's lists.
PER_LAYER = {"gemma3_text": {"sliding_window_pattern": 2}, "exaone4": {"sliding_window_pattern": 2},
             "smollm3": {"no_rope_layer_interval": 2}}
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
# The cuts that are genuinely impossible, per architecture, with what fitting must say; every other
# architecture keeps the cut. Depth: none at the defaults (GPT-2 with scale_attn_by_inverse_layer_idx=True
# is one, since dropping a layer rescales every later one: see the last test).
DERIVED = "derives the head width"  # the attention computes head width = hidden / heads, ignoring head_dim
LEFT_OUT = {
    "depth_keep": {},
    "mlp_keep": {"bloom": "names no MLP width", "mpt": "names no MLP width"},  # 4 x hidden, fixed in code
    "heads_keep": {
        **dict.fromkeys(["stablelm", "gpt_neox", "gpt2", "gptj", "opt", "bloom", "mpt", "codegen", "persimmon"],
                        DERIVED),
        "olmo2": "k_norm",  # its q/k norms span all heads at once: a narrower norm the surgery does not make
        "falcon": "1 key/value group", "gpt_bigcode": "1 key/value group",  # multi-query: one group, kept
    },
}
CALIBRATION = (Document("sonnet", SAMPLE_TEXT * 20),)
IDS = torch.randint(2, 96, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def tiny(arch: str, vocab: int):
    import transformers
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

    if arch not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {arch} architecture")
    if CONFIG_MAPPING[arch] not in MODEL_FOR_CAUSAL_LM_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no causal LM for {arch}")
    defaults = CONFIG_MAPPING[arch]()
    fields = {"vocab_size": vocab, **{k: v for k, v in SPECIAL_TOKENS.items() if hasattr(defaults, k)}}
    for names, value in SIZES.items():
        name = next((n for n in names if hasattr(defaults, n)), None)
        if name is not None:
            fields[name] = value
    if getattr(defaults, "multi_query", False):  # Falcon, GPT-BigCode: one key/value head, whatever the field says
        fields.pop("num_key_value_heads", None)
        fields.pop("num_kv_heads", None)
    config = AutoConfig.for_model(arch, **fields, **PER_LAYER.get(arch, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def cuts(fitted: PruneSpace) -> list[dict[str, float]]:
    """Each reducing ratio of the fitted space alone, then all of them at their least together."""
    singles = [{name: ratio} for name in RATIO_FIELDS for ratio in getattr(fitted, name) if ratio != 1.0]
    together = {name: min(getattr(fitted, name)) for name in RATIO_FIELDS if min(getattr(fitted, name)) < 1.0}
    return singles + ([together] if len(together) > 1 else [])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_cut_left_in_builds_and_reloads(arch, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(arch, len(tokenizer))
    technique = TECHNIQUES["pruning"]
    fitted = technique.fit_space(SPACE, model)
    reasons = technique.fit_reasons(SPACE, model)
    for name in RATIO_FIELDS:
        left_out = set(getattr(SPACE, name)) - set(getattr(fitted, name))
        assert not left_out or reasons.get(name), f"{arch}: {name} {sorted(left_out)} left out without a reason"
        if arch in LEFT_OUT[name]:
            assert getattr(fitted, name) == (1.0,) and LEFT_OUT[name][arch] in reasons[name], (arch, reasons)
        else:
            assert 0.5 in getattr(fitted, name), f"{arch}: {name} 0.5 left out: {reasons.get(name)}"

    context = BuildContext(tokenizer=tokenizer, calibration=CALIBRATION, progress=False)
    for index, ratios in enumerate(cuts(fitted)):
        spec = PruneSpec(**ratios, calibration_samples=2, calibration_seq_len=16)
        estimate = technique.estimate(model, spec)
        pruned = apply(copy.deepcopy(model), spec, context).eval()
        what = f"{arch} {spec.summary()}"
        assert sum(p.numel() for p in pruned.parameters()) == estimate.parameters, what
        before = logits(pruned)
        assert torch.isfinite(before).all(), what
        folder = tmp_path / str(index)
        pruned.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        assert torch.equal(logits(reloaded), before), what


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "exaone4", "smollm3"])
def test_dropping_a_layer_slices_the_per_layer_settings(arch, tokenizer, tmp_path):
    """The first layer dropped: the second keeps its own settings (sliding window, rotary positions or not) in
    the saved config, so the reloaded model computes what the cut one does."""
    from transformers import AutoModelForCausalLM

    model = tiny(arch, len(tokenizer))
    lists = {name: list(getattr(model.config, name)) for name in PER_LAYER_FIELDS
             if isinstance(getattr(model.config, name, None), (list, tuple))}
    assert any(values[0] != values[1] for values in lists.values()), lists  # the two layers differ
    drop_layers(model, [1])
    assert {name: list(getattr(model.config, name)) for name in lists} == {n: v[1:] for n, v in lists.items()}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(reloaded), logits(model))


def test_depth_is_left_out_where_the_attention_scale_depends_on_the_layer_index(tokenizer):
    """GPT-2's scale_attn_by_inverse_layer_idx scales layer i's attention by 1 / (i + 1): dropping a layer would
    renumber, and so rescale, every later one. Fitting says so up front, and `apply` refuses before cutting."""
    model = make_tiny_gpt2(vocab_size=len(tokenizer), scale_attn_by_inverse_layer_idx=True)
    technique = TECHNIQUES["pruning"]
    assert technique.fit_space(SPACE, model).depth_keep == (1.0,)
    assert "1 / layer index" in technique.fit_reasons(SPACE, model)["depth_keep"]
    context = BuildContext(tokenizer=tokenizer, calibration=CALIBRATION, progress=False)
    with pytest.raises(SpecError, match=r"^PruneSpec\.depth_keep: attention is scaled by 1 / layer index"):
        apply(model, PruneSpec(depth_keep=0.5, calibration_samples=2, calibration_seq_len=16), context)
    assert model.config.n_layer == 2
