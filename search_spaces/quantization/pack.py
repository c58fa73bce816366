"""The exact tensors a rtn/GPTQ layer is stored as: compressed-tensors' pack-quantized layout.

One definition (`stored_layout`) says which tensors a layer stores, with their shapes and dtypes;
`pack` produces them (with compressed-tensors' own bit packing) and refuses any result that differs
from the layout. The memory hook of a built layer sums the very tensors `pack` returned, the export
writes them unchanged, and the cheap estimate sums the layout: all three agree by construction.

Per layer, pack-quantized stores: ``weight_packed`` (int32, ``ceil(in * bits / 32)`` words per output
row: 32 codes fill exactly ``bits`` words), ``weight_scale`` (out x groups, the model's float dtype),
``weight_zero_point`` for asymmetric grids (int32, packed the same way along the output dim) and
``weight_shape`` (two int64). A 16-bit layer stores its weight as one 16-bit float tensor. Biases are
kept in the model's dtype.
"""
from __future__ import annotations

import math

import torch

from search_spaces.quantization.grid import QuantizedWeight, StorageGrid
from search_spaces.quantization.methods.base import FLOAT_BITS

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit float dtype a "16-bit" layer is stored in: the model's own if it is 16-bit, else float16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def stored_layout(out_features: int, in_features: int, fmt: StorageGrid, dtype: torch.dtype) -> Layout:
    """Name -> (shape, dtype) of every tensor stored for a layer's weight (its bias excluded)."""
    if fmt.is_float:
        return {"weight": ((out_features, in_features), half_dtype(dtype))}
    groups = 1 if fmt.group_size is None else in_features // fmt.group_size
    layout: Layout = {
        "weight_packed": ((out_features, math.ceil(in_features * fmt.bits / 32)), torch.int32),
        "weight_scale": ((out_features, groups), dtype),
        "weight_shape": ((2,), torch.int64),
    }
    if not fmt.symmetric:
        layout["weight_zero_point"] = ((math.ceil(out_features * fmt.bits / 32), groups), torch.int32)
    return layout


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
    """The pack-quantized tensors of a layer, exactly as the checkpoint stores them."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out_features, in_features = quantized.codes.shape
    tensors = {
        "weight_packed": pack_to_int32(quantized.codes.contiguous(), quantized.bits),
        "weight_scale": quantized.scale.contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if quantized.zero is not None:
        tensors["weight_zero_point"] = pack_to_int32(quantized.zero.contiguous(), quantized.bits, packed_dim=0)
    fmt = StorageGrid(quantized.bits, quantized.group_size, quantized.symmetric)
    return _checked(tensors, stored_layout(out_features, in_features, fmt, quantized.scale.dtype))


def float_stored(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of a 16-bit layer: its weight, in the layout its module holds it, in the 16-bit dtype."""
    rows, cols = weight.shape
    tensors = {"weight": weight.detach().to(half_dtype(weight.dtype)).contiguous()}
    return _checked(tensors, stored_layout(rows, cols, StorageGrid(FLOAT_BITS), weight.dtype))
