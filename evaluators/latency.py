"""Prefill and per-token decode latency of a causal LM under a fixed, recorded protocol.

One *run* prefills a random prompt of ``prompt_tokens`` tokens, then makes ``new_tokens`` decode steps.
A decode step is one forward of exactly one token through the KV cache (``past_key_values`` handed back
in), choosing the next token greedily, as ``generate()`` does. The prefill is timed once per run and
every decode step is timed on its own, so ``decode`` summarises ``repeats * new_tokens`` samples.
Warm-up runs are identical but unrecorded.

Timing is ``time.perf_counter`` on CPU and CUDA event pairs on CUDA (the only device-specific part,
kept in the two ``_*Timer`` classes). The result records everything that moves the numbers: thread
count, load average before and after, device and timer.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator, Sequence

import torch

from evaluators.runtime import check_context, inference_eval, model_device, random_prompt, require_int

# ---------------------------------------------------------------------------------------------------
# Protocol and results
# ---------------------------------------------------------------------------------------------------


EXTENSION = 4  # an unclear A/B verdict may be timed for up to this many times the protocol's rounds


@dataclass(frozen=True)
class LatencyProtocol:
    prompt_tokens: int = 128
    new_tokens: int = 32
    warmup: int = 2
    repeats: int = 7
    threads: int | None = None  # None: leave torch's current intra-op thread count alone
    seed: int = 0
    # Rounds an A/B timing may run to while its verdict against a budget is unclear (its interval straddles
    # the budget); None: EXTENSION x repeats. Runtimes that time A/B use it (targets/llamacpp).
    max_repeats: int | None = None
    # Timed prefills of the prompt per run where a runtime prefills more than once (llama.cpp's A/B timing: the
    # last leads into the decode). None: the runtime's own count (targets.llamacpp.runtime.PREFILLS); a study
    # sets 1 where no prefill budget judges them (planner.budgets.with_prefills): at 1.24 B parameters the
    # extra prefills were 40% of a candidate's timing (docs/benchmarks.md section 20).
    prefills: int | None = None

    def __post_init__(self) -> None:
        require_int("prompt_tokens", self.prompt_tokens, 1)
        require_int("new_tokens", self.new_tokens, 1)
        require_int("warmup", self.warmup, 0)
        require_int("repeats", self.repeats, 1)
        if self.threads is not None:
            require_int("threads", self.threads, 1)
        require_int("seed", self.seed, 0)
        if self.max_repeats is not None:
            require_int("max_repeats", self.max_repeats, self.repeats)
        if self.prefills is not None:
            require_int("prefills", self.prefills, 1)

    @property
    def most_repeats(self) -> int:
        return self.max_repeats if self.max_repeats is not None else EXTENSION * self.repeats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencyProtocol":
        if not isinstance(data, dict):
            raise ValueError(f"LatencyProtocol.from_dict needs a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown LatencyProtocol keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class TimingStats:
    n: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    mean_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    if not samples:
        raise ValueError("percentile of an empty sample list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q!r}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def timing_stats(samples_ms: Sequence[float]) -> TimingStats:
    """Summarise millisecond samples; they must be finite and non-negative."""
    samples = [float(x) for x in samples_ms]
    if not samples:
        raise ValueError("timing_stats needs at least one sample")
    if not all(math.isfinite(x) and x >= 0 for x in samples):
        raise ValueError("timing samples must be finite, non-negative milliseconds")
    return TimingStats(
        n=len(samples),
        min_ms=min(samples),
        p50_ms=percentile(samples, 50),
        p90_ms=percentile(samples, 90),
        mean_ms=sum(samples) / len(samples),
    )


@dataclass(frozen=True)
class LatencyResult:
    protocol: LatencyProtocol
    device: str
    timer: str
    threads: int
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]
    prefill: TimingStats
    decode: TimingStats
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol.to_dict(),
            "device": self.device,
            "timer": self.timer,
            "threads": self.threads,
            "load_average_before": list(self.load_average_before),
            "load_average_after": list(self.load_average_after),
            "prefill": self.prefill.to_dict(),
            "decode": self.decode.to_dict(),
            "wall_seconds": self.wall_seconds,
        }


# ---------------------------------------------------------------------------------------------------
# Timers: the only device-specific code
# ---------------------------------------------------------------------------------------------------


class _PerfCounterTimer:
    name = "perf_counter"

    def time_ms(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        start = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - start) * 1e3


class _CudaEventTimer:
    name = "cuda_events"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def time_ms(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream(self.device)
        torch.cuda.synchronize(self.device)  # nothing queued earlier may leak into this interval
        start.record(stream)
        out = fn()
        end.record(stream)
        end.synchronize()
        return out, start.elapsed_time(end)


def _timer_for(device: torch.device) -> _PerfCounterTimer | _CudaEventTimer:
    if device.type == "cuda":
        return _CudaEventTimer(device)
    if device.type == "cpu":
        return _PerfCounterTimer()
    # Other accelerators run asynchronously; a host clock without their sync would time the launch only.
    raise ValueError(f"latency can be measured on cpu or cuda, not {device.type}")


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if threads is not None:
            torch.set_num_threads(previous)


def _step_fn(model: torch.nn.Module) -> Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]:
    """One greedy step: forward ``ids`` through the cache, return (next token of shape (1, 1), cache)."""
    extra = {}
    # Like generate(): only the last position's logits are needed, so skip the lm_head for the rest.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1

    def step(ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra)
        if out.past_key_values is None:
            raise ValueError(f"{type(model).__name__} returned no past_key_values; cannot decode with a KV cache")
        return out.logits[:, -1:].argmax(dim=-1), out.past_key_values

    return step


def _run(step, timer, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """Prefill then ``new_tokens`` one-token decode steps; returns (prefill ms, per-step ms)."""
    (token, cache), prefill_ms = timer.time_ms(lambda: step(prompt, None))
    decode_ms = []
    for _ in range(new_tokens):
        (token, cache), ms = timer.time_ms(lambda: step(token, cache))
        decode_ms.append(ms)
    return prefill_ms, decode_ms


def measure_latency(model: torch.nn.Module, protocol: LatencyProtocol = LatencyProtocol()) -> LatencyResult:
    """Time prefill and per-token cached decoding of ``model`` under ``protocol``."""
    if not isinstance(protocol, LatencyProtocol):
        raise ValueError(f"protocol must be a LatencyProtocol, got {type(protocol).__name__}")
    device = model_device(model)
    timer = _timer_for(device)
    check_context(model, protocol.prompt_tokens + protocol.new_tokens)
    prompt = random_prompt(model, protocol.prompt_tokens, protocol.seed)
    step = _step_fn(model)

    load_before = os.getloadavg()
    started = time.perf_counter()
    prefill_ms: list[float] = []
    decode_ms: list[float] = []
    with _torch_threads(protocol.threads) as threads, inference_eval(model):
        for _ in range(protocol.warmup):
            _run(step, timer, prompt, protocol.new_tokens)
        for _ in range(protocol.repeats):
            prefill, decode = _run(step, timer, prompt, protocol.new_tokens)
            prefill_ms.append(prefill)
            decode_ms.extend(decode)
    wall_seconds = time.perf_counter() - started

    return LatencyResult(
        protocol=protocol,
        device=str(device),
        timer=timer.name,
        threads=threads,
        load_average_before=tuple(load_before),
        load_average_after=tuple(os.getloadavg()),
        prefill=timing_stats(prefill_ms),
        decode=timing_stats(decode_ms),
        wall_seconds=wall_seconds,
    )
