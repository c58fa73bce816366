"""The cheap, exact estimate the planner uses before building: stored weight bytes of a candidate.

It must equal evaluators.memory.weight_bytes of the built candidate (tested for every method). Layers
the spec changes are sized as their method stores them (`QuantMethod.layer_bytes`): grid methods from the
same layout the packer checks its output against (`pack.stored_layout`); bnb and dynamic-int8 by building one
probe layer per distinct shape (milliseconds, cached), since their storage is defined by those libraries. Every other
tensor counts as it is, shared (tied) tensors once.
"""
from __future__ import annotations

import torch
from torch import nn

from search_spaces.quantization.plan import plan_layers
from search_spaces.quantization.spec import QuantSpec


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for two names of the same stored data (tied weights), as evaluators.memory identifies them."""
    pointer = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else 0
    if pointer == 0:
        return ("object", id(tensor))
    return (pointer, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def estimate_weight_bytes(model: nn.Module, spec: QuantSpec, device: torch.device | str | None = None) -> int:
    """Exact bytes of the weights of the candidate `spec` would build from `model` (which is not changed).

    Reads shapes and dtypes only: for rtn/gptq the model may live on the meta device (e.g. built with
    ``torch.device("meta")`` from a config). `device` is where the candidate would be built (default:
    the model's, or the CPU for a meta model); bnb's storage depends on it.
    """
    if device is None:
        first = next(model.parameters()).device
        device = torch.device("cpu") if first.type == "meta" else first
    method = spec.quant_method
    layers = method.quantized_layers(plan_layers(model, spec).layers, spec, device)
    changed = {p.name for p in layers}
    seen: set[tuple] = set()
    total = 0
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in changed and leaf in ("weight", "bias"):
            continue
        identity = _storage_key(tensor)
        if identity not in seen:
            seen.add(identity)
            total += tensor.numel() * tensor.element_size()
    return total + sum(method.layer_bytes(p, spec, device) for p in layers)
