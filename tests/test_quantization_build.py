"""Building quantization candidates on tiny random Llama and GPT-2 models: memory, accuracy, export."""
import json
import warnings

import pytest
import torch
from safetensors import safe_open

from conftest import SAMPLE_TEXT, make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer
from evaluators.corpus import Document
from evaluators.memory import weight_bytes
from search_spaces.base import BuildContext
from search_spaces.quantization.gptq_solver import gptq_round
from search_spaces.layers import weight_out_in
from search_spaces.quantization.grid import GGUF_GRID, StorageGrid, round_to_nearest
from search_spaces.quantization.modules import PACKED, StoredWeights
from search_spaces.quantization import (
    ExportError, LayerOverride, QuantSpec, apply, estimate_weight_bytes, export, export_blocker,
)

CONTEXT = BuildContext(tokenizer=None, calibration=(), seed=0, progress=False)


def make_wide_llama():
    """A tiny Llama 64 wide: bitsandbytes' CPU 4-bit path needs inputs in multiples of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=True)).eval()


ARCHITECTURES = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2, "wide-llama": make_wide_llama}


def _packed_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, StoredWeights) and m.stored_kind == PACKED}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 99, 3, 42, 64, 7, 120, 11, 2, 80, 33]])


# ---------------------------------------------------------------------------------------------------
# Memory: hand computations, and the estimate against the measurement for every method
# ---------------------------------------------------------------------------------------------------


def test_weight_bytes_of_a_known_mix_on_tiny_llama():
    # Tiny Llama: hidden 32, MLP 64, 2 layers, 4 heads / 2 KV heads (q, o: 32x32; k, v: 16x32), vocab 128, tied.
    # attn 4-bit and mlp 8-bit, symmetric, groups of 32; head 16: the tied 128x32 matrix once, in float16.
    # Per layer: packed int32 words (out x ceil(in*bits/32)) + fp32 scales (out x groups) + 16-byte weight_shape.
    q = o = 32 * 4 * 4 + 32 * 1 * 4 + 16
    k = v = 16 * 4 * 4 + 16 * 1 * 4 + 16
    gate = up = 64 * 8 * 4 + 64 * 1 * 4 + 16
    down = 32 * 16 * 4 + 32 * 2 * 4 + 16  # in 64: two groups of 32
    norms = 2 * 32 * 4
    layer = q + k + v + o + gate + up + down + norms
    expected = 2 * layer + 128 * 32 * 2 + 32 * 4  # + float16 embedding/head + final norm
    assert expected == 26720
    model = make_tiny_llama()
    spec = QuantSpec(method="rtn", bits={"attn": 4, "mlp": 8, "head": 16}, group_size=32)
    assert estimate_weight_bytes(model, spec) == expected
    apply(model, spec, CONTEXT)
    assert weight_bytes(model).total_bytes == expected


def test_weight_bytes_of_a_known_mix_on_tiny_gpt2():
    # Tiny GPT-2: width 32, 2 blocks, Conv1D layers with biases, vocab 128 (tied), 256 positions.
    # attn 8-bit, mlp 3-bit, asymmetric, per channel: zero points packed like the codes, along the output dim.
    c_attn = 96 * 8 * 4 + 96 * 4 + 24 * 1 * 4 + 16 + 96 * 4  # packed, scales, zero points, shape, bias
    attn_proj = 32 * 8 * 4 + 32 * 4 + 8 * 1 * 4 + 16 + 32 * 4
    c_fc = 128 * 3 * 4 + 128 * 4 + 12 * 1 * 4 + 16 + 128 * 4  # in 32 at 3 bits: 3 words per row
    mlp_proj = 32 * 12 * 4 + 32 * 4 + 3 * 1 * 4 + 16 + 32 * 4  # in 128 at 3 bits: 12 words per row
    norms = 2 * 2 * 32 * 4
    block = c_attn + attn_proj + c_fc + mlp_proj + norms
    expected = 2 * block + 128 * 32 * 4 + 256 * 32 * 4 + 2 * 32 * 4  # + wte (tied head), wpe, ln_f in fp32
    assert expected == 69880
    model = make_tiny_gpt2()
    spec = QuantSpec(method="rtn", bits={"attn": 8, "mlp": 3}, group_size=None, symmetric=False)
    assert estimate_weight_bytes(model, spec) == expected
    apply(model, spec, CONTEXT)
    assert weight_bytes(model).total_bytes == expected


SPECS = {
    "rtn-mixed": QuantSpec(method="rtn", bits={"attn": 2, "mlp": 8, "head": 4}, group_size=32,
                           overrides=(LayerOverride("*.0.*", 16),)),
    "rtn-asym": QuantSpec(method="rtn", bits={"attn": 3, "mlp": 4, "head": 16}, group_size=None, symmetric=False),
    "bnb-int8": QuantSpec(method="bnb", bits={"attn": 8, "mlp": 8}),
    "bnb-nf4": QuantSpec(method="bnb", bits={"attn": 4, "mlp": 4}),
    "bnb-fp4-mlp": QuantSpec(method="bnb", bits={"attn": 16, "mlp": 4}, bnb_4bit_type="fp4"),
    "dynamic-int8": QuantSpec(method="dynamic-int8", bits={"attn": 8, "mlp": 8}),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", SPECS)
def test_estimate_equals_the_measured_weight_bytes(arch, name):
    spec = SPECS[name]
    if arch == "gpt2" and spec.overrides:
        spec = QuantSpec.from_dict({**spec.to_dict(), "overrides": [{"pattern": "transformer.h.0.*", "bits": 16}]})
    model = ARCHITECTURES[arch]()
    original = weight_bytes(model).total_bytes
    estimate = estimate_weight_bytes(model, spec)
    built = apply(model, spec, CONTEXT)
    assert weight_bytes(built).total_bytes == estimate
    assert estimate < original
    changed = _logits(built, IDS) - _logits(ARCHITECTURES[arch](), IDS)
    assert torch.isfinite(changed).all() and changed.abs().max() > 0


def test_bnb_quantizes_what_its_cpu_kernel_can_run():
    import bitsandbytes as bnb

    spec = SPECS["bnb-nf4"]
    wide = apply(make_wide_llama(), spec, CONTEXT)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in wide.modules()) == 14
    narrow = apply(make_tiny_llama(), spec, CONTEXT)  # 32-wide inputs: only down_proj (64 in, 32 out) fits
    names = {n for n, m in narrow.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert names == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    before = _logits(wide, IDS)
    wide.state_dict()  # measuring memory must not change the candidate (see quantization/methods/bnb.py)
    assert torch.equal(_logits(wide, IDS), before)


# ---------------------------------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("group_size, symmetric", [(32, True), (None, True), (32, False)])
def test_8bit_rtn_is_within_half_a_step_of_the_original(arch, group_size, symmetric):
    from transformers.pytorch_utils import Conv1D

    original = ARCHITECTURES[arch]()
    model = ARCHITECTURES[arch]()
    bits = {"attn": 8, "mlp": 8}
    apply(model, QuantSpec(method="rtn", bits=bits, group_size=group_size, symmetric=symmetric), CONTEXT)
    packed = _packed_modules(model)
    # Every linear layer of the groups quantized, found by type and place in the original (Llama's
    # self_attn/mlp, GPT-2's attn/mlp); lm_head and the embeddings are in no group.
    blocks = {"attn": {"attn", "self_attn"}, "mlp": {"mlp"}}
    expected = {name for name, module in original.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))
                and any(blocks[group] & set(name.split(".")) for group in bits)}
    assert expected and set(packed) == expected
    worst = 0.0
    for name, module in packed.items():
        before = weight_out_in(original.get_submodule(name)).detach()
        after = weight_out_in(module).detach()
        scale = module.stored_weight_scale  # (out, groups): one step of the grid
        step = scale.repeat_interleave(before.shape[1] // scale.shape[1], dim=1)
        ratio = ((after - before).abs() / step).max().item()
        assert ratio <= 0.5 + 1e-4, f"{name}: off by {ratio:.4f} steps"
        worst = max(worst, ratio)
    assert worst > 0.4  # rounding really happened


def test_packed_tensors_decode_to_the_weights_evaluated_in_memory():
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model = make_tiny_llama()
    apply(model, QuantSpec(method="rtn", bits={"attn": 3, "mlp": 3}, group_size=32, symmetric=False), CONTEXT)
    module = model.get_submodule("model.layers.1.mlp.down_proj")  # (32, 64): two groups per row
    stored = module.stored_tensors()
    codes = unpack_from_int32(stored["weight_packed"], 3, torch.Size([32, 64]))
    zero = unpack_from_int32(stored["weight_zero_point"], 3, torch.Size([32, 2]), packed_dim=0)
    assert codes.min() >= -4 and codes.max() <= 3
    decoded = (codes.float().reshape(32, 2, 32) - zero.float().unsqueeze(-1)) * stored["weight_scale"].unsqueeze(-1)
    assert torch.equal(decoded.reshape(32, 64), module.weight.detach())


def test_gptq_rounding_beats_round_to_nearest_on_correlated_inputs():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=generator) * 0.02
    inputs = (torch.randn(1024, 128, generator=generator) * torch.rand(128, generator=generator) ** 2) \
        @ torch.randn(128, 128, generator=generator)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]

    def output_error(quantized):
        return ((inputs @ (weight - quantized.dequantize()).T) ** 2).mean().item()

    grids = [StorageGrid(3, 32), StorageGrid(3, None),  # compressed-tensors
             StorageGrid(4, 32, True, GGUF_GRID), StorageGrid(4, 32, False, GGUF_GRID)]  # GGUF Q4_0, Q4_1
    for fmt in grids:
        rtn = output_error(round_to_nearest(weight, fmt, torch.float32))
        low, high = (0, 15) if fmt.scheme == GGUF_GRID and not fmt.symmetric else (-2 ** (fmt.bits - 1), 2 ** (fmt.bits - 1) - 1)
        for act_order in (True, False):
            gptq = gptq_round(weight, hessian, fmt, torch.float32, act_order=act_order)
            assert output_error(gptq) < 0.8 * rtn, (fmt, act_order)
            assert gptq.codes.dtype == torch.int8 and gptq.codes.min() >= low and gptq.codes.max() <= high


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_builds_tiny_models_deterministically_from_training_text(arch):
    tokenizer = make_tiny_tokenizer()
    documents = [Document(f"work{i}", SAMPLE_TEXT * 8) for i in range(3)]
    spec = QuantSpec.from_dict({"method": "gptq", "bits": {"attn": 4, "mlp": 3}, "group_size": 32,
                                "gptq": {"samples": 6, "seq_len": 16}})

    def build(seed):
        model = ARCHITECTURES[arch](vocab_size=len(tokenizer))
        return apply(model, spec, BuildContext(tokenizer, documents, seed=seed, progress=False))

    first, again, other_seed = build(0), build(0), build(1)
    weights = lambda m: {n: weight_out_in(x).detach() for n, x in _packed_modules(m).items()}  # noqa: E731
    assert len(weights(first)) == (8 if arch == "gpt2" else 14)
    assert all(torch.equal(a, b) for a, b in zip(weights(first).values(), weights(again).values()))
    assert any(not torch.equal(a, b) for a, b in zip(weights(first).values(), weights(other_seed).values()))
    assert torch.isfinite(_logits(first, IDS)).all()


def test_dynamic_int8_keeps_torch_deprecation_warnings_to_itself():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply(make_tiny_gpt2(), SPECS["dynamic-int8"], CONTEXT)
        _logits(model, IDS)
    assert [str(w.message)[:80] for w in caught if "deprecat" in str(w.message).lower()] == []


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------


def _saved_tensor_bytes(folder) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    return total


def _reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("name, spec", [
    ("symmetric mix, untied head", QuantSpec(method="rtn", bits={"attn": 2, "mlp": 8, "head": 4}, group_size=32,
                                             overrides=(LayerOverride("*.down_proj", 16),))),
    ("asymmetric, one format", QuantSpec(method="rtn", bits={"attn": 3, "mlp": 3, "head": 3}, group_size=32,
                                         symmetric=False)),
    ("symmetric per channel, tied head at 16", QuantSpec(method="rtn", bits={"attn": 4, "mlp": 4, "head": 16},
                                                        group_size=None)),
])
def test_rtn_checkpoint_reloads_with_plain_transformers(tmp_path, name, spec):
    model = apply(make_tiny_llama(), spec, CONTEXT)
    result = export(model, spec, tmp_path, tokenizer=make_tiny_tokenizer())
    assert result.format == "compressed-tensors/pack-quantized"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert config["tie_word_embeddings"] == (spec.bits["head"] == 16)
    assert QuantSpec.from_dict(json.loads((tmp_path / "planner-quantization.json").read_text())) == spec
    assert _saved_tensor_bytes(tmp_path) == weight_bytes(model).total_bytes  # the file holds what memory reports
    reloaded = _reload(tmp_path)
    assert torch.equal(_logits(reloaded, IDS), _logits(model, IDS))


def test_bnb_checkpoint_reloads_with_plain_transformers(tmp_path):
    model = apply(make_tiny_gpt2(), SPECS["bnb-int8"], CONTEXT)
    assert export(model, SPECS["bnb-int8"], tmp_path).format == "bitsandbytes"
    assert torch.equal(_logits(_reload(tmp_path), IDS), _logits(model, IDS))


@pytest.mark.parametrize("make, spec, reason", [
    (make_tiny_llama, SPECS["dynamic-int8"], "dynamic-int8"),
    (make_tiny_gpt2, QuantSpec(method="rtn", bits={"attn": 4, "mlp": 16}), "Conv1D"),
    (make_tiny_llama, QuantSpec(method="rtn", bits={"attn": 4, "mlp": 8}, symmetric=False), "several formats"),
])
def test_candidates_without_a_loadable_format_fail_clearly_before_writing(tmp_path, make, spec, reason):
    model = make()
    assert reason in export_blocker(model, spec)
    built = apply(model, spec, CONTEXT)
    with pytest.raises(ExportError, match=reason):
        export(built, spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt2_at_16_bits_exports_as_a_float16_checkpoint(tmp_path):
    spec = QuantSpec(method="rtn", bits={"attn": 16, "mlp": 16, "head": 16})
    model = apply(make_tiny_gpt2(), spec, CONTEXT)
    assert export_blocker(model, spec) is None
    export(model, spec, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert _saved_tensor_bytes(tmp_path) == weight_bytes(model).total_bytes
    assert torch.equal(_logits(_reload(tmp_path), IDS), _logits(model, IDS))


def test_exporting_a_model_that_was_not_built_is_an_error(tmp_path):
    with pytest.raises(ExportError, match="apply"):
        export(make_tiny_llama(), QuantSpec(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
