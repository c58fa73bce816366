"""Extending quantization in one module each: a toy storage scheme (symmetric 6-bit codes, one byte each, a scale
per block of 32) and a toy rounding method (round to nearest after clipping outliers), each one class and one
register line, registered for these tests only. They go through specs, the targets' fitted spaces, the plan,
the build and the exact size with nothing else changed."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from evaluators.memory import weight_bytes
from search_spaces.base import BuildContext
from search_spaces.quantization import (
    QUANT_METHODS, STORAGE_SCHEMES, QuantSpace, QuantSpec, StorageScheme, apply, estimate_weight_bytes, fit_to_scheme,
    register_scheme, scheme_space_defaults,
)
from search_spaces.quantization.grid import decode, round_to_nearest
from search_spaces.quantization.methods import register_method
from search_spaces.quantization.methods.weight_only import GridMethod
from search_spaces.quantization.modules import PACKED, StoredWeights
from search_spaces.quantization.pack import pack, stored_layout
from search_spaces.specs import SpecError
from targets import LLAMA_CPP, TRANSFORMERS, VLLM

CONTEXT = BuildContext(tokenizer=None, calibration=(), seed=0, progress=False)


class Int6Blocks(StorageScheme):
    """Symmetric 6-bit codes stored one int8 each, one scale per block of 32 in the model's float dtype."""

    name, bits, group_sizes, symmetric = "toy-int6", (6,), (32,), (True,)

    def layout(self, out_features, in_features, fmt, dtype):
        return {"codes": ((out_features, in_features), torch.int8),
                "scales": ((out_features, in_features // 32), dtype)}

    def pack(self, quantized):
        return {"codes": quantized.codes.contiguous(), "scales": quantized.scale.contiguous()}


class ClippedRTN(GridMethod):
    """Round to nearest after clipping each row to 2.5 standard deviations: a finer grid for most weights."""

    name = "toy-clipped"
    schemes = ("toy-int6", "compressed-tensors")  # not gguf

    def round_layer(self, weight, fmt, scale_dtype):
        limit = 2.5 * weight.float().std(dim=1, keepdim=True)
        return round_to_nearest(weight.float().clamp(-limit, limit), fmt, scale_dtype)


@pytest.fixture
def toys():
    scheme, method = register_scheme(Int6Blocks()), register_method(ClippedRTN())
    yield scheme, method
    STORAGE_SCHEMES.pop(scheme.name)
    QUANT_METHODS.pop(method.name)


def test_the_toy_scheme_stores_codes_that_decode_to_the_rounded_weights(toys):
    scheme, _ = toys
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    fmt = scheme.layer_grid(6, 64, 32, True)
    assert (fmt.bits, fmt.group_size, fmt.symmetric, fmt.scheme) == (6, 32, True, "toy-int6")
    assert scheme.layer_grid(6, 48, 32, True).is_float  # no whole blocks: stored in float
    quantized = round_to_nearest(weight, fmt, torch.float32)
    assert quantized.codes.min() >= -32 and quantized.codes.max() <= 31
    stored = pack(quantized)
    assert {k: (tuple(t.shape), t.dtype) for k, t in stored.items()} == stored_layout(8, 64, fmt, torch.float32)
    decoded = decode(stored["codes"].reshape(8, 2, 32), stored["scales"].unsqueeze(-1), None, fmt).reshape(8, 64)
    assert torch.equal(decoded, quantized.dequantize())
    step = quantized.scale.repeat_interleave(32, dim=1)
    assert ((weight - decoded).abs() <= step / 2 + 1e-6).all()


def test_specs_on_the_toy_scheme_are_checked_against_it(toys):
    spec = QuantSpec(method="toy-clipped", bits={"attn": 6, "mlp": 16, "head": 6}, group_size=32, grid="toy-int6")
    assert spec.summary() == "quant(toy-clipped 6/16/h6 g32)"
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    for bad, field in [({"bits": {"attn": 4, "mlp": 6}}, "QuantSpec.bits.attn"),
                       ({"group_size": 64}, "QuantSpec.group_size"), ({"symmetric": False}, "QuantSpec.symmetric"),
                       ({"grid": "gguf"}, "QuantSpec.grid")]:  # the toy method does not round onto gguf
        with pytest.raises(SpecError, match=field):
            QuantSpec.from_dict({**spec.to_dict(), **bad})
    with pytest.raises(SpecError, match="QuantSpec.grid"):  # a library method stores its own layers
        QuantSpec(method="dynamic-int8", bits={"attn": 8, "mlp": 8}, grid="toy-int6")


def test_targets_offer_the_toy_method_only_on_a_scheme_it_rounds_onto(toys):
    model = make_tiny_llama()
    space = QuantSpace()
    assert "toy-clipped" in space.methods  # registered methods are searched by default
    assert VLLM.fit_spaces({"quantization": space}, model)["quantization"].methods == (
        "none", "rtn", "gptq", "toy-clipped")  # compressed-tensors: the toy rounds onto it
    assert LLAMA_CPP.fit_spaces({"quantization": space}, model)["quantization"].methods == (
        "none", "rtn", "gptq", "llama-quant")  # gguf: and llama.cpp's own quantizer, not the toy
    # every method whose layers a transformers checkpoint holds (the toy too), not llama.cpp's own types
    assert TRANSFORMERS.fit_spaces({"quantization": space}, model)["quantization"].methods == tuple(
        m for m in space.methods if m != "llama-quant")
    toy = fit_to_scheme(QuantSpace.from_dict(scheme_space_defaults("toy-int6")), "toy-int6")
    assert toy.methods == ("none", "rtn", "gptq", "toy-clipped") and toy.grid == "toy-int6"
    assert (toy.bits, toy.group_sizes, toy.symmetric) == ((6, 16), (32,), (True,))
    assert toy.head_bits == (None, 16)


@pytest.mark.parametrize("method", ["rtn", "toy-clipped"])
def test_a_candidate_on_the_toy_scheme_has_its_predicted_bytes(toys, method):
    # Tiny Llama (hidden 32, MLP 64, 2 layers, tied vocab 128): 9216 weights per layer at 1 byte + a float32 scale
    # per 32, float32 norms; the 6-bit head unties: its own 128x32 copy, the embedding stays float16.
    layer = 9216 * 9 // 8 + 2 * 32 * 4
    expected = 2 * layer + 4096 * 9 // 8 + 128 * 32 * 2 + 32 * 4
    spec = QuantSpec(method=method, bits={"attn": 6, "mlp": 6, "head": 6}, group_size=32, grid="toy-int6")
    model = make_tiny_llama()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    assert estimate_weight_bytes(model, spec) == expected
    apply(model, spec, CONTEXT)
    assert weight_bytes(model).total_bytes == expected
    packed = {n: m for n, m in model.named_modules() if isinstance(m, StoredWeights) and m.stored_kind == PACKED}
    assert len(packed) == 2 * 7 + 1
    for name, module in packed.items():
        stored = module.stored_tensors()
        out, width = stored["codes"].shape
        codes = stored["codes"].reshape(out, width // 32, 32)
        decoded = decode(codes, stored["scales"].unsqueeze(-1), None, module.stored_format).reshape(out, width)
        assert torch.equal(decoded, module.weight), name  # evaluated with exactly what is stored
        nearest = round_to_nearest(original[name], module.stored_format, torch.float32).dequantize()
        assert torch.equal(decoded, nearest) == (method == "rtn"), name  # the toy rounds by its own rule
