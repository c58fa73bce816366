"""gguf (llama.cpp): blocks of 32 weights along the input, fp16 scales, one GGUF tensor type per grid.

Symmetric grids are Q8_0 (``d = max|w| / 127``) and Q4_0 / Q5_0 (``d = m / -2^(b-1)`` with m the block's
value of largest magnitude, so that value is the code -2^(b-1) and all 2^b codes are used); offset grids
are Q4_1 / Q5_1 (``d = (max - min) / (2^b - 1)``, codes in [0, 2^b - 1], a weight decodes to
``code * d + min`` with min stored in fp16). GGUF has no offset 8-bit weight type (Q8_1 is for
activations), so 8-bit layers are Q8_0 on an offset spec too. A weight decodes in float32 exactly as gguf's
dequantizer does. A width that is not a whole number of blocks is stored in F16, as llama.cpp's own
quantizer falls back.

A layer stores one tensor, ``blocks``: the type's blocks, row by row (uint8, out x in / 32 x the type's
block bytes), exactly the bytes the GGUF file holds for it: per block the fp16 scale d, the fp16 minimum
(Q4_1, Q5_1), the 32 fifth bits as one little-endian uint32 (Q5_0, Q5_1), then the low nibbles, weight j
in the low half of byte j and weight j + 16 in its high half (Q8_0: 32 int8 codes instead).
"""
from __future__ import annotations

import numpy as np
import torch

from search_spaces.quantization.constants import FLOAT_BITS
from search_spaces.quantization.schemes.base import (Layout, QuantizedWeight, StorageGrid, StorageScheme, code_range,
                                                    register_scheme)

BLOCK = 32  # weights per GGUF block (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)


def block_bytes(fmt: StorageGrid) -> int:
    """Bytes of one GGUF block of 32 weights on this grid."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.label]]
    assert block == BLOCK
    return size


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.float16).contiguous().numpy().reshape(-1, 1).view(np.uint8)


def pack_gguf(quantized: QuantizedWeight) -> np.ndarray:
    """The GGUF blocks of a layer on a GGUF grid: (out, in / 32 x block bytes) uint8."""
    fmt = quantized.fmt
    out_features, in_features = quantized.codes.shape
    blocks = out_features * in_features // BLOCK
    codes = quantized.codes.reshape(blocks, BLOCK).to(torch.int16)
    parts = [_fp16_bytes(quantized.scale.reshape(blocks))]
    if quantized.zero is not None:
        parts.append(_fp16_bytes(quantized.zero.reshape(blocks)))
    if fmt.bits == 8:
        parts.append(codes.to(torch.int8).numpy().view(np.uint8))
    else:
        stored = (codes if quantized.zero is not None else codes + 2 ** (fmt.bits - 1)).numpy().astype(np.uint8)
        if fmt.bits == 5:
            high = ((stored >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
            parts.append(high.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8))
        low = stored & 0x0F
        parts.append(low[:, :16] | (low[:, 16:] << 4))
    return np.concatenate(parts, axis=1).reshape(out_features, -1)


class GGUF(StorageScheme):
    name = "gguf"
    artifacts = frozenset({"gguf"})
    bits = (4, 5, 8)
    group_sizes = (BLOCK,)

    def layer_grid(self, bits: int, in_features: int, group_size: int | None, symmetric: bool) -> StorageGrid:
        return super().layer_grid(bits, in_features, group_size, symmetric or bits == 8)

    def label(self, fmt: StorageGrid) -> str:
        return "Q8_0" if fmt.bits == 8 else f"Q{fmt.bits}_{0 if fmt.symmetric else 1}"

    def spec_label(self, spec, grid_fallback: bool) -> list[str]:
        """The GGUF types of attn/mlp/head ('Q4_0/Q8_0/hF16'); '*' when some layers use another."""
        def type_of(bits: int) -> str:
            fmt = self.layer_grid(bits, BLOCK, BLOCK, spec.symmetric) if bits < FLOAT_BITS else StorageGrid(bits)
            return fmt.label
        return [spec.bits_label(type_of) + ("*" if grid_fallback else "")]

    def code_range(self, fmt: StorageGrid) -> tuple[int, int]:
        return code_range(fmt.bits) if fmt.symmetric else (0, 2 ** fmt.bits - 1)

    def params(self, values: torch.Tensor, fmt: StorageGrid, scale_dtype: torch.dtype):
        values = values.float()  # GGUF stores scales (and minima) in fp16 whatever the model's dtype
        if not fmt.symmetric:
            low, high = values.amin(dim=-1), values.amax(dim=-1)
            return ((high - low) / (2 ** fmt.bits - 1)).half(), low.half()
        if fmt.bits == 8:
            return (values.abs().amax(dim=-1) / 127).half(), None
        largest = values.gather(-1, values.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        return (largest / -(2 ** (fmt.bits - 1))).half(), None

    def codes(self, values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
              fmt: StorageGrid) -> torch.Tensor:
        qmin, qmax = self.code_range(fmt)
        shifted = values.float() if offset is None else values.float() - offset.float()
        step = scale.float()
        # A block of zeros has a zero step: its codes are whatever decodes to its values (0, or the offset).
        scaled = torch.where(step == 0, torch.zeros_like(shifted), shifted / torch.where(step == 0, 1.0, step))
        return torch.clamp(torch.round(scaled), qmin, qmax).to(torch.int8)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
               fmt: StorageGrid) -> torch.Tensor:
        values = scale.float() * codes.float()  # ``d * q`` then ``+ min``, as gguf's numpy dequantizer
        return values if offset is None else values + offset.float()

    def layout(self, out_features: int, in_features: int, fmt: StorageGrid, dtype: torch.dtype) -> Layout:
        return {"blocks": ((out_features, in_features // BLOCK * block_bytes(fmt)), torch.uint8)}

    def pack(self, quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"blocks": torch.from_numpy(pack_gguf(quantized))}


GGUF_SCHEME = register_scheme(GGUF())
