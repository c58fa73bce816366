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

from search_spaces.quantization.gptq_solver import inverse_hessian_factor, one_thread, without_dead_inputs
from targets.llamacpp import ggml_quants
from targets.llamacpp.block_formats import COMPENSABLE, IQ4_LEVELS, block_format

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


def hessian_factor(covariance: np.ndarray | torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(the upper Cholesky factor of the damped H^-1, which inputs are never active) of an input covariance: what
    every type's compensated rounding of the tensors reading that input shares."""
    hessian, dead = without_dead_inputs(torch.as_tensor(covariance))
    return inverse_hessian_factor(hessian, damp), dead


def compensated_round(weight: np.ndarray, covariance: np.ndarray | torch.Tensor, kind: str,
                      importance: np.ndarray | None = None, damp: float = DAMP,
                      factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """The bytes (rows x row bytes, uint8) of `weight` (rows x width, float32) in GGML type `kind` with
    error-compensated codes; `covariance`: the mean of x x^T over the calibration tokens' inputs (width x width);
    `importance`: what llama.cpp's quantizer weighs each column by when it fixes a block's scales (the covariance's
    diagonal by default: the importance matrix); `factor`: `hessian_factor(covariance, damp)` when already known."""
    return compensated_rounds(weight, covariance, [kind], importance, damp, factor)[kind]


class _Stack:
    """Several types' roundings of one weight side by side, as rows of one matrix (their column loop is thousands
    of tiny ops whatever the rows: rounded together, K types cost about what one does). Uniform types' codes are
    levels lo..hi (rounded and clamped), IQ4's the nearest of its table (bucketed); the loop works in level values
    and each type's codes are looked up at the end."""

    def __init__(self, kinds: list[str], rows: int):
        kinds = sorted(kinds, key=lambda k: block_format(k).levels is IQ4_LEVELS)  # the table types last
        self.kinds, self.rows = kinds, rows
        self.formats = [block_format(k) for k in kinds]
        self.block = self.formats[0].block
        bounds = [(f.levels.min(), f.levels.max()) for f in self.formats]
        self.low = torch.tensor([b[0] for b in bounds for _ in range(rows)], dtype=torch.float32)
        self.high = torch.tensor([b[1] for b in bounds for _ in range(rows)], dtype=torch.float32)
        tables = [i for i, f in enumerate(self.formats) if f.levels is IQ4_LEVELS]
        self.table_from = tables[0] * rows if tables else None
        table = torch.from_numpy(IQ4_LEVELS.astype(np.float32))
        self.table, self.midpoints = table, (table[1:] + table[:-1]) / 2
        # per type, the code of each level value (offset by its least level)
        self.code_of = []
        for fmt in self.formats:
            lowest = int(fmt.levels.min())
            lookup = np.zeros(int(fmt.levels.max()) - lowest + 1, dtype=np.uint8)
            lookup[fmt.levels.astype(np.int64) - lowest] = np.arange(len(fmt.levels), dtype=np.uint8)
            self.code_of.append((lowest, lookup))

    def levels(self, values: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Per row the level whose value ``step * level + offset`` is nearest `values` (any sign of step; a zero
        step decodes every level to the offset: level 0, or the table's nearest 0)."""
        safe = torch.where(step == 0, torch.ones_like(step), step)
        position = torch.where(step == 0, torch.zeros_like(values), (values - offset) / safe)
        level = torch.minimum(torch.maximum(torch.round(position), self.low), self.high)
        if self.table_from is not None:
            tail = position[self.table_from:]
            level[self.table_from:] = self.table[torch.bucketize(tail, self.midpoints)]
        return level

    def scales(self, columns: torch.Tensor, importance: np.ndarray) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
        """llama.cpp's blocks of `columns` (block x stacked rows) per type, and each weight's step and offset
        (block x stacked rows)."""
        blocks, steps, offsets = [], [], []
        for index, (kind, fmt) in enumerate(zip(self.kinds, self.formats)):
            rows = slice(index * self.rows, (index + 1) * self.rows)
            blocks.append(ggml_quants.quantize(kind, columns[:, rows].t().numpy(), importance, threads=1))
            step, offset = fmt.steps(blocks[-1])
            steps.append(np.repeat(step, fmt.sub, axis=1))
            offsets.append(np.repeat(offset, fmt.sub, axis=1))
        return blocks, torch.from_numpy(np.concatenate(steps).T.copy()), torch.from_numpy(np.concatenate(offsets).T.copy())

    def codes(self, index: int, levels: torch.Tensor) -> np.ndarray:
        """Type `index`'s codes (rows x block) of its rows' level values (block x stacked rows)."""
        lowest, lookup = self.code_of[index]
        mine = levels[:, index * self.rows:(index + 1) * self.rows].t().numpy().astype(np.int64)
        return lookup[mine - lowest]


@torch.no_grad()
@one_thread()
def compensated_rounds(weight: np.ndarray, covariance: np.ndarray | torch.Tensor, kinds, importance=None,
                       damp: float = DAMP, factor: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> dict[str, np.ndarray]:
    """`compensated_round` of one weight in each of `kinds`, the types of one block size rounded together."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, width = weight.shape
    for kind in kinds:
        if width % block_format(kind).block:
            raise ValueError(f"{kind} stores rows in blocks of {block_format(kind).block}; a {width}-wide row does "
                             "not fit")
    if importance is None:
        importance = torch.as_tensor(covariance).diagonal().float().numpy()
    importance = np.ascontiguousarray(importance, dtype=np.float32)
    factor, dead = hessian_factor(covariance, damp) if factor is None else factor
    out = {}
    for block in sorted({block_format(k).block for k in kinds}):
        stack = _Stack([k for k in kinds if block_format(k).block == block], rows)
        out.update(_round_stack(weight, stack, factor, dead, importance))
    return {kind: out[kind] for kind in kinds}


def _round_stack(weight: np.ndarray, stack: _Stack, factor: torch.Tensor, dead: torch.Tensor,
                 importance: np.ndarray) -> dict[str, np.ndarray]:
    rows, width = weight.shape
    block = stack.block
    work = torch.from_numpy(weight).t().repeat(1, len(stack.kinds)).contiguous()  # W^T once per type, side by side
    work[dead] = 0  # an input never active: its weights do not matter (and H's factor ignores them)
    out = {k: np.empty((rows, width // block * f.block_bytes), dtype=np.uint8)
           for k, f in zip(stack.kinds, stack.formats)}
    lazy = max(block, LAZY_COLUMNS // block * block)
    for start in range(0, width, lazy):
        end = min(start + lazy, width)
        chunk = work[start:end].clone()
        errors = torch.empty_like(chunk)
        pivots = factor[start:end, start:end].diagonal().tolist()
        for first in range(0, end - start, block):
            # llama.cpp fixes this block's scales from its columns as compensated so far
            column0 = start + first
            blocks, steps, offsets = stack.scales(chunk[first:first + block], importance[column0:column0 + block])
            levels = torch.empty(block, chunk.shape[1])
            for i in range(first, first + block):
                step, offset = steps[i - first], offsets[i - first]
                levels[i - first] = stack.levels(chunk[i], step, offset)
                error = (chunk[i] - (step * levels[i - first] + offset)) / pivots[i]
                chunk[i:].addr_(factor[start + i, start + i:end], error, alpha=-1)
                errors[i] = error
            for index, (kind, fmt) in enumerate(zip(stack.kinds, stack.formats)):
                at = column0 // block * fmt.block_bytes
                out[kind][:, at:at + fmt.block_bytes] = fmt.with_codes(blocks[index], stack.codes(index, levels))
        work[end:].addmm_(factor[start:end, end:].t(), errors, alpha=-1)
    return out


def output_error(weight: np.ndarray, restored: np.ndarray, covariance: np.ndarray | torch.Tensor) -> float:
    """``sum_rows e C e^T`` with e = weight - restored: the mean squared error of the projection's outputs over
    the calibration tokens whose input covariance is C (its diagonal alone gives llama.cpp's importance-weighted
    error)."""
    error = torch.from_numpy(np.asarray(weight, dtype=np.float64) - np.asarray(restored, dtype=np.float64))
    return float(((error @ torch.as_tensor(covariance, dtype=torch.float64)) * error).sum())
