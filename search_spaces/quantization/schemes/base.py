"""The storage-scheme contract and its registry, and the grid a layer is stored on.

A storage scheme is the family of formats a deployment target reads (compressed-tensors for transformers and
vLLM, gguf for llama.cpp). It is one registered `StorageScheme` object that owns everything about storing a
layer on its grids: the bit-widths, group sizes and symmetries it holds, the grid a planned layer gets
(`layer_grid`), the arithmetic of scales, offsets, codes and decoding, the exact tensors a layer is stored as
(`layout`, `pack`) and the names of its grids (`label`, `spec_label`). Rounding algorithms (rtn, GPTQ) only
choose codes on whatever grid the plan gives them.

`StorageGrid.scheme` and `QuantSpec.grid` hold the scheme's name (they are stored in specs and recipes);
behaviour is looked up once through the registry (`StorageGrid.storage_scheme`, `scheme_named`).

The abstract core is `layout` and `pack`; the hooks default to a plain integer grid: signed codes in
[-2^(b-1), 2^(b-1) - 1], a weight decoding to ``(code - zero_point) * scale`` with scales in the model's
float dtype, symmetric grids ``scale = max|w| / ((2^b - 1) / 2)`` without a zero point, offset grids
stretching [min(w, 0), max(w, 0)] over all 2^b codes with an integer zero point. Every scale (and offset) is
rounded to the dtype it is stored in before any code is computed, so the codes are the ones that decode
correctly with the stored scale.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from search_spaces.base import Registry
from search_spaces.quantization.constants import DEFAULT_GRID, FLOAT_BITS, GROUP_SIZES, MIN_GROUP_SIZE
from search_spaces.specs import SpecError, shown

if TYPE_CHECKING:  # annotations only: the spec module validates against this registry
    from search_spaces.quantization.spec import QuantSpec

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # stored tensor name -> (shape, dtype)


@dataclass(frozen=True)
class StorageGrid:
    """The grid one layer's weight is stored on: bits (16 = float), effective group size, symmetric (no zero
    point) or offset, and the name of its storage scheme. Rounding algorithms (rtn, gptq) choose codes on it;
    the layer plan decides it."""

    bits: int
    group_size: int | None = None  # None: per output channel (ignored at 16 bits)
    symmetric: bool = True
    scheme: str = DEFAULT_GRID

    @property
    def is_float(self) -> bool:
        return self.bits >= FLOAT_BITS

    @property
    def storage_scheme(self) -> "StorageScheme":
        return scheme_named(self.scheme)

    @property
    def label(self) -> str:
        """The scheme's name for this grid (e.g. GGUF's tensor type Q4_0); F16 for a 16-bit layer."""
        return "F16" if self.is_float else self.storage_scheme.label(self)

    @property
    def gguf_type(self) -> str:
        """The GGUF writer's tensor type: on a gguf grid, its label."""
        return self.label


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
        decoded = self.fmt.storage_scheme.decode(self._grouped(self.codes), self.scale.unsqueeze(-1), zero, self.fmt)
        return decoded.reshape(self.codes.shape)


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


class StorageScheme(abc.ABC):
    name: ClassVar[str]
    # The artifact formats that can hold layers on its grids (e.g. "compressed-tensors", "gguf"): a deployment
    # target ships some formats (targets.base.Target.artifacts), and a study whose grid none of them holds is
    # refused before anything runs.
    artifacts: ClassVar[frozenset[str]]
    bits: ClassVar[tuple[int, ...]]  # integer bit-widths its grids hold (16, a float layer, always is)
    group_sizes: ClassVar[tuple[int | None, ...]] = GROUP_SIZES  # what a spec may ask for (None: per channel)
    symmetric: ClassVar[tuple[bool, ...]] = (True, False)  # symmetric grids, offset grids

    @property
    def stored_bits(self) -> tuple[int, ...]:
        """Every bit-width a layer on this scheme may have, 16 (float) included."""
        return tuple(self.bits) + (FLOAT_BITS,)

    @abc.abstractmethod
    def layout(self, out_features: int, in_features: int, fmt: StorageGrid, dtype: torch.dtype) -> Layout:
        """Name -> (shape, dtype) of every tensor stored for a layer's weight on `fmt` (the exact size)."""

    @abc.abstractmethod
    def pack(self, quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The tensors a layer is stored as, exactly as the artifact holds them (checked against `layout`)."""

    def layer_grid(self, bits: int, in_features: int, group_size: int | None, symmetric: bool) -> StorageGrid:
        """The grid of a layer of this input width asked for at `bits` below 16: the requested group size,
        halved to fit the width; stored in float where no group size this scheme holds fits (the plan says
        so in the storage notes)."""
        size = effective_group_size(in_features, group_size)
        if size not in self.group_sizes:
            return StorageGrid(FLOAT_BITS)
        return StorageGrid(bits, size, symmetric, self.name)

    def code_range(self, fmt: StorageGrid) -> tuple[int, int]:
        return code_range(fmt.bits)

    def params(self, values: torch.Tensor, fmt: StorageGrid, scale_dtype: torch.dtype):
        """(scale, offset) for each row of `values` reduced over its last dim (offset None on a symmetric
        grid); `scale_dtype` is the model's float dtype."""
        qmin, qmax = self.code_range(fmt)
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

    def codes(self, values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
              fmt: StorageGrid) -> torch.Tensor:
        """int8 codes of `values` on the grid, rounded to nearest (scale and offset broadcast against values)."""
        qmin, qmax = self.code_range(fmt)
        scaled = values / scale.to(values.dtype)
        if offset is not None:
            scaled = scaled + offset.to(values.dtype)
        return torch.clamp(torch.round(scaled), qmin, qmax).to(torch.int8)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
               fmt: StorageGrid) -> torch.Tensor:
        """Float weights of codes, computed as the format's own dequantizer does (here in the scale's dtype)."""
        values = codes.to(scale.dtype)
        if offset is not None:
            values = values - offset.to(scale.dtype)
        return values * scale

    def label(self, fmt: StorageGrid) -> str:
        """A short name of an integer grid of this scheme."""
        return f"{fmt.bits}-bit/{fmt.group_size or 'channel'}{'' if fmt.symmetric else '/asym'}"

    def spec_label(self, spec: "QuantSpec", grid_fallback: bool) -> list[str]:
        """Words of a grid method's spec label after its name: bits per group, then the grid's settings;
        `grid_fallback` marks a group size some layers cannot use ('g128*')."""
        words = [spec.bits_label()]
        if spec.integer_bits():
            fallback = "*" if grid_fallback else ""
            words.append("per-channel" if spec.group_size is None else f"g{spec.group_size}{fallback}")
            if not spec.symmetric:
                words.append("asym")
        return words


# A plug-in package's schemes are this entry-point group's (the project's own: an import in schemes/__init__.py).
STORAGE_SCHEMES: Registry = Registry("storage scheme", plugins="planner.storage_schemes")
register_scheme = STORAGE_SCHEMES.add


def scheme_named(name: str) -> StorageScheme:
    try:
        return STORAGE_SCHEMES[name]
    except KeyError:
        raise SpecError(f"unknown storage scheme {name!r} (known: {shown(tuple(STORAGE_SCHEMES))})") from None
