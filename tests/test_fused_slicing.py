"""Structured surgery on fused projections, proven on tiny random decoders against the unpruned model.

Phi-3 packs q/k/v into one `qkv_proj` ([q; k; v] rows) and gate/up into one `gate_up_proj`, GLM-4 fuses
gate/up, GPT-NeoX packs q/k/v interleaved per head; Llama and GPT-2 are the unfused references. Each cut
must compute exactly what the original computes with the removed units silenced (their columns of the
output projection zeroed), and the pruned model must reload with plain `from_pretrained`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import SAMPLE_TEXT, make_tiny_tokenizer

import search_spaces.structure.surgery as surgery
from evaluators.corpus import Document
from search_spaces.base import BuildContext
from search_spaces.layers import weight_out_in
from search_spaces.pruning import PruneSpec, apply
from search_spaces.structure.anatomy import (Projection, UnsupportedArchitecture, attention_parts,
                                             fused_layout_blocker, head_pruning_blocker, mlp_parts,
                                             mlp_pruning_blocker)
from search_spaces.structure.surgery import check_reloadable, drop_layers, prune_heads, prune_mlp

VOCAB = 96
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
KEEP_NEURONS = {0: list(range(0, 128, 2)), 1: list(range(64, 128))}  # half of 128, different per layer
KEEP_GROUPS = {0: [1], 1: [0]}  # one key/value group of two (query heads 2, 3 in layer 0; 0, 1 in layer 1)
# arch -> config fields beyond the common ones; "phi3+head_dim" is Phi-3 with head_dim stated in its config
ARCHS = {
    "phi3": dict(num_key_value_heads=2),
    "phi3+head_dim": dict(num_key_value_heads=2, head_dim=16),
    "glm4": dict(num_key_value_heads=2, head_dim=16),
    "gpt_neox": dict(),
    "llama": dict(num_key_value_heads=2, head_dim=16),
    "gpt2": dict(),
    "gpt_neox+head_dim": dict(head_dim=16),  # GPT-NeoX's interleaved q/k/v with a head width stated
}
CASES = [name for name in ARCHS if name != "gpt_neox+head_dim"]
HEADS_CUT = ["phi3", "phi3+head_dim", "glm4", "llama"]  # Phi-3 reads head_dim from its config once it is set
HEADS_REFUSED = {"gpt_neox": "derives the head width", "gpt2": "derives the head width"}
FUSED = {"phi3": ("gate_up_proj", 2), "glm4": ("gate_up_proj", 2)}  # the MLP input fused as [gate; up]


def tiny(name: str, vocab: int = VOCAB):
    """A 2-layer random model (hidden 64, 4 heads, MLP 128), weights drawn large enough that any misplaced
    row moves the logits far beyond float rounding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = name.split("+")[0]
    width = {"n_inner": 128} if arch == "gpt2" else {"intermediate_size": 128}
    config = AutoConfig.for_model(arch, vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=1, **width, **ARCHS[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.15)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def silence(projection: Projection, columns) -> None:
    """Zero the given input columns of an output projection, so those neurons / heads contribute nothing."""
    with torch.no_grad():
        weight_out_in(projection.module)[:, columns] = 0  # a view, also for Conv1D's (in, out) storage


def silenced_neurons(model):
    reference = copy.deepcopy(model)
    for layer, kept in KEEP_NEURONS.items():
        silence(mlp_parts(reference, layer).output, sorted(set(range(128)) - set(kept)))
    return reference


def silenced_heads(model):
    """Query heads of the dropped groups (2 heads per group, head_dim 16) silenced in the output projection."""
    reference = copy.deepcopy(model)
    for layer, groups in KEEP_GROUPS.items():
        dropped = [h for g in range(2) if g not in groups for h in (2 * g, 2 * g + 1)]
        silence(attention_parts(reference, layer).output, [h * 16 + d for h in dropped for d in range(16)])
    return reference


@pytest.mark.parametrize("name", CASES)
def test_removing_neurons_equals_silencing_them(name):
    model = tiny(name)
    reference = silenced_neurons(model)
    assert torch.linalg.vector_norm(logits(model) - logits(reference)) > 1e-2  # the silenced neurons mattered
    if name.split("+")[0] in FUSED:
        suffix, parts = FUSED[name.split("+")[0]]
        fused = [p for p in mlp_parts(model, 0).inputs if p.name.endswith(suffix)]
        assert [p.parts for p in fused] == [parts]
    prune_mlp(model, KEEP_NEURONS)
    assert all(mlp_parts(model, layer).width == 64 for layer in range(2))
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", HEADS_CUT)
def test_removing_kv_groups_equals_silencing_their_query_heads(name):
    model = tiny(name)
    reference = silenced_heads(model)
    prune_heads(model, KEEP_GROUPS)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    if name.startswith("phi3"):
        assert [p.out_features for p in attention_parts(model, 0).packed] == [2 * 16 + 2 * 16]
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, reason", list(HEADS_REFUSED.items()) + [
    # GPT-NeoX's attention ignores a stated head_dim (head_size = hidden / heads); its interleaved q/k/v is
    # refused by the layout probe as well (test_the_layout_probe_tells_contiguous_from_interleaved_q_k_v)
    ("gpt_neox+head_dim", "derives the head width"),
])
def test_heads_are_refused_where_they_cannot_be_sliced(name, reason):
    model = tiny(name)
    before = logits(model)
    assert reason in head_pruning_blocker(model)
    with pytest.raises(UnsupportedArchitecture) as caught:
        prune_heads(model, KEEP_GROUPS)
    assert caught.value.field == "heads_keep"
    assert torch.equal(logits(model), before)  # refused before any weight was touched


def test_the_layout_probe_tells_contiguous_from_interleaved_q_k_v():
    """GPT-2's c_attn and GPT-NeoX's query_key_value are both 64 -> 192; only GPT-2's is [q; k; v]."""
    gpt2, neox = tiny("gpt2"), tiny("gpt_neox")
    assert [len(attention_parts(m, 0).packed) for m in (gpt2, neox)] == [1, 1]
    assert fused_layout_blocker(gpt2, "attn") is None
    assert "query_key_value does not hold its parts as contiguous blocks" in fused_layout_blocker(neox, "attn")


def test_an_interleaved_gate_up_is_refused(monkeypatch):
    """The same weights read as [g0, u0, g1, u1, ...]: shapes alike, layout not, so the probe must refuse it."""
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    def interleaved(self, hidden_states):
        states = self.gate_up_proj(hidden_states)
        return self.down_proj(self.activation_fn(states[..., 0::2]) * states[..., 1::2])

    model = tiny("phi3")
    assert mlp_pruning_blocker(model) is None
    monkeypatch.setattr(Phi3MLP, "forward", interleaved)
    assert "gate_up_proj does not hold its parts as contiguous blocks" in mlp_pruning_blocker(model)
    with pytest.raises(UnsupportedArchitecture):
        prune_mlp(model, KEEP_NEURONS)


def test_a_wrong_row_expansion_is_caught(monkeypatch):
    """The proofs above are sharp: taking gate and up rows swapped, or k and v swapped, breaks equality."""
    model = tiny("phi3+head_dim")
    reference = silenced_neurons(model)
    monkeypatch.setattr(Projection, "rows", lambda self, neurons, width: torch.cat(
        [neurons + (self.parts - 1 - part) * width for part in range(self.parts)]))
    prune_mlp(model, KEEP_NEURONS)
    assert not torch.allclose(logits(model), logits(reference), atol=1e-3)

    model = tiny("phi3+head_dim")
    reference = silenced_heads(model)
    monkeypatch.setattr(surgery, "packed_rows", lambda q, kv, q_width, kv_width: torch.cat(
        [q, q_width + kv_width + kv, q_width + kv]))
    prune_heads(model, KEEP_GROUPS)
    assert not torch.allclose(logits(model), logits(reference), atol=1e-3)


def _skip_layer_zero(model):
    """A hook making decoder layer 0 hand its input through unchanged (what dropping it computes)."""
    def passthrough(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return surgery.decoder_layers(model)[1][0].register_forward_hook(passthrough, with_kwargs=True)


@pytest.mark.parametrize("name", CASES)
def test_dropping_a_layer_equals_skipping_it(name):
    model = tiny(name)
    reference = copy.deepcopy(model)
    _skip_layer_zero(reference)
    drop_layers(model, [1])
    assert model.config.num_hidden_layers == 1
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_pruned_model_reloads_with_identical_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(name)
    prune_mlp(model, KEEP_NEURONS)
    if name in HEADS_CUT:
        prune_heads(model, KEEP_GROUPS)
    drop_layers(model, [0])
    check_reloadable(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("name, heads_keep", [("phi3+head_dim", 0.5), ("glm4", 0.5), ("gpt_neox", 1.0)])
def test_pruning_apply_builds_a_candidate_that_reloads(name, heads_keep, tmp_path):
    """The technique end to end (importance on calibration text, every cut the model takes), then a plain
    `from_pretrained` of what it saved."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tiny_tokenizer()
    model = tiny(name, vocab=len(tokenizer))
    context = BuildContext(tokenizer=tokenizer, calibration=(Document("sonnet", SAMPLE_TEXT * 20),), progress=False)
    spec = PruneSpec(depth_keep=0.5, mlp_keep=0.5, heads_keep=heads_keep, calibration_samples=2,
                     calibration_seq_len=16)
    pruned = apply(model, spec, context)
    config = pruned.config
    assert (config.num_hidden_layers, config.intermediate_size) == (1, 64)
    assert config.num_attention_heads == (2 if heads_keep < 1 else 4)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(pruned), rtol=0, atol=1e-5)
