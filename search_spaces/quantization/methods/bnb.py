"""bitsandbytes candidates (LLM.int8, nf4, fp4) through transformers' own integration.

transformers quantizes with bitsandbytes while it loads a checkpoint, so a candidate is built by
saving the (float) model to a temporary folder and loading it back with a ``BitsAndBytesConfig``: the
same path a user takes, and the one `save_pretrained` then serializes. Every linear layer the plan
does not quantize is listed in ``llm_int8_skip_modules`` (by exact name), the LM head included.
The model must round-trip through save_pretrained/from_pretrained (its config describes its shapes).

On CPUs with AVX512-BF16, bitsandbytes 0.50.2 repacks a 4-bit layer for its CPU kernel on the first
forward, but undoes that lossily whenever the layer's state dict is taken (absmax is left transposed:
measured, the logits shift after every ``state_dict()`` call and a saved checkpoint is scrambled).
Built candidates therefore keep bitsandbytes' generic 4-bit path (repacking switched off per layer),
so measuring memory or saving never changes them. The repacking needs ``in_features % 64 == 0`` and
``out_features % 32 == 0``; layers of other shapes stay in float, so that a saved candidate also
runs where a fresh load repacks. Double quantization is not offered: it stores a JSON-encoded float
whose length depends on the weights, so its size could not be known exactly before building.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import tempfile

import torch
from torch import nn

from search_spaces.base import BuildContext, Params
from search_spaces.layers import is_linear
from search_spaces.quantization.plan import LayerPlan, plan_layers
from search_spaces.quantization.export import BITSANDBYTES
from search_spaces.quantization.methods.base import WholeGroupMethod, register_method
from search_spaces.quantization.spec import QuantSpace, QuantSpec

BLOCK_4BIT = 64  # bitsandbytes' default 4-bit quantization block (transformers does not change it)
CPU_ROW_TILE = 32  # output rows per tile of the CPU 4-bit kernel


def bnb_quantized_layers(layers: tuple[LayerPlan, ...], spec: QuantSpec, device: torch.device) -> list[LayerPlan]:
    """The planned layers bitsandbytes really quantizes on `device` (see the module notes on shapes)."""
    def fits(plan: LayerPlan) -> bool:
        if spec.bnb_mode == "int8" or torch.device(device).type != "cpu":
            return True
        return plan.in_features % BLOCK_4BIT == 0 and plan.out_features % CPU_ROW_TILE == 0
    return [p for p in layers if p.quantized and fits(p)]


def bnb_config(spec: QuantSpec, dtype: torch.dtype, skip: list[str]):
    from transformers import BitsAndBytesConfig

    if spec.bnb_mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.bnb_mode, bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=skip)


def _keep_unpacked(model: nn.Module) -> nn.Module:
    """Switch off bitsandbytes' lossy CPU repacking of 4-bit layers (see the module notes)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def build_bnb(model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
    """A new, bitsandbytes-quantized copy of `model` (the float model is left as it was)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    plan = plan_layers(model, spec)
    quantized = {p.name for p in bnb_quantized_layers(plan.layers, spec, device)}
    # Exact names, escaped: transformers matches skip entries as regexes from the start of the name.
    skip = [re.escape(name) for name, module in model.named_modules() if is_linear(module) and name not in quantized]
    with tempfile.TemporaryDirectory(prefix="planner-bnb-") as folder:
        model.save_pretrained(folder)
        built = type(model).from_pretrained(folder, quantization_config=bnb_config(spec, dtype, skip),
                                            device_map={"": str(device)}, dtype=dtype)
    return _keep_unpacked(built.eval())


@functools.lru_cache(maxsize=None)
def _layer_bytes(out_features: int, in_features: int, bias: bool, dtype: torch.dtype, mode: str, device: str) -> int:
    import bitsandbytes as bnb

    from evaluators.memory import weight_bytes

    weight = torch.randn(out_features, in_features, dtype=dtype, generator=torch.Generator().manual_seed(0))
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias, dtype, compress_statistics=False, quant_type=mode)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=False, quant_type=mode,
                                         module=layer)
    return weight_bytes(_keep_unpacked(layer.to(device))).total_bytes


def bnb_layer_bytes(plan: LayerPlan, spec: QuantSpec, device) -> int:
    """Stored bytes of one layer once bitsandbytes quantized it: measured on a probe layer of that shape."""
    return _layer_bytes(plan.out_features, plan.in_features, plan.bias_bytes > 0, plan.dtype, spec.bnb_mode,
                        str(torch.device(device)))


class BitsAndBytes(WholeGroupMethod):
    name = "bnb"
    bits = (4, 8, 16)  # 8 is LLM.int8, 4 is nf4 or fp4
    checkpoint = BITSANDBYTES

    def runs_on(self, device: str) -> bool:
        return torch.device(device).type in ("cpu", "cuda") and importlib.util.find_spec("bitsandbytes") is not None

    def check(self, spec: QuantSpec) -> None:
        from search_spaces.specs import SpecError

        quantized = set(spec.integer_bits())
        if len(quantized) > 1:
            raise SpecError(f"QuantSpec.bits: bnb quantizes every layer in one mode (8 or 4 bits), got {sorted(quantized)}")

    def suggest(self, trial, space: QuantSpace, choose) -> QuantSpec:
        mode = choose(trial, self.param("mode"), space.bnb_modes)
        bits = self.groups_at(trial, choose, 8 if mode == "int8" else 4)
        return QuantSpec(method=self.name, bits=bits, bnb_4bit_type=QuantSpec().bnb_4bit_type if mode == "int8" else mode)

    def build(self, model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
        return build_bnb(model, spec, context)

    def smallest(self, space: QuantSpace) -> list[Params]:
        four_bit = [m for m in space.bnb_modes if m != "int8"] or list(space.bnb_modes)
        return [{self.param("mode"): four_bit[0], **super().smallest(space)[0]}]

    def quantized_layers(self, layers, spec: QuantSpec, device) -> list[LayerPlan]:
        return bnb_quantized_layers(layers, spec, device)

    def layer_bytes(self, plan: LayerPlan, spec: QuantSpec, device) -> int:
        return bnb_layer_bytes(plan, spec, device)

    def mode_label(self, spec: QuantSpec) -> list[str]:
        return [spec.bnb_mode]


register_method(BitsAndBytes())
