"""A 16-bit model computed in float32 on a CPU that has no 16-bit matrix instructions.

A model held in bfloat16 (where float32 does not fit: planner/footprint.py) is computed in bfloat16 by torch. On
a CPU without AVX512-BF16 or AMX those kernels are emulated: a 1B model's MLP matmul ran 7x slower than in float32
on an AVX2 machine, and the sensitivity tables of a 1.24 B model spent over 25 minutes in their calibration passes
(docs/benchmarks.md section 15). Within `float32_compute` the model's weights stay what they are (its memory grows
by one module's float32 weights at a time) and every activation is float32:
- a linear layer multiplies in float32 with a float32 copy of its weight made for that product (`_Float32Linear`:
  with gradients, the backward pass makes its own copy again instead of keeping one per layer, and hands the
  weight a gradient in its own precision);
- an embedding looks up in its precision and hands on float32 (a lookup rounds nothing);
- any other module holding 16-bit parameters (norms, GPT-2's Conv1D) runs with float32 copies of them, made as it
  starts and put back as it ends (connected to the originals where gradients are on).
For the planner's own passes (calibration statistics, KL, screening, distillation): what a runtime serves is
measured as it serves it.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# The CPU flags of instructions that compute each 16-bit type natively (x86: /proc/cpuinfo's names).
NATIVE_FLAGS = {torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16"}),
                torch.float16: frozenset({"avx512_fp16", "amx_fp16"})}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def computes_slowly(model: nn.Module) -> bool:
    """Whether the model's precision is one this CPU has no native instructions for (a 16-bit model on a CPU)."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or parameter.dtype not in NATIVE_FLAGS:
        return False
    return not (cpu_flags() & NATIVE_FLAGS[parameter.dtype])


def _float32(value):
    if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


class _Float32Linear(torch.autograd.Function):
    """y = x W^T + b in float32 from a 16-bit W (and b); saves W itself, not its float32 copy."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.float(), None if bias is None else bias.float())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight.float() if ctx.needs_input_grad[0] else None
        flat = grad.reshape(-1, grad.shape[-1])
        grad_weight = (flat.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = flat.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _Float32Linear.apply(_float32(x), module.weight, module.bias)


@contextlib.contextmanager
def float32_compute(model: nn.Module, when: bool | None = None) -> Iterator[None]:
    """Within it, the model computes in float32 (see the module docstring); `when` None: where
    `computes_slowly(model)`. Its parameters are never replaced: what is swapped during a module's forward is
    put back after it, exceptions included, and everything installed is removed on leaving."""
    if not (computes_slowly(model) if when is None else when):
        yield
        return
    held: dict[int, dict[str, nn.Parameter]] = {}

    def before(module, args, kwargs):
        params = module._parameters
        originals = {n: p for n, p in params.items() if p is not None and p.dtype in NATIVE_FLAGS}
        held[id(module)] = originals
        for name, parameter in originals.items():
            params[name] = parameter.float() if torch.is_grad_enabled() else parameter.detach().float()
        return tuple(_float32(a) for a in args), {k: _float32(v) for k, v in kwargs.items()}

    def after(module, args, kwargs, output):  # also when the forward raised (always_call)
        module._parameters.update(held.pop(id(module), {}))

    handles, forwards = [], []
    for module in model.modules():
        if not any(p.dtype in NATIVE_FLAGS for p in module.parameters(recurse=False)):
            continue
        if type(module) is nn.Linear and "forward" not in module.__dict__:
            module.forward = functools.partial(_linear_forward, module)  # the instance's forward shadows the class's
            forwards.append(module)
        elif isinstance(module, nn.Embedding):
            handles.append(module.register_forward_hook(lambda module, args, output: _float32(output)))
        else:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in forwards:
            del module.forward
        for module in model.modules():  # a forward a later pre-hook cut short (a calibration pass's stop)
            module._parameters.update(held.pop(id(module), {}))
