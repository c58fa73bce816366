"""compressed-tensors (transformers, vLLM): the plain integer grid of the base hooks, any group size that
divides the width, stored as compressed-tensors' pack-quantized layout.

Per layer: ``weight_packed`` (int32, ``ceil(in * bits / 32)`` words per output row: 32 codes fill exactly
``bits`` words), ``weight_scale`` (out x groups, the model's float dtype), ``weight_zero_point`` for
asymmetric grids (int32, packed the same way along the output dim) and ``weight_shape`` (two int64).
"""
from __future__ import annotations

import math

import torch

from search_spaces.quantization.constants import DEFAULT_GRID
from search_spaces.quantization.schemes.base import Layout, QuantizedWeight, StorageGrid, StorageScheme, register_scheme


class CompressedTensors(StorageScheme):
    name = DEFAULT_GRID
    artifacts = frozenset({"compressed-tensors"})
    bits = (2, 3, 4, 8)

    def layout(self, out_features: int, in_features: int, fmt: StorageGrid, dtype: torch.dtype) -> Layout:
        groups = 1 if fmt.group_size is None else in_features // fmt.group_size
        layout: Layout = {
            "weight_packed": ((out_features, math.ceil(in_features * fmt.bits / 32)), torch.int32),
            "weight_scale": ((out_features, groups), dtype),
            "weight_shape": ((2,), torch.int64),
        }
        if not fmt.symmetric:
            layout["weight_zero_point"] = ((math.ceil(out_features * fmt.bits / 32), groups), torch.int32)
        return layout

    def pack(self, quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
        # compressed-tensors' own bit packing (imported here: the package is slow to import)
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        out_features, in_features = quantized.codes.shape
        tensors = {
            "weight_packed": pack_to_int32(quantized.codes.contiguous(), quantized.bits),
            "weight_scale": quantized.scale.contiguous(),
            "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
        }
        if quantized.zero is not None:
            tensors["weight_zero_point"] = pack_to_int32(quantized.zero.contiguous(), quantized.bits, packed_dim=0)
        return tensors


COMPRESSED_TENSORS_SCHEME = register_scheme(CompressedTensors())
