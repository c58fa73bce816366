from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

from conftest import SAMPLE_TEXT, make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer
from evaluators.corpus import Document
from search_spaces.specs import DictSpec, SpecError
from search_spaces.calibration import calibration_batches
from search_spaces.layers import decoder_layers, head_is_tied, linear_sites, weight_out_in


@dataclass(frozen=True)
class Inner(DictSpec):
    ratio: float = 0.5


@dataclass(frozen=True)
class Example(DictSpec):
    method: Literal["rtn", "gptq"]
    bits: dict[str, int] = field(default_factory=lambda: {"attn": 8})
    layers: tuple[int, ...] = ()
    group_size: int | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.group_size is not None and self.group_size < 1:
            raise SpecError(f"group_size: must be positive, got {self.group_size}")


def test_spec_round_trips_through_plain_types():
    spec = Example("gptq", {"attn": 4, "mlp": 3}, (1, 2), 128, Inner(0.25))
    data = spec.to_dict()
    assert data == {"method": "gptq", "bits": {"attn": 4, "mlp": 3}, "layers": [1, 2], "group_size": 128,
                    "inner": {"ratio": 0.25}}
    assert Example.from_dict(data) == spec
    assert Example.from_dict({"method": "rtn", "inner": {"ratio": 1}}).inner.ratio == 1.0


@pytest.mark.parametrize("data, message", [
    ([1, 2], "Example: expected a mapping"),
    ({"method": "rtn", "colour": "red"}, "Example.colour: unknown field"),
    ({"bits": {"attn": 4}}, "Example.method: missing field"),
    ({"method": "awq"}, "Example.method: expected one of 'rtn', 'gptq'"),
    ({"method": "rtn", "bits": {"attn": "four"}}, "Example.bits.attn: expected int"),
    ({"method": "rtn", "bits": {"attn": True}}, "Example.bits.attn: expected int"),
    ({"method": "rtn", "layers": "1,2"}, "Example.layers: expected a list"),
    ({"method": "rtn", "layers": [1, "x"]}, r"Example.layers\[1\]: expected int"),
    ({"method": "rtn", "group_size": 0}, "group_size: must be positive"),
    ({"method": "rtn", "inner": {"ratio": "half"}}, "Example.inner.ratio: expected float"),
])
def test_bad_spec_dicts_name_the_first_bad_field(data, message):
    with pytest.raises(SpecError, match=message):
        Example.from_dict(data)


def test_decoder_layers_and_linear_groups_by_type_and_config():
    llama, gpt2 = make_tiny_llama(), make_tiny_gpt2()
    assert decoder_layers(llama)[0] == "model.layers" and decoder_layers(gpt2)[0] == "transformer.h"
    groups = {(s.group, s.layer) for s in linear_sites(llama)}
    assert groups == {("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1), ("head", None)}
    by_name = {s.name: s.group for s in linear_sites(gpt2)}
    assert by_name["transformer.h.0.attn.c_attn"] == "attn" and by_name["transformer.h.1.mlp.c_proj"] == "mlp"
    assert len([s for s in linear_sites(llama) if s.group == "attn"]) == 2 * 4
    assert head_is_tied(llama) and head_is_tied(gpt2)


def test_opt_style_block_without_an_mlp_container():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=4, word_embed_proj_dim=32))
    groups = {s.name.split(".")[-1]: s.group for s in linear_sites(model, include_head=False)}
    assert groups == {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "out_proj": "attn", "fc1": "mlp", "fc2": "mlp"}


def test_conv1d_weight_is_seen_as_out_by_in():
    gpt2 = make_tiny_gpt2()
    c_attn = gpt2.transformer.h[0].attn.c_attn
    assert tuple(c_attn.weight.shape) == (32, 96) and tuple(weight_out_in(c_attn).shape) == (96, 32)


def test_calibration_batches_are_deterministic_windows_of_the_training_text():
    tokenizer = make_tiny_tokenizer()
    docs = [Document(f"d{i}", SAMPLE_TEXT * (i + 2)) for i in range(3)]
    first = calibration_batches(tokenizer, docs, num_samples=4, seq_len=16, seed=3)
    assert first.shape == (4, 16) and first.dtype == torch.long
    assert torch.equal(first, calibration_batches(tokenizer, docs, 4, 16, seed=3))
    assert not torch.equal(first, calibration_batches(tokenizer, docs, 4, 16, seed=4))
    stream = tokenizer(SAMPLE_TEXT * 8, add_special_tokens=False)["input_ids"]
    text = " ".join(map(str, stream))
    assert " ".join(map(str, first[0].tolist())) in text  # a real window of the text, not noise


def test_calibration_refuses_empty_or_short_text():
    tokenizer = make_tiny_tokenizer()
    with pytest.raises(ValueError, match="training split is empty"):
        calibration_batches(tokenizer, [Document("e", "  ")], 1, 8)
    with pytest.raises(ValueError, match="fewer than one 64-token sample"):
        calibration_batches(tokenizer, [Document("s", "Shall I")], 1, 64)
