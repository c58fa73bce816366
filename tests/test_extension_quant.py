"""Extending quantization in one module each: the toy storage grid (symmetric 6-bit codes, one byte each, a scale
per block of 32: tests/toys/planner_toys/grid.py) and the toy rounding method (round to nearest after clipping
outliers: planner_toys/method.py), each one class and one register call, registered through their entry points.
They go through specs, the targets' fitted spaces, the plan, the build and the exact size with nothing else
changed."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama, methods_rounding_onto
from evaluators.memory import weight_bytes
from search_spaces.base import BuildContext
from search_spaces.quantization import (
    QUANT_METHODS, STORAGE_SCHEMES, QuantSpace, QuantSpec, apply, estimate_weight_bytes, fit_to_scheme,
    scheme_space_defaults,
)
from search_spaces.quantization.grid import decode, round_to_nearest
from search_spaces.quantization.modules import PACKED, StoredWeights
from search_spaces.quantization.pack import pack, stored_layout
from search_spaces.specs import SpecError
from targets import LLAMA_CPP, TRANSFORMERS, VLLM

CONTEXT = BuildContext(tokenizer=None, calibration=(), seed=0, progress=False)


def test_the_toy_scheme_stores_codes_that_decode_to_the_rounded_weights(toys):
    scheme = toys.grid.INT6
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
    fitted = {target.name: target.fit_spaces({"quantization": space}, model)["quantization"].methods
              for target in (VLLM, LLAMA_CPP, TRANSFORMERS)}
    assert "toy-clipped" in fitted["vllm"] and "toy-clipped" in fitted["transformers"]  # compressed-tensors
    assert "toy-clipped" not in fitted["llama.cpp"]  # gguf: not one of the toy's schemes
    assert all({"none", "rtn", "gptq"} <= set(methods) for methods in fitted.values())  # they round onto any grid
    # vLLM and llama.cpp keep exactly what rounds onto their grid, in the space's order, whatever else is
    # registered; transformers also stores a library's own layers, never llama.cpp's own types
    assert fitted["vllm"] == ("none", *methods_rounding_onto("compressed-tensors"))
    assert fitted["llama.cpp"] == ("none", *methods_rounding_onto("gguf"))
    compressed = STORAGE_SCHEMES["compressed-tensors"]
    assert fitted["transformers"] == tuple(m for m in space.methods
                                           if m == "none" or QUANT_METHODS[m].accepts(compressed))
    assert {"bnb", "dynamic-int8"} <= set(fitted["transformers"]) and "llama-quant" not in fitted["transformers"]
    toy = fit_to_scheme(QuantSpace.from_dict(scheme_space_defaults("toy-int6")), "toy-int6")
    assert toy.methods == ("none", *methods_rounding_onto("toy-int6"))
    assert {"rtn", "gptq", "toy-clipped"} <= set(toy.methods) and toy.grid == "toy-int6"
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
