import json
import warnings

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from evaluators import memory
from evaluators.memory import (
    PEAK_METHODS,
    MemoryResult,
    PeakMemory,
    WeightMemory,
    measure_memory,
    peak_forward_memory,
    weight_bytes,
)

MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Weight bytes
# ---------------------------------------------------------------------------------------------------


class TiedMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.fp32 = nn.Linear(64, 32)
        self.fp16 = nn.Linear(32, 16).half()
        self.embed = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 100, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most causal LMs


def test_float_layers_and_a_tied_pair():
    result = weight_bytes(TiedMix())
    fp32 = (64 * 32 + 32) * 4
    fp16 = (32 * 16 + 16) * 2
    tied = 100 * 16 * 4  # once, although the state_dict names it twice
    assert result == WeightMemory(
        total_bytes=fp32 + fp16 + tied,
        by_dtype={"float32": fp32 + tied, "float16": fp16},
        num_tensors=5,
    )
    assert result.method == "state_dict_storage"
    assert json.loads(json.dumps(result.to_dict())) == {
        "total_bytes": 8320 + 1056 + 6400,
        "by_dtype": {"float32": 8320 + 6400, "float16": 1056},
        "num_tensors": 5,
        "method": "state_dict_storage",
    }


def test_untied_pair_counts_both():
    model = TiedMix()
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    assert weight_bytes(model).total_bytes == (64 * 32 + 32) * 4 + (32 * 16 + 16) * 2 + 2 * 100 * 16 * 4


def test_whole_tiny_llama_is_its_unique_parameters(tiny_llama):
    naive = sum(t.numel() * t.element_size() for t in tiny_llama.state_dict().values())
    unique = sum(p.numel() * p.element_size() for p in tiny_llama.parameters())  # parameters() dedupes ties
    result = weight_bytes(tiny_llama)
    assert result.total_bytes == unique
    assert result.total_bytes == naive - 128 * 32 * 4  # lm_head is embed_tokens: one 128x32 fp32 table less
    assert result.num_tensors == len(list(tiny_llama.parameters()))
    assert result.by_dtype == {"float32": unique}


def _quantize_dynamic(model, qconfig_spec):
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated, still the reference int8 path
        return quantize_dynamic(model, qconfig_spec, dtype=torch.qint8)


def test_torch_dynamic_int8_linear_per_tensor():
    model = _quantize_dynamic(nn.Sequential(nn.Linear(64, 32)), {nn.Linear})
    weight, bias = model.state_dict()["0._packed_params._packed_params"]
    assert weight.qscheme() == torch.per_tensor_affine
    int8 = 64 * 32 * 1
    qparams = 8 + 8  # the per-tensor scale is a double, the zero point an int64
    bias_bytes = 32 * 4
    output_qparams = 4 + 8  # the module's own `scale` (fp32) and `zero_point` (int64) state_dict entries
    result = weight_bytes(model)
    assert result.total_bytes == int8 + qparams + bias_bytes + output_qparams == 2204
    assert result.by_dtype == {"qint8": int8 + qparams, "float32": bias_bytes + 4, "int64": 8}
    assert result.num_tensors == 4


def test_torch_dynamic_int8_linear_per_channel():
    from torch.ao.quantization import per_channel_dynamic_qconfig

    model = _quantize_dynamic(nn.Sequential(nn.Linear(64, 32)), {nn.Linear: per_channel_dynamic_qconfig})
    assert model.state_dict()["0._packed_params._packed_params"][0].qscheme() == torch.per_channel_affine
    # int8 weight + 32 float64 scales + 32 int64 zero points + fp32 bias + output scale/zero point
    assert weight_bytes(model).total_bytes == 64 * 32 + 32 * 8 + 32 * 8 + 32 * 4 + 4 + 8 == 2700


def test_bitsandbytes_linear8bitlt_on_cpu():
    layer = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False)
    layer = layer.to("cpu")  # bitsandbytes quantizes on the first .to(device), even to the CPU it is on
    assert layer.weight.dtype == torch.int8
    # int8 weight + fp32 bias + fp32 row scales (SCB) + a one-byte uint8 `weight_format` marker
    expected = 64 * 32 * 1 + 32 * 4 + 32 * 4 + 1
    result = weight_bytes(layer)
    assert result.total_bytes == expected == 2305
    assert result.by_dtype == {"int8": 2048, "float32": 256, "uint8": 1}


@pytest.mark.parametrize(
    "compress_statistics, expected",
    [
        (
            False,
            64 * 32 // 2  # two nf4 codes per uint8
            + 32 * 4  # fp32 bias
            + (64 * 32 // 64) * 4  # one fp32 absmax per 64-value block
            + 16 * 4  # fp32 quant_map: the 16 nf4 levels
            + len('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 64]}'),
        ),
        (
            True,
            64 * 32 // 2
            + 32 * 4
            + (64 * 32 // 64) * 1  # absmax itself quantized to uint8
            + 16 * 4
            + 1 * 4  # nested_absmax: one fp32 per 256 absmax values
            + 256 * 4  # nested_quant_map: the 256-entry fp32 code
            + len(
                '{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 64], '
                '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5}'
            ),
        ),
    ],
)
def test_bitsandbytes_linear4bit_nf4_on_cpu(compress_statistics, expected):
    layer = bnb.nn.Linear4bit(64, 32, bias=True, quant_type="nf4", compress_statistics=compress_statistics)
    with torch.no_grad():
        layer.weight.fill_(0.5)  # constant weights make the serialized nested_offset exactly 0.5
    layer = layer.to("cpu")
    assert layer.weight.dtype == torch.uint8
    assert weight_bytes(layer).total_bytes == expected
    assert expected == (1421 if not compress_statistics else 1024 + 128 + 32 + 64 + 4 + 1024 + 151)


class Packed(nn.Module):
    """Stands in for a packed layer that knows its own stored size better than its state_dict does."""

    def __init__(self, nbytes: int = 42):
        super().__init__()
        self.nbytes = nbytes
        self.register_buffer("codes", torch.zeros(1000, dtype=torch.uint8))
        self.inner = nn.Linear(8, 8)  # a child's entries are skipped as well

    def stored_weight_bytes(self):
        return self.nbytes


def test_stored_weight_bytes_hook_replaces_the_module_entries():
    model = nn.Sequential(nn.Linear(4, 4), Packed())
    result = weight_bytes(model)
    assert result.total_bytes == (4 * 4 + 4) * 4 + 42
    assert result.by_dtype == {"stored_weight_bytes": 42, "float32": 80}
    assert result.num_tensors == 2


def test_stored_weight_bytes_hook_shared_nested_and_at_the_root():
    shared = Packed(10)
    assert weight_bytes(nn.Sequential(shared, nn.Sequential(shared))).total_bytes == 10
    outer = Packed(7)
    outer.inner = Packed(1000)  # the outermost self-sizing module wins
    assert weight_bytes(nn.Sequential(outer)).total_bytes == 7
    expected = WeightMemory(total_bytes=5, by_dtype={"stored_weight_bytes": 5}, num_tensors=0)
    assert weight_bytes(Packed(5)) == expected


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_stored_weight_bytes_hook_must_return_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="stored_weight_bytes"):
        weight_bytes(nn.Sequential(Packed(bad)))


def test_sparse_tensors_are_refused():
    model = nn.Module()
    model.register_buffer("mask", torch.eye(4).to_sparse())
    with pytest.raises(ValueError, match="sparse"):
        weight_bytes(model)


# ---------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------


def test_peak_forward_memory_fields(tiny_gpt2):
    tiny_gpt2.train()
    peak = peak_forward_memory(tiny_gpt2, prompt_tokens=16)
    assert isinstance(peak, PeakMemory)
    assert peak.device == "cpu"
    assert peak.method in PEAK_METHODS
    assert peak.prompt_tokens == 16
    assert 0 < peak.before_bytes <= peak.peak_bytes
    assert peak.increase_bytes == peak.peak_bytes - peak.before_bytes
    assert json.loads(json.dumps(peak.to_dict())) == peak.to_dict()
    assert tiny_gpt2.training  # eval only for the measurement


def test_peak_increase_grows_with_a_much_longer_prompt():
    model = make_tiny_llama(vocab_size=32000)
    # Long twice: memory the allocator kept from an earlier forward must not hide the second one's.
    long, short, long_again = (peak_forward_memory(model, prompt_tokens=n) for n in (256, 8, 256))
    # The fp32 logits alone are 256 * 32000 * 4 bytes (~31 MiB) for the long prompt, 1 MiB for the
    # short one; half of the difference is a margin no allocator or page-granularity noise reaches.
    assert long.increase_bytes - short.increase_bytes >= 15 * MiB
    assert long_again.increase_bytes - short.increase_bytes >= 15 * MiB


def test_peak_falls_back_to_rss_sampling(tiny_llama, monkeypatch):
    monkeypatch.setattr(memory, "_reset_rss_hwm", lambda: False)
    peak = peak_forward_memory(tiny_llama, prompt_tokens=16)
    assert peak.method == "rss_sampling"
    assert 0 < peak.before_bytes <= peak.peak_bytes
    assert peak.increase_bytes == peak.peak_bytes - peak.before_bytes


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt_tokens": 0}, "prompt_tokens"),
    ({"prompt_tokens": 257}, "exceed the model's 256 positions"),
    ({"seed": -1}, "seed"),
])
def test_peak_forward_memory_rejects_bad_arguments(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        peak_forward_memory(tiny_llama, **kwargs)


def test_measure_memory_combines_both(tiny_llama):
    result = measure_memory(tiny_llama, prompt_tokens=8, seed=1)
    assert isinstance(result, MemoryResult)
    assert result.weights == weight_bytes(tiny_llama)
    assert result.peak.prompt_tokens == 8
    data = json.loads(json.dumps(result.to_dict()))
    assert data["weights"] == result.weights.to_dict()
    assert data["peak"] == result.peak.to_dict()
