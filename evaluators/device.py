"""Where a model lives: its device and compute dtype, read off its parameters."""
from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model that has none)."""
    for tensor in _tensors(model):
        return tensor.device
    return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for tensor in _tensors(model):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _tensors(model):
    if isinstance(model, torch.nn.Module):
        yield from model.parameters()
        yield from model.buffers()
