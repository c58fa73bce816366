"""GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained
Transformers") on plain torch, decoder layer by decoder layer.

For each decoder block, the inputs its linear layers see on calibration text (from the training
split) give each layer a Hessian H = 2 X^T X / n; the layer's columns are then rounded one at a time
onto the same grid as rtn (`grid`), each rounding error being spread over the columns not yet
rounded through the inverse Hessian's Cholesky factor (lazy block updates). By default columns go in
order of decreasing H diagonal ("act order") with group scales fixed up front, which keeps the stored
groups in column order (no g_idx: compressed-tensors dropped it). The block's outputs are then
recomputed with its quantized weights and feed the next block, so later blocks compensate earlier
errors too. Layers reading the same input (q/k/v, gate/up) share one Hessian and are rounded together.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from search_spaces.layers import decoder_layers, weight_out_in
from search_spaces.quantization.grid import QuantizedWeight, StorageGrid, decode, grid_params, quantize_codes
from search_spaces.quantization.modules import install_layer, install_quantized
from search_spaces.quantization.plan import LayerPlan
from search_spaces.quantization.spec import GPTQSettings

MAX_CHUNK = 8  # calibration windows per forward
DAMP_RETRIES = 5  # each retry multiplies the damping by 10 when H is not positive definite


# ---------------------------------------------------------------------------------------------------
# One weight matrix
# ---------------------------------------------------------------------------------------------------


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U) after dampening H's diagonal (more damping if H is not PD).

    One Cholesky factorisation and one triangular inverse (LAPACK trtri), about half the work of inverting H and
    factoring the inverse (GPTQ's reference code; on a 1B model's 8192-wide MLP input that was seconds a layer):
    with J the order-reversing permutation and J H J = M M^T (M lower), H^-1 = (J M^-1 J)^T (J M^-1 J), and
    J M^-1 J is upper triangular with a positive diagonal: the factor itself."""
    from scipy.linalg import lapack

    mean_diag = hessian.diagonal().mean()
    for attempt in range(DAMP_RETRIES):
        damped = hessian.flip(0, 1)  # J H J (a copy)
        damped.diagonal().add_(damp * 10 ** attempt * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse, info = lapack.strtri(lower.cpu().numpy(), lower=1) if lower.dtype == torch.float32 \
                else lapack.dtrtri(lower.double().cpu().numpy(), lower=1)
            if info == 0:
                return torch.from_numpy(np.tril(inverse)).to(hessian.dtype).to(hessian.device).flip(0, 1)
    raise RuntimeError(f"GPTQ: the Hessian stays singular even with damping {damp * 10 ** DAMP_RETRIES:g}")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The column loop is thousands of tiny ops: extra threads only add synchronisation, and on a busy
    machine their spin-waits made it up to 50x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def without_dead_inputs(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a float copy of H whose never-active inputs have diagonal 1, so it stays invertible; which inputs those
    are): their weights are irrelevant, and the callers set them to 0."""
    hessian = hessian.float().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    return hessian, dead


def _group_params(work_t: torch.Tensor, size: int, fmt: StorageGrid, scale_dtype: torch.dtype):
    """Scales (groups, out) and offsets of W^T's groups of `size` rows, from their current values."""
    params = [grid_params(work_t[g:g + size].t(), fmt, scale_dtype) for g in range(0, work_t.shape[0], size)]
    scales = torch.stack([p[0] for p in params])
    return scales, None if fmt.symmetric else torch.stack([p[1] for p in params])


@torch.no_grad()
@one_thread()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, fmt: StorageGrid, scale_dtype: torch.dtype,
               damp: float = 0.01, block_size: int = 128, act_order: bool = True) -> QuantizedWeight:
    """GPTQ of a (out, in) weight given its (in, in) input Hessian onto the grid `fmt`, whose group size must
    divide `in`.

    With `act_order`, columns are rounded in order of decreasing Hessian diagonal (most used inputs
    first) and group scales are fixed from the original weights ("static groups"), so the stored
    format keeps its groups in column order; without it, columns go left to right and each group's
    scale is taken from its error-compensated columns when the group is reached.
    """
    hessian, dead = without_dead_inputs(hessian)
    work = weight.detach().float().t().contiguous()  # W^T: the column being rounded is a contiguous row
    work[dead] = 0
    width, out = work.shape
    group_size, symmetric = fmt.group_size, fmt.symmetric
    size = width if group_size is None else group_size
    if width % size:
        raise ValueError(f"group size {size} does not divide the input width {width}")

    static = act_order or group_size is None  # per channel: one scale per row, from the whole row
    if static:
        scales, zeros = _group_params(work, size, fmt, scale_dtype)
    else:
        probe = grid_params(work[:size].t(), fmt, scale_dtype)  # the dtypes this grid stores its scales and offsets in
        scales = torch.empty(width // size, out, dtype=probe[0].dtype, device=work.device)
        zeros = None if symmetric else torch.empty(width // size, out, dtype=probe[1].dtype, device=work.device)
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order \
        else torch.arange(width, device=work.device)
    work, hessian = work[order], hessian[order][:, order]
    group_of = (order // size).tolist()
    factor = inverse_hessian_factor(hessian, damp)

    codes = torch.empty(width, out, dtype=torch.int8, device=work.device)  # in processing order
    # Without act order, blocks hold whole groups so a group's scale sees its compensated columns.
    block = size * max(1, block_size // size) if not static else block_size
    for start in range(0, width, block):
        end = min(start + block, width)
        chunk = work[start:end].clone()
        errors = torch.empty_like(chunk)
        factor_block = factor[start:end, start:end]
        pivots = factor_block.diagonal().tolist()
        for i in range(end - start):
            column, group = start + i, group_of[start + i]
            if not static and column % size == 0:
                scales[group], zero = grid_params(chunk[i:i + size].t(), fmt, scale_dtype)
                if zeros is not None:
                    zeros[group] = zero
            scale, zero = scales[group], None if zeros is None else zeros[group]
            codes[column] = quantize_codes(chunk[i], scale, zero, fmt)
            error = (chunk[i] - decode(codes[column], scale, zero, fmt)) / pivots[i]
            chunk[i:].addr_(factor_block[i, i:], error, alpha=-1)
            errors[i] = error
        work[end:].addmm_(factor[start:end, end:].t(), errors, alpha=-1)
    in_column_order = torch.empty_like(codes)
    in_column_order[order] = codes
    return QuantizedWeight(in_column_order.t().contiguous(), scales.t().contiguous(),
                           None if zeros is None else zeros.t().contiguous(), fmt)


def _split_rows(quantized: QuantizedWeight, rows: list[int]) -> list[QuantizedWeight]:
    pieces = zip(quantized.codes.split(rows), quantized.scale.split(rows),
                 quantized.zero.split(rows) if quantized.zero is not None else [None] * len(rows))
    return [QuantizedWeight(c, s, z, quantized.fmt) for c, s, z in pieces]


# ---------------------------------------------------------------------------------------------------
# Calibration statistics of one decoder block
# ---------------------------------------------------------------------------------------------------


class _InputStats:
    """Running X^T X over the calibration tokens one input tensor carried (shared by layers reading it)."""

    def __init__(self):
        self.xtx: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        product = x.T @ x
        self.xtx = product if self.xtx is None else self.xtx.add_(product)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2 / self.tokens)


class _StopForward(Exception):
    pass


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple[tuple, dict]]:
    """(hidden states, (other positional args, keyword args)) of a block call."""
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, (tuple(args[1:]), kwargs)


def _block_inputs(model: nn.Module, blocks: nn.ModuleList, chunks: list[torch.Tensor]):
    """Hidden states entering the first block for every chunk, and each block's other arguments.

    The other arguments (position embeddings, masks) depend only on the sequence length, the same for
    every chunk (and broadcast over the batch), so one full forward of a single window records them for
    every block: some models (e.g. Gemma's sliding-window layers) pass different masks to different
    blocks. The chunks themselves stop at the first block.
    """
    calls: dict[int, tuple[tuple, dict]] = {}
    hidden_states: list[torch.Tensor] = []

    def recorder(index):
        def hook(module, args, kwargs):
            calls[index] = _split_call(args, kwargs)[1]
        return hook

    def first_block(module, args, kwargs):
        hidden_states.append(_split_call(args, kwargs)[0])
        raise _StopForward

    _forward_with_hooks(model, chunks[0][:1], blocks, recorder)
    for chunk in chunks:
        _forward_with_hooks(model, chunk, blocks[:1], lambda index: first_block)
    return hidden_states, calls


def _forward_with_hooks(model: nn.Module, input_ids: torch.Tensor, blocks, make_hook) -> None:
    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _run_block(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    output = block(hidden, *args, **kwargs)
    return output[0] if isinstance(output, (tuple, list)) else output


def _collect_stats(block: nn.Module, modules: dict[str, nn.Module], hidden_states: list[torch.Tensor],
                   call: tuple[tuple, dict]) -> dict[str, _InputStats]:
    """Each module's input statistics over the calibration chunks; modules fed the same tensor share one."""
    stats_of: dict[str, _InputStats] = {}
    seen: list[tuple[torch.Tensor, _InputStats]] = []  # inputs of the current chunk (kept alive: identity test)

    def observer(name):
        def hook(module, inputs, output):
            x = inputs[0]
            match = next((stats for ref, stats in seen if ref is x), None)
            stats = stats_of.setdefault(name, match or _InputStats())
            if stats is not match:
                stats.add(x)
                seen.append((x, stats))
        return hook

    handles = [module.register_forward_hook(observer(name)) for name, module in modules.items()]
    try:
        for hidden in hidden_states:
            seen.clear()
            _run_block(block, hidden, call)
    finally:
        for handle in handles:
            handle.remove()
    return stats_of


# ---------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------


def _joint_sets(plans: Iterable[LayerPlan], stats_of: dict[str, _InputStats]) -> list[list[LayerPlan]]:
    """Layers that read the same input and share a format: quantized together as one taller matrix."""
    sets: dict[tuple, list[LayerPlan]] = defaultdict(list)
    for plan in plans:
        sets[(id(stats_of[plan.name]), plan.fmt)].append(plan)
    return list(sets.values())


@torch.no_grad()
def gptq_build(model: nn.Module, plans: list[LayerPlan], settings: GPTQSettings, calibration: torch.Tensor,
               progress: bool = False) -> None:
    """Quantize the planned decoder-block layers of `model` in place with GPTQ (16-bit ones are rounded).

    `calibration` is a (samples, seq_len) LongTensor of training-split tokens.
    """
    _, blocks = decoder_layers(model)
    modules = dict(model.named_modules())
    by_block: dict[int, list[LayerPlan]] = defaultdict(list)
    for plan in plans:
        by_block[plan.layer].append(plan)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        hidden_states, calls = _block_inputs(model, blocks, list(calibration.to(device).split(MAX_CHUNK)))
        indices = range(len(blocks))
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices, desc="GPTQ", unit="layer")
        for index in indices:
            block, call = blocks[index], calls[index]
            integer = [p for p in by_block.get(index, []) if p.quantized]
            if integer:
                stats_of = _collect_stats(block, {p.name: modules[p.name] for p in integer}, hidden_states, call)
                for joint in _joint_sets(integer, stats_of):
                    _quantize_jointly(joint, modules, stats_of[joint[0].name].hessian(), settings)
            for plan in by_block.get(index, []):
                if not plan.quantized:
                    install_layer(modules[plan.name], plan)
            hidden_states = [_run_block(block, hidden, call) for hidden in hidden_states]
    finally:
        model.train(was_training)


def _quantize_jointly(joint: list[LayerPlan], modules: dict[str, nn.Module], hessian: torch.Tensor,
                      settings: GPTQSettings) -> None:
    weights = [weight_out_in(modules[p.name]) for p in joint]
    fmt = joint[0].fmt
    quantized = gptq_round(torch.cat(weights), hessian, fmt, weights[0].dtype, settings.damp, settings.block_size, settings.act_order)
    for plan, piece in zip(joint, _split_rows(quantized, [w.shape[0] for w in weights])):
        install_quantized(modules[plan.name], piece)
