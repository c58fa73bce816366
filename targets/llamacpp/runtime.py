"""llama.cpp through llama-cpp-python: load a GGUF, time prefill and decode in A/B rounds against a reference
GGUF, and read the runtime's own logits over the held-out windows.

Latency protocol (`time_ab`): both models load once; after the warm-up the runs alternate reference,
candidate, reference, ..., reference, so every run follows one of the other model (a model run twice in a
row is faster the second time: flipping the order each round, as this did before, gave that to one model
more often, and the same file timed against itself read 0.93) and every candidate run is bracketed by two
reference runs. A run is a prefill of the protocol's random prompt followed by greedy one-token decode steps
back to back through llama.cpp's KV cache, as a server runs them (PREFILLS prefills of the prompt first, the
last one leading into the decode). A candidate's figure is the median over its
decode steps; its ratio is the median over step pairs (candidate step i against the geometric mean of step i
of the reference runs before and after it: the same cache position, drifts of the machine cancelling) of
candidate / reference, with a confidence interval from a bootstrap over the rounds (evaluators.paired: a round's
pairs share its conditions), so load on a shared machine that slows a stretch of time cancels in each pair
and shows in the interval. Where a caller's verdict is still open (the interval straddles its
budget) the timing goes on, round by round, up to the protocol's limit.

Threads (`serving_threads`): a protocol's `threads` sets both of llama.cpp's counts (``n_threads`` for decode,
``n_threads_batch`` for prefill), as llama.cpp's ``-t`` does; left unset, the counts are llama-cpp-python's own
defaults, the ones a plain ``Llama(path)`` serves with: half the CPUs for decode, all of them for prefill. Decode
on every core is fragile on a machine that runs anything else: each graph node ends at a barrier of all the
threads, so another process holding one core stalls every node, and that adds the same time per step to a small
quantized file as to the float reference, and their ratio swings (docs/benchmarks.md section 8: beside the test
suite on 2 CPUs, 2 decode threads gave intervals many times wider than 1). Both counts are recorded with every
timing.

Files (`from_disk`): both files are written out, dropped from the page cache and read back in whole before they
load, so both come back the same way. A file still in the page cache from being written is mapped through
whatever pages its writer left there, and that alone moved one model's speed by up to 10%: the float GGUF
against a byte copy of itself read 0.90-0.92 one way and 1.05-1.10 the other (the newer file faster, in either
role); dropped first, 0.986-1.006 both ways (a study's baseline against its reference had read 0.76 and 0.94).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from evaluators.latency import LatencyProtocol, timing_stats
from evaluators.paired import paired_ratio
from evaluators.runtime import random_token_ids
from targets.llamacpp.quantize import default_threads

RUNTIME = "llama.cpp"
READ_CHUNK = 1 << 24


def runtime_version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


def gpu_layers() -> int:
    """All layers on the GPU where llama.cpp was built with one, else none."""
    import llama_cpp

    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


@dataclass(frozen=True)
class Threads:
    decode: int  # n_threads: one-token steps
    batch: int  # n_threads_batch: prefill and scoring windows

    def as_kwargs(self) -> str:
        return f"n_threads={self.decode}, n_threads_batch={self.batch}"


def serving_threads(threads: int | None = None) -> Threads:
    """llama.cpp's thread counts: `threads` for both where given, else llama-cpp-python's defaults (half the CPUs
    for decode, at least one; all for batches), counted over the CPUs this process may run on."""
    if threads is not None:
        return Threads(threads, threads)
    cpus = default_threads()
    return Threads(max(cpus // 2, 1), cpus)


@contextlib.contextmanager
def loaded(path: Path, n_ctx: int, threads: int | None = None, logits_all: bool = False) -> Iterator[object]:
    """A llama.cpp model and context for `path` with `serving_threads(threads)`, closed on exit (its memory is
    returned at once)."""
    from llama_cpp import Llama

    counts = serving_threads(threads)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=counts.decode,
                    n_threads_batch=counts.batch, logits_all=logits_all, n_gpu_layers=gpu_layers(), verbose=False,
                    seed=0)
    try:
        yield llm
    finally:
        llm.close()


def from_disk(path: Path) -> None:
    """Write `path` out, drop it from the page cache (where the OS allows) and read it back in, as any file is
    read from disk: how a file's pages were written must not change how fast it runs, and reading it here keeps
    the disk out of the first timed run where a protocol has no warm-up."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, READ_CHUNK):
            pass
    finally:
        os.close(fd)


def _last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def _prefill(llm, prompt: list[int]) -> tuple[float, int]:
    """Prefill from an empty cache; (ms, the greedy next token)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = int(np.argmax(_last_logits(llm)))
    return (time.perf_counter() - start) * 1e3, token


def _step(llm, token: int) -> tuple[float, int]:
    """One greedy decode step through the KV cache; (ms, the next token)."""
    start = time.perf_counter()
    llm.eval([token])
    next_token = int(np.argmax(_last_logits(llm)))
    return (time.perf_counter() - start) * 1e3, next_token


# Prefills per run: a prefill is one sample where a run has `new_tokens` decode steps, so each run prefills the
# prompt this many times (from an empty cache each time) and its prefill ratio has an interval over rounds as
# decode's has (one prefill per round gave 3 pairs a study: an "interval" of 3 points).
PREFILLS = 3


def _run(llm, prompt: list[int], new_tokens: int) -> tuple[list[float], list[float]]:
    """PREFILLS prefills, then `new_tokens` greedy decode steps back to back after the last, as a server runs
    them; (prefill ms, step ms)."""
    prefills = []
    for _ in range(PREFILLS):
        ms, token = _prefill(llm, prompt)
        prefills.append(ms)
    steps = []
    for _ in range(new_tokens):
        ms, token = _step(llm, token)
        steps.append(ms)
    return prefills, steps


def _geometric(before: list[float], after: list[float]) -> list[float]:
    return [float(np.sqrt(a * b)) for a, b in zip(before, after)]


def _bracketed(reference_runs: list, candidate_runs: list) -> tuple[list[float], list[float], list[float], list[float]]:
    """(candidate steps, reference steps, candidate prefills, reference prefills) as pairs: candidate run k
    against the geometric mean of the reference runs just before and just after it, step by step (the same
    position in the KV cache) and prefill by prefill, so a machine drifting slower or faster across the timing
    cancels."""
    steps_c, steps_r, prefill_c, prefill_r = [], [], [], []
    for k, (prefills, steps) in enumerate(candidate_runs):
        (before_p, before), (after_p, after) = reference_runs[k], reference_runs[k + 1]
        steps_c.extend(steps)
        steps_r.extend(_geometric(before, after))
        prefill_c.extend(prefills)
        prefill_r.extend(_geometric(before_p, after_p))
    return steps_c, steps_r, prefill_c, prefill_r


@dataclass(frozen=True)
class ABLatency:
    """A candidate timed against a reference in the same runtime, rounds interleaved, steps paired."""

    protocol: dict
    runtime: str
    threads: int  # decode (n_threads)
    batch_threads: int  # prefill (n_threads_batch)
    rounds: int  # measured rounds: the protocol's repeats, more where the verdict was unclear
    decode: dict  # the candidate's TimingStats (ms per decode step)
    prefill: dict
    reference_decode: dict
    reference_prefill: dict
    decode_ratio: float  # median over decode-step pairs (step i of a round, each model) of candidate / reference
    prefill_ratio: float  # median over prefill pairs (PREFILLS a run, each against the bracketing reference runs')
    decode_interval: dict  # evaluators.paired.PairedRatio: the ratio, its confidence interval, the pairs
    prefill_interval: dict
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]
    wall_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def time_ab(candidate: Path, reference: Path, protocol: LatencyProtocol,
            unclear: Callable[[dict], bool] | None = None) -> ABLatency:
    """Time `candidate` against `reference` with the protocol's threads (`serving_threads`): warm-up rounds, then
    the protocol's repeats; while `unclear` says the intervals ({"decode_ratio": PairedRatio, "prefill_ratio":
    ...}) leave a verdict open, more rounds, up to the protocol's `max_repeats`."""
    n_ctx = protocol.prompt_tokens + protocol.new_tokens
    for path in (candidate, reference):
        from_disk(path)
    with loaded(candidate, n_ctx, protocol.threads) as cand, loaded(reference, n_ctx, protocol.threads) as ref:
        return time_loaded(cand, ref, protocol, unclear)


def time_many(candidates: list[Path], reference: Path, protocol: LatencyProtocol) -> list["ABLatency"]:
    """`time_ab` of each candidate against one reference, read and loaded once (a cost model times many files
    against the same float GGUF)."""
    n_ctx = protocol.prompt_tokens + protocol.new_tokens
    from_disk(reference)
    timings = []
    with loaded(reference, n_ctx, protocol.threads) as ref:
        for candidate in candidates:
            from_disk(candidate)
            with loaded(candidate, n_ctx, protocol.threads) as cand:
                timings.append(time_loaded(cand, ref, protocol))
    return timings


def time_loaded(cand, ref, protocol: LatencyProtocol, unclear: Callable[[dict], bool] | None = None) -> "ABLatency":
    """The A/B rounds of `time_ab` on models already loaded."""
    threads = serving_threads(protocol.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    prompt = random_token_ids(cand.n_vocab(), protocol.prompt_tokens, protocol.seed).tolist()
    for _ in range(protocol.warmup):
        _run(ref, prompt, protocol.new_tokens)
        _run(cand, prompt, protocol.new_tokens)
    reference_runs, candidate_runs = [_run(ref, prompt, protocol.new_tokens)], []
    while True:  # R C R C ... R: every run follows one of the other model, every candidate run bracketed
        candidate_runs.append(_run(cand, prompt, protocol.new_tokens))
        reference_runs.append(_run(ref, prompt, protocol.new_tokens))
        measured = len(candidate_runs)
        if measured < protocol.repeats:
            continue
        steps_c, steps_r, prefill_c, prefill_r = _bracketed(reference_runs, candidate_runs)
        # the round of each pair: a round's pairs share its conditions (a cluster bootstrap over rounds)
        intervals = {"decode_ratio": paired_ratio(steps_c, steps_r,
                                                  groups=np.repeat(np.arange(measured), protocol.new_tokens)),
                     "prefill_ratio": paired_ratio(prefill_c, prefill_r,
                                                   groups=np.repeat(np.arange(measured), PREFILLS))}
        if measured >= protocol.most_repeats or unclear is None or not unclear(intervals):
            break
    ref_steps = [ms for _, steps in reference_runs for ms in steps]
    ref_prefills = [ms for prefills, _ in reference_runs for ms in prefills]
    return ABLatency(
        protocol=protocol.to_dict(), runtime=runtime_version(), threads=threads.decode,
        batch_threads=threads.batch, rounds=measured,
        decode=timing_stats(steps_c).to_dict(), prefill=timing_stats(prefill_c).to_dict(),
        reference_decode=timing_stats(ref_steps).to_dict(), reference_prefill=timing_stats(ref_prefills).to_dict(),
        decode_ratio=intervals["decode_ratio"].ratio, prefill_ratio=intervals["prefill_ratio"].ratio,
        decode_interval=intervals["decode_ratio"].to_dict(), prefill_interval=intervals["prefill_ratio"].to_dict(),
        load_average_before=tuple(load_before), load_average_after=tuple(os.getloadavg()),
        wall_seconds=time.perf_counter() - started)


def window_logits(llm, context_length: int, stride: int):
    """`windows(ids)` for evaluators.kl.score_windows from llama.cpp's logits (the same windows and scored
    positions as perplexity.scored_windows)."""
    from evaluators.perplexity import window_spans

    def windows(ids: list[int]):
        for begin, end, first in window_spans(len(ids), context_length, stride):
            llm.reset()
            llm.eval(ids[begin:end])
            logits = torch.from_numpy(np.array(llm.scores[first - 1 - begin:end - 1 - begin], dtype=np.float32))
            yield logits, torch.tensor(ids[first:end], dtype=torch.long)

    return windows


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's tokenization of plain text (no BOS, special tokens as text)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
