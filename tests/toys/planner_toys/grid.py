"""A storage grid: symmetric 6-bit codes stored one int8 each, one scale per block of 32 in the model's float
dtype. No runtime but the toy target's reads it, so only its artifact format holds it."""
from __future__ import annotations

import torch

from search_spaces.quantization.schemes.base import StorageScheme, register_scheme

BLOCK = 32
ARTIFACT = "toy-tensors"  # planner_toys.target's checkpoint: each layer's stored tensors as they are


class Int6Blocks(StorageScheme):
    name, artifacts, bits, group_sizes, symmetric = "toy-int6", frozenset({ARTIFACT}), (6,), (BLOCK,), (True,)

    def layout(self, out_features, in_features, fmt, dtype):
        return {"codes": ((out_features, in_features), torch.int8),
                "scales": ((out_features, in_features // BLOCK), dtype)}

    def pack(self, quantized):
        return {"codes": quantized.codes.contiguous(), "scales": quantized.scale.contiguous()}


INT6 = register_scheme(Int6Blocks())
