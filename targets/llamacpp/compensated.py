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

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np
import torch

from search_spaces.quantization.gptq_solver import inverse_hessian_factor, one_thread, without_dead_inputs
from targets.llamacpp import ggml_quants
from targets.llamacpp.block_formats import COMPENSABLE, IQ4_LEVELS, block_format
from targets.llamacpp.quantize import default_threads

SUFFIX = "+gptq"
DAMP = 0.01  # of H's mean diagonal, added to its diagonal (GPTQ's default)
# ggml's Q4_0/Q4_1/Q5_0/Q5_1 quantizers weigh a block's errors by the whole row's mean square as well as by the
# importance (quantize_row_q4_0_impl's sigma2); a block quantized on its own, as here, uses its own. Quantizing the
# whole row as it stands at every block instead cost 3-14x the time (quadratic in the width) and changed the output
# error by under 0.5% (measured on the float benchmark model's layers).
ROW_STATISTICS = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1"})
LAZY_COLUMNS = 256  # columns rounded before the columns after them are updated at once (a multiple of 32 and 256)


Item = TypeVar("Item")
Result = TypeVar("Result")


def concurrently(work: Callable[[Item], Result], items: Iterable[Item], threads: int | None = None) -> list[Result]:
    """`work` of each item, `threads` items (the process's CPUs) at once: a tensor's column loop runs on one
    thread (thousands of tiny ops), and llama.cpp's quantizer and torch's kernels run without the GIL, so several
    tensors round side by side. torch stays single-threaded throughout (the loops' own `one_thread` would
    otherwise restore each other's thread counts out of order)."""
    items = list(items)
    with one_thread(), ThreadPoolExecutor(max(1, min(threads or default_threads(), len(items) or 1))) as pool:
        return list(pool.map(work, items))


def layer_by_layer(work: Callable[[Item], Result], items: Iterable[Item], layer: Callable[[Item], object],
                   threads: int | None = None, done: Callable[[], None] | None = None,
                   size: Callable[[Item], float] | None = None) -> list[Result]:
    """`concurrently`, the items of one `layer(item)` side by side and one layer at a time (in the order the
    layers first appear; within one, by `size` descending where given), `done()` after each: what a layer's
    rounding needs (its inputs' Hessian factors, a `FactorCache`: tens to hundreds of MB each on a 1B model)
    lives only while that layer is rounded. Results in the items' order."""
    items = list(items)
    groups: dict[object, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(layer(item), []).append(index)
    if size is not None:  # the longest first: the others fill the other threads while it runs
        groups = {key: sorted(indices, key=lambda i: -size(items[i])) for key, indices in groups.items()}
    results: dict[int, Result] = {}
    for indices in groups.values():
        results.update(zip(indices, concurrently(work, [items[i] for i in indices], threads)))
        if done is not None:
            done()
    return [results[i] for i in range(len(items))]


def block_of(gguf_name: str) -> str:
    """The decoder block a GGUF tensor belongs to ("blk.3"), or its own name outside the blocks."""
    parts = gguf_name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blk" else gguf_name


class FactorCache:
    """`hessian_factor` of each input covariance, computed once for the tensors reading that input and kept until
    `clear`. The rounding threads ask at once: a thread asking for one input's factor waits only while that one
    is computed (an MLP's down projection input, 8192 wide on a 1B model, takes seconds), not for another input's."""

    def __init__(self, damp: float = DAMP):
        self.damp, self._lock = damp, threading.Lock()
        # id -> [the covariance (kept alive so the id stays its own), its own lock, its factor once computed]
        self._factors: dict[int, list] = {}

    def __call__(self, covariance: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            entry = self._factors.setdefault(id(covariance), [covariance, threading.Lock(), None])
        with entry[1]:
            if entry[2] is None:
                entry[2] = hessian_factor(covariance, self.damp)
            return entry[2]

    def clear(self) -> None:
        with self._lock:
            self._factors.clear()


class FactorStore:
    """Hessian factors kept on disk per GGUF tensor, so what the sensitivity tables computed for a shape is read
    back by its trials instead of recomputed (with the input covariances behind it: on a 1B model the factors and
    the calibration pass behind them were about 40% of a llama-quant trial, measured). Bit for bit what
    `hessian_factor` returned (float32, the upper triangle packed row by row, with the dead inputs): a rebuild
    from the store writes the blocks a rebuild from the covariance would. Tensors reading one input (q/k/v,
    gate/up) share one file (hard links). About half the bytes of the covariances: 2.6 GB for a 1.24 B
    Llama's shape."""

    def __init__(self, folder: Path | None):
        self.folder = None if folder is None else Path(folder)
        self._lock = threading.Lock()
        self._written: dict[int, tuple[weakref.ref, Path]] = {}  # id(factor) -> (a weak reference to it, its file)

    def _file(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def has(self, name: str) -> bool:
        return self.folder is not None and self._file(name).is_file()

    def load(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.has(name):
            return None
        with np.load(self._file(name)) as stored:
            packed, dead = stored["upper"], stored["dead"]
        factor = np.zeros((len(dead), len(dead)), dtype=np.float32)
        factor[_upper(len(dead))] = packed
        return torch.from_numpy(factor), torch.from_numpy(dead)

    def save(self, name: str, factor: tuple[torch.Tensor, torch.Tensor]) -> None:
        """`factor` (a `hessian_factor`) as tensor `name`'s; the same factor object saved before (another tensor
        of that input) is linked, not written again. Written to a temporary name and renamed: workers sharing the
        cache never read half a file."""
        if self.folder is None:
            return
        with self._lock:  # one save at a time: the threads saving one input's tensors side by side link one file
            if not self.has(name):
                self._save(name, factor)

    def _save(self, name: str, factor: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._file(name)
        earlier = self._written.get(id(factor[0]))
        if earlier is not None and earlier[0]() is factor[0] and earlier[1].is_file():
            try:
                os.link(earlier[1], target)
                return
            except FileExistsError:
                return
            except OSError:
                pass  # a file system without hard links: written again below
        upper, dead = (t.detach().cpu().numpy() for t in factor)
        packed = upper[_upper(len(upper))].astype(np.float32, copy=False)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(partial, "wb") as out:
            np.savez(out, upper=packed, dead=np.asarray(dead, dtype=bool))
        os.replace(partial, target)
        self._written[id(factor[0])] = (weakref.ref(factor[0]), target)


def _upper(width: int) -> np.ndarray:
    """The upper triangle's mask: indexing with it packs row by row (row i: columns i..width-1), and back."""
    return np.triu(np.ones((width, width), dtype=bool))


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
    of tiny ops whatever the rows: rounded together, K types cost about what one does; 32- and 256-wide blocks
    share the loop, each type's scales fixed when the loop reaches one of its blocks). Uniform types' codes are
    levels lo..hi (rounded and clamped), IQ4's the nearest of its table (bucketed); the loop works in level values
    and each type's codes are looked up when its block is done."""

    def __init__(self, kinds: list[str], rows: int):
        kinds = sorted(kinds, key=lambda k: block_format(k).levels is IQ4_LEVELS)  # the table types last
        self.kinds, self.rows = kinds, rows
        self.formats = [block_format(k) for k in kinds]
        self.block_sizes = sorted({f.block for f in self.formats})
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

    def of_block(self, block: int) -> list[int]:
        """The types (their indices) stored in `block`-wide blocks."""
        return [i for i, f in enumerate(self.formats) if f.block == block]

    def rows_of(self, index: int) -> slice:
        return slice(index * self.rows, (index + 1) * self.rows)

    def levels(self, values: torch.Tensor, inverse_step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Per row the level whose value ``step * level + offset`` is nearest `values` (any sign of step;
        `inverse_step` is 0 where a step is: such a sub-block decodes every level to the offset, and takes
        level 0, or the table's nearest 0)."""
        position = (values - offset) * inverse_step
        level = torch.clamp(torch.round(position), self.low, self.high)
        if self.table_from is not None:
            level[self.table_from:] = self.table[torch.bucketize(position[self.table_from:], self.midpoints)]
        return level

    def scales(self, index: int, columns: torch.Tensor, importance: np.ndarray, step: torch.Tensor,
               offset: torch.Tensor, inverse: torch.Tensor) -> np.ndarray:
        """llama.cpp's blocks of type `index`'s rows of `columns` (block x stacked rows); each weight's step, offset
        and inverse step (0 for a zero step: `levels`) written into `step`, `offset`, `inverse` (block x stacked
        rows) at its rows."""
        fmt, rows = self.formats[index], self.rows_of(index)
        blocks = ggml_quants.quantize(self.kinds[index], columns[:, rows].t().numpy(), importance, threads=1)
        steps, offsets = (torch.from_numpy(np.repeat(a, fmt.sub, axis=1).T) for a in fmt.steps(blocks))
        step[:, rows], offset[:, rows] = steps, offsets
        inverse[:, rows] = torch.where(steps == 0, 0.0, 1 / steps)
        return blocks

    def codes(self, index: int, levels: torch.Tensor) -> np.ndarray:
        """Type `index`'s codes (rows x block) of its rows' level values (block x stacked rows)."""
        lowest, lookup = self.code_of[index]
        return lookup[levels[:, self.rows_of(index)].t().numpy().astype(np.int64) - lowest]


@torch.no_grad()
@one_thread()
def compensated_rounds(weight: np.ndarray, covariance: np.ndarray | torch.Tensor, kinds, importance=None,
                       damp: float = DAMP, factor: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> dict[str, np.ndarray]:
    """`compensated_round` of one weight in each of `kinds`, rounded together in one column loop."""
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
    out = _round_stack(weight, _Stack(list(dict.fromkeys(kinds)), rows), factor, dead, importance)
    return {kind: out[kind] for kind in kinds}


def _round_stack(weight: np.ndarray, stack: _Stack, factor: torch.Tensor, dead: torch.Tensor,
                 importance: np.ndarray) -> dict[str, np.ndarray]:
    rows, width = weight.shape
    work = torch.from_numpy(weight).t().repeat(1, len(stack.kinds)).contiguous()  # W^T once per type, side by side
    work[dead] = 0  # an input never active: its weights do not matter (and H's factor ignores them)
    out = {k: np.empty((rows, width // f.block * f.block_bytes), dtype=np.uint8)
           for k, f in zip(stack.kinds, stack.formats)}
    groups = {block: stack.of_block(block) for block in stack.block_sizes}
    lazy = max(stack.block_sizes[-1], LAZY_COLUMNS // stack.block_sizes[-1] * stack.block_sizes[-1])
    blocks: dict[int, np.ndarray] = {}  # per type, llama.cpp's block being rounded
    for start in range(0, width, lazy):
        end = min(start + lazy, width)
        chunk = work[start:end].clone()
        errors, levels = torch.empty_like(chunk), torch.empty_like(chunk)
        step, offset = torch.empty_like(chunk), torch.empty_like(chunk)
        inverse = torch.empty_like(chunk)
        inverse_pivots = (1 / factor[start:end, start:end].diagonal()).tolist()
        for i in range(end - start):
            for block, members in groups.items():
                if i % block == 0:  # llama.cpp fixes these types' scales from the block's columns as compensated so far
                    at = slice(i, i + block)
                    for index in members:
                        blocks[index] = stack.scales(index, chunk[at], importance[start + i:start + i + block],
                                                     step[at], offset[at], inverse[at])
            levels[i] = stack.levels(chunk[i], inverse[i], offset[i])
            error = (chunk[i] - torch.addcmul(offset[i], step[i], levels[i])) * inverse_pivots[i]
            chunk[i + 1:].addr_(factor[start + i, start + i + 1:end], error, alpha=-1)
            errors[i] = error
            for block, members in groups.items():
                if (i + 1) % block == 0:  # these types' blocks are done: their codes written in
                    at = slice(i + 1 - block, i + 1)
                    for index in members:
                        fmt, kind = stack.formats[index], stack.kinds[index]
                        column = (start + i + 1 - block) // block * fmt.block_bytes
                        out[kind][:, column:column + fmt.block_bytes] = fmt.with_codes(
                            blocks[index], stack.codes(index, levels[at]))
        work[end:].addmm_(factor[start:end, end:].t(), errors, alpha=-1)
    return out


def output_error(weight: np.ndarray, restored: np.ndarray, covariance: np.ndarray | torch.Tensor) -> float:
    """``sum_rows e C e^T`` with e = weight - restored: the mean squared error of the projection's outputs over
    the calibration tokens whose input covariance is C (its diagonal alone gives llama.cpp's importance-weighted
    error)."""
    # the difference in float64 (weights and their rounding are close), the quadratic form in float32: a sum of
    # rows' non-negative terms, where float32 loses nothing that matters and is several times faster
    error = torch.from_numpy((np.asarray(weight, dtype=np.float64) - np.asarray(restored, dtype=np.float64))
                             .astype(np.float32))
    return float(((error @ torch.as_tensor(covariance, dtype=torch.float32)) * error).sum(dtype=torch.float64))
