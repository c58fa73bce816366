"""The integer grid of weight-only quantization, shared by rtn and GPTQ.

Conventions are those of compressed-tensors (so a packed checkpoint decodes to exactly the weights
evaluated in memory): signed codes in [-2^(b-1), 2^(b-1) - 1]; a weight decodes to
``(code - zero_point) * scale``; symmetric grids have no zero point and
``scale = max|w| / ((2^b - 1) / 2)``; asymmetric grids stretch [min(w, 0), max(w, 0)] over all
2^b codes with an integer zero point. Every element is off by at most half a step (``scale / 2``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from search_spaces.quantization.methods.base import FLOAT_BITS

MIN_GROUP_SIZE = 32


@dataclass(frozen=True)
class StorageGrid:
    """The grid one layer's weight is stored on: bits (16 = float), effective group size, symmetric (no zero
    point) or offset. Scales are stored in the model's float dtype. Rounding algorithms (rtn, gptq) choose
    codes on it; the layer plan decides it."""

    bits: int
    group_size: int | None = None  # None: per output channel (ignored at 16 bits)
    symmetric: bool = True

    @property
    def is_float(self) -> bool:
        return self.bits >= FLOAT_BITS


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


def grid_params(values: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """(scale, zero_point) for each row of `values` reduced over its last dim; zero_point None if symmetric.

    The scale is rounded to the dtype the checkpoint stores it in before any code is computed, so the
    codes are the ones that decode correctly with the stored scale.
    """
    qmin, qmax = code_range(bits)
    low = values.amin(dim=-1).clamp(max=0)
    high = values.amax(dim=-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(-low, high) / ((qmax - qmin) / 2)
    else:
        scale = (high - low) / (qmax - qmin)
    scale = scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale_dtype).eps), scale)
    if symmetric:
        return scale, None
    zero = torch.clamp(torch.round(qmin - low / scale.to(low.dtype)), qmin, qmax).to(torch.int8)
    return scale, zero


def quantize_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """int8 codes of `values` on the grid (scale and zero broadcast against values)."""
    qmin, qmax = code_range(bits)
    scaled = values / scale.to(values.dtype)
    if zero is not None:
        scaled = scaled + zero.to(values.dtype)
    return torch.clamp(torch.round(scaled), qmin, qmax).to(torch.int8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Float weights of codes, computed as compressed-tensors' dequantize does (in the scale's dtype)."""
    values = codes.to(scale.dtype)
    if zero is not None:
        values = values - zero.to(scale.dtype)
    return values * scale


@dataclass(frozen=True)
class QuantizedWeight:
    """A (out, in) weight on the grid: int8 codes, (out, groups) scales and optional zero points."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int | None  # None: per output channel

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def _grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        out, width = self.codes.shape
        size = width if self.group_size is None else self.group_size
        return tensor.reshape(out, width // size, size)

    def dequantize(self) -> torch.Tensor:
        zero = None if self.zero is None else self.zero.unsqueeze(-1)
        return decode(self._grouped(self.codes), self.scale.unsqueeze(-1), zero).reshape(self.codes.shape)


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                     scale_dtype: torch.dtype) -> QuantizedWeight:
    """Group-wise round-to-nearest of a (out, in) weight; group_size must divide `in` (None: per channel)."""
    out, width = weight.shape
    size = width if group_size is None else group_size
    if width % size:
        raise ValueError(f"group size {size} does not divide the input width {width}")
    groups = weight.float().reshape(out, width // size, size)
    scale, zero = grid_params(groups, bits, symmetric, scale_dtype)
    codes = quantize_codes(groups, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1), bits)
    return QuantizedWeight(codes.reshape(out, width), scale, zero, bits, group_size)
