"""The exact tensors a rtn/GPTQ layer is stored as.

One definition (`stored_layout`) says which tensors a layer stores, with their shapes and dtypes: a 16-bit
layer its weight as one 16-bit float tensor, an integer grid what its storage scheme lays out
(`StorageScheme.layout`: compressed-tensors' pack-quantized tensors, GGUF's blocks; see schemes/). `pack`
produces them through the scheme and refuses any result that differs from the layout. The memory hook of
a built layer sums the very tensors `pack` returned, the export writes them unchanged, and the cheap
estimate sums the layout: all three agree by construction. Biases are kept in the model's dtype.
"""
from __future__ import annotations

import math

import torch

from search_spaces.quantization.constants import FLOAT_BITS
from search_spaces.quantization.schemes import Layout, QuantizedWeight, StorageGrid
from search_spaces.quantization.schemes.gguf import pack_gguf  # noqa: F401  (GGUF blocks of one layer, for tests)


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit float dtype a "16-bit" layer is stored in: the model's own if it is 16-bit, else float16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def stored_layout(out_features: int, in_features: int, fmt: StorageGrid, dtype: torch.dtype) -> Layout:
    """Name -> (shape, dtype) of every tensor stored for a layer's weight (its bias excluded)."""
    if fmt.is_float:
        return {"weight": ((out_features, in_features), half_dtype(dtype))}
    return fmt.storage_scheme.layout(out_features, in_features, fmt, dtype)


def layout_bytes(layout: Layout) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in layout.values())


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def layout_of(tensors: dict[str, torch.Tensor]) -> Layout:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _checked(tensors: dict[str, torch.Tensor], expected: Layout) -> dict[str, torch.Tensor]:
    actual = layout_of(tensors)
    if actual != expected:  # the writer and the size formula must never drift apart
        raise RuntimeError(f"packed tensors {actual} differ from the stored layout {expected}")
    return tensors


def pack(quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The stored tensors of a layer, exactly as the artifact (checkpoint, GGUF file) holds them."""
    out_features, in_features = quantized.codes.shape
    tensors = quantized.fmt.storage_scheme.pack(quantized)
    return _checked(tensors, stored_layout(out_features, in_features, quantized.fmt, quantized.scale.dtype))


def float_stored(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of a 16-bit layer: its weight, in the layout its module holds it, in the 16-bit dtype."""
    rows, cols = weight.shape
    tensors = {"weight": weight.detach().to(half_dtype(weight.dtype)).contiguous()}
    return _checked(tensors, stored_layout(rows, cols, StorageGrid(FLOAT_BITS), weight.dtype))
