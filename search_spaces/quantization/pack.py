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

A layer on a GGUF grid stores one tensor, ``blocks``: the GGUF type's blocks, row by row (uint8, out x
in / 32 x the type's block bytes), exactly the bytes the GGUF file holds for it: per block of 32 weights
the fp16 scale d, the fp16 minimum (Q4_1, Q5_1), the 32 fifth bits as one little-endian uint32 (Q5_0,
Q5_1), then the low nibbles, weight j in the low half of byte j and weight j + 16 in its high half
(Q8_0: 32 int8 codes instead).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from search_spaces.quantization.grid import GGUF_BLOCK, GGUF_GRID, QuantizedWeight, StorageGrid
from search_spaces.quantization.methods.base import FLOAT_BITS

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def half_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit float dtype a "16-bit" layer is stored in: the model's own if it is 16-bit, else float16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def stored_layout(out_features: int, in_features: int, fmt: StorageGrid, dtype: torch.dtype) -> Layout:
    """Name -> (shape, dtype) of every tensor stored for a layer's weight (its bias excluded)."""
    if fmt.is_float:
        return {"weight": ((out_features, in_features), half_dtype(dtype))}
    if fmt.scheme == GGUF_GRID:
        return {"blocks": ((out_features, in_features // GGUF_BLOCK * gguf_block_bytes(fmt)), torch.uint8)}
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


def gguf_block_bytes(fmt: StorageGrid) -> int:
    """Bytes of one GGUF block of 32 weights on this grid."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.gguf_type]]
    assert block == GGUF_BLOCK
    return size


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.float16).contiguous().numpy().reshape(-1, 1).view(np.uint8)


def pack_gguf(quantized: QuantizedWeight) -> np.ndarray:
    """The GGUF blocks of a layer on a GGUF grid: (out, in / 32 x block bytes) uint8."""
    fmt = quantized.fmt
    out_features, in_features = quantized.codes.shape
    blocks = out_features * in_features // GGUF_BLOCK
    codes = quantized.codes.reshape(blocks, GGUF_BLOCK).to(torch.int16)
    parts = [_fp16_bytes(quantized.scale.reshape(blocks))]
    if quantized.zero is not None:
        parts.append(_fp16_bytes(quantized.zero.reshape(blocks)))
    if fmt.bits == 8:
        parts.append(codes.to(torch.int8).numpy().view(np.uint8))
    else:
        stored = (codes if quantized.zero is not None else codes + 2 ** (fmt.bits - 1)).numpy().astype(np.uint8)
        if fmt.bits == 5:
            high = ((stored >> 4) & 1).astype(np.uint32) << np.arange(GGUF_BLOCK, dtype=np.uint32)
            parts.append(high.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8))
        low = stored & 0x0F
        parts.append(low[:, :16] | (low[:, 16:] << 4))
    packed = np.concatenate(parts, axis=1).reshape(out_features, -1)
    if packed.shape[1] != in_features // GGUF_BLOCK * gguf_block_bytes(fmt):  # writer and size formula agree
        raise RuntimeError(f"{fmt.gguf_type} blocks of {packed.shape[1]} bytes per row differ from the layout")
    return packed


def pack(quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The stored tensors of a layer, exactly as the checkpoint (or the GGUF file) holds them."""
    if quantized.fmt.scheme == GGUF_GRID:
        out_features, in_features = quantized.codes.shape
        tensors = {"blocks": torch.from_numpy(pack_gguf(quantized))}
        return _checked(tensors, stored_layout(out_features, in_features, quantized.fmt, quantized.scale.dtype))
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out_features, in_features = quantized.codes.shape
    tensors = {
        "weight_packed": pack_to_int32(quantized.codes.contiguous(), quantized.bits),
        "weight_scale": quantized.scale.contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if quantized.zero is not None:
        tensors["weight_zero_point"] = pack_to_int32(quantized.zero.contiguous(), quantized.bits, packed_dim=0)
    return _checked(tensors, stored_layout(out_features, in_features, quantized.fmt, quantized.scale.dtype))


def float_stored(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of a 16-bit layer: its weight, in the layout its module holds it, in the 16-bit dtype."""
    rows, cols = weight.shape
    tensors = {"weight": weight.detach().to(half_dtype(weight.dtype)).contiguous()}
    return _checked(tensors, stored_layout(rows, cols, StorageGrid(FLOAT_BITS), weight.dtype))
