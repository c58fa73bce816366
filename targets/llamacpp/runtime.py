"""llama.cpp through llama-cpp-python: load a GGUF, time prefill and decode in A/B rounds against a reference
GGUF, and read the runtime's own logits over the held-out windows.

Latency protocol (`time_ab`): both models load once; each round runs the reference, then the candidate
(the order alternates every round so neither always runs on a warmer cache), each a prefill of the
protocol's random prompt followed by greedy one-token decode steps through llama.cpp's KV cache. A
candidate's figure is the median over its decode steps; its ratio is the median over rounds of
candidate / reference in that round, so load on a shared machine that slows a whole round cancels out.
Threads are set for both (``n_threads`` and ``n_threads_batch``) and recorded.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from evaluators.latency import LatencyProtocol, timing_stats
from evaluators.runtime import random_token_ids

RUNTIME = "llama.cpp"


def runtime_version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


def gpu_layers() -> int:
    """All layers on the GPU where llama.cpp was built with one, else none."""
    import llama_cpp

    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


@contextlib.contextmanager
def loaded(path: Path, n_ctx: int, threads: int, logits_all: bool = False) -> Iterator[object]:
    """A llama.cpp model and context for `path`, closed on exit (its memory is returned at once)."""
    from llama_cpp import Llama

    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                    n_threads_batch=threads, logits_all=logits_all, n_gpu_layers=gpu_layers(), verbose=False,
                    seed=0)
    try:
        yield llm
    finally:
        llm.close()


def _last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def _run(llm, prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """Prefill then `new_tokens` greedy decode steps; (prefill ms, per-step ms)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = int(np.argmax(_last_logits(llm)))
    prefill = (time.perf_counter() - start) * 1e3
    steps = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        llm.eval([token])
        token = int(np.argmax(_last_logits(llm)))
        steps.append((time.perf_counter() - start) * 1e3)
    return prefill, steps


@dataclass(frozen=True)
class ABLatency:
    """A candidate timed against a reference in the same runtime, rounds interleaved."""

    protocol: dict
    runtime: str
    threads: int
    rounds: int
    decode: dict  # the candidate's TimingStats (ms per decode step)
    prefill: dict
    reference_decode: dict
    reference_prefill: dict
    decode_ratio: float  # median over rounds of candidate / reference (decode p50)
    prefill_ratio: float
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]
    wall_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def time_ab(candidate: Path, reference: Path, protocol: LatencyProtocol, threads: int) -> ABLatency:
    n_ctx = protocol.prompt_tokens + protocol.new_tokens
    load_before = os.getloadavg()
    started = time.perf_counter()
    with loaded(candidate, n_ctx, threads) as cand, loaded(reference, n_ctx, threads) as ref:
        prompt = random_token_ids(cand.n_vocab(), protocol.prompt_tokens, protocol.seed).tolist()
        samples = {"cand": ([], []), "ref": ([], [])}
        ratios = ([], [])
        for index in range(protocol.warmup + protocol.repeats):
            order = (("ref", ref), ("cand", cand)) if index % 2 == 0 else (("cand", cand), ("ref", ref))
            this_round = {name: _run(llm, prompt, protocol.new_tokens) for name, llm in order}
            if index < protocol.warmup:
                continue
            for name, (prefill, steps) in this_round.items():
                samples[name][0].append(prefill)
                samples[name][1].extend(steps)
            ratios[0].append(statistics.median(this_round["cand"][1]) / statistics.median(this_round["ref"][1]))
            ratios[1].append(this_round["cand"][0] / this_round["ref"][0])
    return ABLatency(
        protocol=protocol.to_dict(), runtime=runtime_version(), threads=threads, rounds=protocol.repeats,
        decode=timing_stats(samples["cand"][1]).to_dict(), prefill=timing_stats(samples["cand"][0]).to_dict(),
        reference_decode=timing_stats(samples["ref"][1]).to_dict(),
        reference_prefill=timing_stats(samples["ref"][0]).to_dict(),
        decode_ratio=statistics.median(ratios[0]), prefill_ratio=statistics.median(ratios[1]),
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
