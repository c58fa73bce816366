"""The integer grids of weight-only quantization, shared by rtn and GPTQ.

A grid belongs to a storage scheme, the family of formats a deployment target reads:

- ``compressed-tensors`` (transformers, vLLM): signed codes in [-2^(b-1), 2^(b-1) - 1]; a weight decodes
  to ``(code - zero_point) * scale``; symmetric grids have no zero point and
  ``scale = max|w| / ((2^b - 1) / 2)``; asymmetric grids stretch [min(w, 0), max(w, 0)] over all 2^b codes
  with an integer zero point. Scales in the model's float dtype; any group size that divides the width.
- ``gguf`` (llama.cpp): blocks of 32 weights along the input, fp16 scales. Symmetric grids are Q8_0
  (``d = max|w| / 127``) and Q4_0 / Q5_0 (``d = m / -2^(b-1)`` with m the block's value of largest
  magnitude, so that value is the code -2^(b-1) and all 2^b codes are used); offset grids are Q4_1 / Q5_1
  (``d = (max - min) / (2^b - 1)``, codes in [0, 2^b - 1], a weight decodes to ``code * d + min`` with
  min stored in fp16). A weight decodes in float32 exactly as gguf's dequantizer does.

Every scale (and offset) is rounded to the dtype the format stores it in before any code is computed, so
the codes are the ones that decode correctly with the stored scale, and every element is off by at most
half a step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from search_spaces.quantization.methods.base import FLOAT_BITS

COMPRESSED_TENSORS_GRID = "compressed-tensors"
GGUF_GRID = "gguf"
SCHEMES = (COMPRESSED_TENSORS_GRID, GGUF_GRID)
GGUF_BLOCK = 32  # weights per GGUF block (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
GGUF_BITS = (4, 5, 8)
MIN_GROUP_SIZE = 32


@dataclass(frozen=True)
class StorageGrid:
    """The grid one layer's weight is stored on: bits (16 = float), effective group size, symmetric (no zero
    point) or offset. Scales are stored in the model's float dtype. Rounding algorithms (rtn, gptq) choose
    codes on it; the layer plan decides it."""

    bits: int
    group_size: int | None = None  # None: per output channel (ignored at 16 bits)
    symmetric: bool = True
    scheme: str = COMPRESSED_TENSORS_GRID

    @property
    def is_float(self) -> bool:
        return self.bits >= FLOAT_BITS

    @property
    def gguf_type(self) -> str:
        """The GGUF tensor type of this grid (F16 for a 16-bit layer)."""
        if self.is_float:
            return "F16"
        if self.scheme != GGUF_GRID:
            raise ValueError(f"a {self.scheme} grid has no GGUF type")
        return "Q8_0" if self.bits == 8 else f"Q{self.bits}_{0 if self.symmetric else 1}"


def code_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def effective_group_size(in_features: int, group_size: int | None) -> int | None:
    """The group size a layer really uses: the requested one, halved until it divides the layer's input
    width (compressed-tensors needs whole groups), never below 32; per-channel (None) if none does."""
    if group_size is None:
        return None
    size = group_size
    while size >= MIN_GROUP_SIZE:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def grid_params(values: torch.Tensor, fmt: StorageGrid, scale_dtype: torch.dtype):
    """(scale, offset) for each row of `values` reduced over its last dim: the offset is compressed-tensors'
    integer zero point, GGUF's float minimum, or None on a symmetric grid. `scale_dtype` is the model's float
    dtype (compressed-tensors stores scales in it; GGUF always in fp16)."""
    if fmt.scheme == GGUF_GRID:
        return _gguf_params(values, fmt)
    qmin, qmax = code_range(fmt.bits)
    low = values.amin(dim=-1).clamp(max=0)
    high = values.amax(dim=-1).clamp(min=0)
    if fmt.symmetric:
        scale = torch.maximum(-low, high) / ((qmax - qmin) / 2)
    else:
        scale = (high - low) / (qmax - qmin)
    scale = scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale_dtype).eps), scale)
    if fmt.symmetric:
        return scale, None
    zero = torch.clamp(torch.round(qmin - low / scale.to(low.dtype)), qmin, qmax).to(torch.int8)
    return scale, zero


def _gguf_params(values: torch.Tensor, fmt: StorageGrid):
    values = values.float()
    if not fmt.symmetric:
        low, high = values.amin(dim=-1), values.amax(dim=-1)
        return ((high - low) / (2 ** fmt.bits - 1)).half(), low.half()
    if fmt.bits == 8:
        return (values.abs().amax(dim=-1) / 127).half(), None
    largest = values.gather(-1, values.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    return (largest / -(2 ** (fmt.bits - 1))).half(), None


def gguf_code_range(fmt: StorageGrid) -> tuple[int, int]:
    return (0, 2 ** fmt.bits - 1) if not fmt.symmetric else code_range(fmt.bits)


def quantize_codes(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                   fmt: StorageGrid) -> torch.Tensor:
    """int8 codes of `values` on the grid (scale and offset broadcast against values)."""
    if fmt.scheme == GGUF_GRID:
        qmin, qmax = gguf_code_range(fmt)
        shifted = values.float() if offset is None else values.float() - offset.float()
        step = scale.float()
        # A block of zeros has a zero step: its codes are whatever decodes to its values (0, or the offset).
        scaled = torch.where(step == 0, torch.zeros_like(shifted), shifted / torch.where(step == 0, 1.0, step))
        return torch.clamp(torch.round(scaled), qmin, qmax).to(torch.int8)
    qmin, qmax = code_range(fmt.bits)
    scaled = values / scale.to(values.dtype)
    if offset is not None:
        scaled = scaled + offset.to(values.dtype)
    return torch.clamp(torch.round(scaled), qmin, qmax).to(torch.int8)


def decode(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, fmt: StorageGrid) -> torch.Tensor:
    """Float weights of codes, computed as the format's own dequantizer does: compressed-tensors in the scale's
    dtype, GGUF in float32 (``d * q`` then ``+ min``, as gguf's numpy dequantizer)."""
    if fmt.scheme == GGUF_GRID:
        values = scale.float() * codes.float()
        return values if offset is None else values + offset.float()
    values = codes.to(scale.dtype)
    if offset is not None:
        values = values - offset.to(scale.dtype)
    return values * scale


@dataclass(frozen=True)
class QuantizedWeight:
    """A (out, in) weight on a grid: int8 codes, (out, groups) scales and optional offsets (zero points)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    fmt: StorageGrid

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def group_size(self) -> int | None:
        return self.fmt.group_size

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def _grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        out, width = self.codes.shape
        size = width if self.group_size is None else self.group_size
        return tensor.reshape(out, width // size, size)

    def dequantize(self) -> torch.Tensor:
        zero = None if self.zero is None else self.zero.unsqueeze(-1)
        return decode(self._grouped(self.codes), self.scale.unsqueeze(-1), zero, self.fmt).reshape(self.codes.shape)


def round_to_nearest(weight: torch.Tensor, fmt: StorageGrid, scale_dtype: torch.dtype) -> QuantizedWeight:
    """Group-wise round-to-nearest of a (out, in) weight onto `fmt`; its group size must divide `in`."""
    out, width = weight.shape
    size = width if fmt.group_size is None else fmt.group_size
    if width % size:
        raise ValueError(f"group size {size} does not divide the input width {width}")
    groups = weight.float().reshape(out, width // size, size)
    scale, zero = grid_params(groups, fmt, scale_dtype)
    codes = quantize_codes(groups, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), fmt)
    return QuantizedWeight(codes.reshape(out, width), scale, zero, fmt)
