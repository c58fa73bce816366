"""Error-compensated rounding (GPTQ, Frantar et al. 2022) onto llama.cpp's own block types, written bit-exact.

llama.cpp rounds every block on its own: importance-weighted round-to-nearest with a searched scale (and minimum).
Here the columns of a weight (its input features) are rounded left to right and each column's rounding error is
spread over the columns not yet rounded through the inverse of the input covariance H (Cholesky factor, lazy
batches), so the projection's output error on the calibration activations, ``sum_rows e H e^T``, is what is
minimised, not each block's own error. The blocks are llama.cpp's: when the rounding reaches a block, llama.cpp's
quantizer (`ggml_quants.quantize`, with the importance matrix) quantizes the block's columns as compensated so far,
which fixes its scales and minima (its super-block's d, dmin and 6-bit sub-block scales for K-quants); then each
column's codes are re-chosen against those scales as the compensation moves them, and written into the block
(`block_formats`), so the file holds a block llama.cpp wrote with other codes: stock llama.cpp reads it, and it
decodes to exactly the weights that were evaluated.

A type chosen this way is named ``<type>+gptq`` in allocation tables and recipes (`compensated_kind`).
"""
from __future__ import annotations

import numpy as np
import torch

from search_spaces.quantization.gptq_solver import inverse_hessian_factor, one_thread, without_dead_columns
from targets.llamacpp import ggml_quants
from targets.llamacpp.block_formats import COMPENSABLE, block_format

SUFFIX = "+gptq"
DAMP = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default)
# ggml's Q4_0/Q4_1/Q5_0/Q5_1 quantizers weigh a block's errors by the whole row's mean square as well as by the
# importance (quantize_row_q4_0_impl's sigma2); a block quantized on its own, as here, uses its own. Quantizing the
# whole row as it stands at every block instead cost 3-14x the time (quadratic in the width) and changed the output
# error by under 0.5% (measured on the float benchmark model's layers).
ROW_STATISTICS = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1"})
LAZY_COLUMNS = 256  # columns rounded before the columns after them are updated at once (a multiple of 32 and 256)


def compensated_kind(kind: str) -> str:
    return kind + SUFFIX


def base_kind(kind: str) -> str:
    """The GGML type of a table kind: "Q4_K+gptq" -> "Q4_K"."""
    return kind[:-len(SUFFIX)] if kind.endswith(SUFFIX) else kind


def is_compensated(kind: str) -> bool:
    return kind.endswith(SUFFIX)


def compensable(kind: str) -> bool:
    return kind in COMPENSABLE


def _nearest_codes(values: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor,
                   order: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """Per row the code whose value ``step * level + offset`` is nearest `values` (any sign of step; a zero step
    decodes every code to the offset: code of the level nearest 0)."""
    safe = torch.where(step == 0, torch.ones_like(step), step)
    position = torch.where(step == 0, torch.zeros_like(values), (values - offset) / safe)
    return order[torch.bucketize(position, midpoints)]


def hessian_factor(covariance: np.ndarray | torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(the upper Cholesky factor of the damped H^-1, which inputs are never active) of an input covariance: what
    every type's compensated rounding of the tensors reading that input shares."""
    hessian = torch.as_tensor(covariance, dtype=torch.float32)
    dead = hessian.diagonal() == 0
    _, hessian = without_dead_columns(torch.zeros(hessian.shape[0], 1), hessian)
    return inverse_hessian_factor(hessian, damp), dead


@torch.no_grad()
@one_thread()
def compensated_round(weight: np.ndarray, covariance: np.ndarray | torch.Tensor, kind: str,
                      importance: np.ndarray | None = None, damp: float = DAMP,
                      factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """The bytes (rows x row bytes, uint8) of `weight` (rows x width, float32) in GGML type `kind` with
    error-compensated codes; `covariance`: the mean of x x^T over the calibration tokens' inputs (width x width);
    `importance`: what llama.cpp's quantizer weighs each column by when it fixes a block's scales (the covariance's
    diagonal by default: the importance matrix); `factor`: `hessian_factor(covariance, damp)` when already known."""
    fmt = block_format(kind)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, width = weight.shape
    if width % fmt.block:
        raise ValueError(f"{kind} stores rows in blocks of {fmt.block}; a {width}-wide row does not fit")
    if importance is None:
        importance = torch.as_tensor(covariance).diagonal().float().numpy()
    importance = np.ascontiguousarray(importance, dtype=np.float32)
    factor, dead = hessian_factor(covariance, damp) if factor is None else factor
    work = torch.from_numpy(weight).t().contiguous()
    work[dead] = 0  # an input never active: its weights do not matter (and H's factor ignores them)
    levels = torch.from_numpy(fmt.levels.astype(np.float32))
    sorted_levels, order = torch.sort(levels)
    midpoints = (sorted_levels[1:] + sorted_levels[:-1]) / 2
    out = np.empty((rows, width // fmt.block * fmt.block_bytes), dtype=np.uint8)
    lazy = max(fmt.block, LAZY_COLUMNS // fmt.block * fmt.block)
    for start in range(0, width, lazy):
        end = min(start + lazy, width)
        chunk = work[start:end].clone()
        errors = torch.empty_like(chunk)
        pivots = factor[start:end, start:end].diagonal().tolist()
        for first in range(0, end - start, fmt.block):
            # llama.cpp fixes this block's scales from its columns as compensated so far
            column0 = start + first
            data = ggml_quants.quantize(kind, chunk[first:first + fmt.block].t().numpy(),
                                        importance[column0:column0 + fmt.block], threads=1)
            steps, offsets = (torch.from_numpy(a) for a in fmt.steps(data))
            codes = torch.empty(fmt.block, rows, dtype=torch.int64)
            for i in range(first, first + fmt.block):
                sub = (i - first) // fmt.sub
                step, offset = steps[:, sub], offsets[:, sub]
                codes[i - first] = _nearest_codes(chunk[i], step, offset, levels, order, midpoints)
                value = step * levels[codes[i - first]] + offset
                error = (chunk[i] - value) / pivots[i]
                chunk[i:].addr_(factor[start + i, start + i:end], error, alpha=-1)
                errors[i] = error
            row_bytes = slice(column0 // fmt.block * fmt.block_bytes, (column0 + fmt.block) // fmt.block * fmt.block_bytes)
            out[:, row_bytes] = fmt.with_codes(data, codes.t().numpy().astype(np.uint8))
        work[end:].addmm_(factor[start:end, end:].t(), errors, alpha=-1)
    return out


def output_error(weight: np.ndarray, restored: np.ndarray, covariance: np.ndarray | torch.Tensor) -> float:
    """``sum_rows e C e^T`` with e = weight - restored: the mean squared error of the projection's outputs over
    the calibration tokens whose input covariance is C (its diagonal alone gives llama.cpp's importance-weighted
    error)."""
    error = torch.from_numpy(np.asarray(weight, dtype=np.float64) - np.asarray(restored, dtype=np.float64))
    return float(((error @ torch.as_tensor(covariance, dtype=torch.float64)) * error).sum())
