"""dynamic-int8 candidates: PyTorch's dynamically quantized int8 linear layers, for CPU deployment.

Weights are int8 with one scale per output channel; activations are quantized on the fly per batch.
On the machines here this is the one backend measured to speed up a CPU forward. torch.ao.quantization
is deprecated in torch 2.13 (and warns on every call); `torch_ao_quiet` keeps those warnings to this
module. GPT-2's Conv1D layers are turned into equivalent nn.Linear layers first (torch only converts
nn.Linear). There is no transformers-loadable format for these layers (see quantization/export.py).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator

import torch
from torch import nn

from search_spaces.base import BuildContext
from search_spaces.layers import is_transposed, weight_out_in
from search_spaces.quantization.plan import LayerPlan, plan_layers
from search_spaces.quantization.methods.base import WholeGroupMethod, register_method
from search_spaces.quantization.spec import QuantSpace, QuantSpec


@contextlib.contextmanager
def torch_ao_quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation notices (and only those) for the duration of the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"(?s).*torch\.ao")
        warnings.filterwarnings("ignore", category=UserWarning, message=r"(?s).*quantiz.*deprecated")
        yield


def _as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear computing what a Conv1D computes (its weight stored the other way round)."""
    weight = weight_out_in(module)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def quantize_linears(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named linear layers of `model` (in place) by torch dynamic int8 ones."""
    for name in names:
        module = model.get_submodule(name)
        if is_transposed(module):
            model.set_submodule(name, _as_linear(module))
    with torch_ao_quiet():
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names},
                                dtype=torch.qint8, inplace=True)


def build_dynamic(model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"dynamic-int8 runs on the CPU only; the model is on {device}")
    plan = plan_layers(model, spec)
    return quantize_linears(model, [p.name for p in plan.layers if p.quantized])


@functools.lru_cache(maxsize=None)
def _layer_bytes(out_features: int, in_features: int, bias: bool, dtype: torch.dtype) -> int:
    from evaluators.memory import weight_bytes

    probe = nn.Sequential(nn.Linear(in_features, out_features, bias=bias, dtype=dtype))
    return weight_bytes(quantize_linears(probe, ["0"])).total_bytes


def dynamic_layer_bytes(plan: LayerPlan) -> int:
    """Stored bytes of one planned layer once quantized: measured on a probe layer of the same shape."""
    return _layer_bytes(plan.out_features, plan.in_features, plan.bias_bytes > 0, plan.dtype)


class DynamicInt8(WholeGroupMethod):
    name = "dynamic-int8"
    bits = (8, 16)
    applied_at_load = True  # quantize_dynamic on the loaded float checkpoint: no calibration, deterministic

    def runs_on(self, device: str) -> bool:
        # torch's dynamic quantized linear kernels exist for the CPU only
        return torch.device(device).type == "cpu" and any(e != "none" for e in torch.backends.quantized.supported_engines)

    def suggest(self, trial, space: QuantSpace, choose) -> QuantSpec:
        return QuantSpec(method=self.name, bits=self.groups_at(trial, choose, 8))

    def build(self, model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
        return build_dynamic(model, spec, context)

    def presets(self, space: QuantSpace):
        return self.smallest(space)

    def shape_presets(self, space: QuantSpace):
        return self.smallest(space)

    def layer_bytes(self, plan: LayerPlan, spec: QuantSpec, device) -> int:
        return dynamic_layer_bytes(plan)

    def export_blocker(self, model: nn.Module, spec: QuantSpec) -> str | None:
        return ("dynamic-int8 layers are torch.ao packed modules, which transformers cannot load: save the float "
                "model and apply the spec again at load time (no calibration, a few seconds)")


register_method(DynamicInt8())
