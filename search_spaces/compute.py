"""A 16-bit model's passes without gradients computed in float32 on a CPU that has no 16-bit matrix instructions.

A model held in bfloat16 (where float32 does not fit: planner/footprint.py) is computed in bfloat16 by torch. On
a CPU without AVX512-BF16 or AMX those kernels are emulated: a 1B model's MLP matmul ran 7x slower than in float32
on an AVX2 machine (bench/half_compute.py), and the sensitivity tables of a 1.24 B model took over 25 minutes
in their calibration passes. `float32_compute` runs each module that holds parameters with float32 copies of them,
made as it starts and dropped as it ends (one module's at a time: the model stays in its precision, its memory
grows by the largest module's float32 weights), and its floating inputs in float32, so every activation is float32.
Only for the planner's own measurements (calibration statistics, KL, screening, a teacher's logits): what a runtime
serves is measured as it serves it. Not for training: the float32 copies would be kept for the backward pass.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

import torch
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


@contextlib.contextmanager
def float32_compute(model: nn.Module, when: bool | None = None) -> Iterator[None]:
    """Within it, the model's forward passes compute in float32 (see the module docstring); `when` None: where
    `computes_slowly(model)`. Its parameters are never changed: each module's are swapped for float32 copies during
    its own forward and put back after it, exceptions included."""
    if not (computes_slowly(model) if when is None else when):
        yield
        return
    held: dict[int, dict[str, nn.Parameter]] = {}

    def before(module, args, kwargs):
        params = module._parameters
        originals = {n: p for n, p in params.items() if p is not None and p.dtype in NATIVE_FLAGS}
        if torch.is_grad_enabled() and any(p.requires_grad for p in originals.values()):
            raise RuntimeError("float32_compute is for passes without gradients: its copies are detached")
        held[id(module)] = originals
        for name, parameter in originals.items():
            params[name] = parameter.detach().float()
        return tuple(_float32(a) for a in args), {k: _float32(v) for k, v in kwargs.items()}

    def after(module, args, kwargs, output):  # also when the forward raised (always_call)
        module._parameters.update(held.pop(id(module), {}))

    handles = []
    for module in model.modules():
        if any(p.dtype in NATIVE_FLAGS for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in model.modules():  # a forward a later pre-hook cut short (a calibration pass's stop)
            module._parameters.update(held.pop(id(module), {}))
