"""The integer grids of weight-only quantization, shared by rtn and GPTQ.

A grid (`StorageGrid`) belongs to a storage scheme, the family of formats a deployment target reads; each
scheme is one registered object (`schemes/`: compressed-tensors for transformers and vLLM, gguf for
llama.cpp) that owns its scales, offsets, codes and decoding. The functions here dispatch to the grid's
scheme, so the rounding algorithms never name one.
"""
from __future__ import annotations

import torch

from search_spaces.quantization.schemes import STORAGE_SCHEMES, QuantizedWeight, StorageGrid, scheme_named
from search_spaces.quantization.schemes.base import code_range, effective_group_size
from search_spaces.quantization.schemes.compressed_tensors import COMPRESSED_TENSORS_SCHEME
from search_spaces.quantization.schemes.gguf import GGUF_SCHEME

# The built-in schemes' names, as specs and recipes store them.
COMPRESSED_TENSORS_GRID = COMPRESSED_TENSORS_SCHEME.name
GGUF_GRID = GGUF_SCHEME.name

__all__ = ["COMPRESSED_TENSORS_GRID", "GGUF_GRID", "STORAGE_SCHEMES", "QuantizedWeight", "StorageGrid",
           "code_range", "decode", "effective_group_size", "grid_params", "quantize_codes", "round_to_nearest",
           "scheme_named"]


def grid_params(values: torch.Tensor, fmt: StorageGrid, scale_dtype: torch.dtype):
    """(scale, offset) for each row of `values` reduced over its last dim: the offset is compressed-tensors'
    integer zero point, GGUF's float minimum, or None on a symmetric grid. `scale_dtype` is the model's float
    dtype (the scheme decides whether it stores scales in it)."""
    return fmt.storage_scheme.params(values, fmt, scale_dtype)


def quantize_codes(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                   fmt: StorageGrid) -> torch.Tensor:
    """int8 codes of `values` on the grid (scale and offset broadcast against values)."""
    return fmt.storage_scheme.codes(values, scale, offset, fmt)


def decode(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, fmt: StorageGrid) -> torch.Tensor:
    """Float weights of codes, computed as the format's own dequantizer does."""
    return fmt.storage_scheme.decode(codes, scale, offset, fmt)


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
