"""llama.cpp through llama-cpp-python: load a GGUF, time prefill and decode in A/B rounds against a reference
GGUF, and read the runtime's own logits over the held-out windows.

Latency protocol (`time_ab`): both models load once; each round runs the reference, then the candidate (the
order alternates every round so neither always runs on a warmer machine), each a prefill of the protocol's
random prompt followed by greedy one-token decode steps back to back through llama.cpp's KV cache, as a
server runs them. A candidate's figure is the median over its decode steps; its ratio is the median over step
pairs (step i of a round of each model: the same cache position, a fraction of a second apart) of candidate
/ reference, with a bootstrap confidence interval (evaluators.paired), so load on a shared machine that slows
a stretch of time cancels in each pair. Where a caller's verdict is still open (the interval straddles its
budget) the timing goes on, round by round, up to the protocol's limit. Threads are set for both
(``n_threads`` and ``n_threads_batch``) and recorded.
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


def _run(llm, prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """Prefill, then `new_tokens` greedy decode steps back to back, as a server runs them; (prefill ms, step ms)."""
    prefill, token = _prefill(llm, prompt)
    steps = []
    for _ in range(new_tokens):
        ms, token = _step(llm, token)
        steps.append(ms)
    return prefill, steps


def _round(models: dict, prompt: list[int], new_tokens: int, first: str) -> dict[str, tuple[float, list[float]]]:
    """One A/B round: each model in turn (`first` first) prefills and decodes its steps back to back.
    {name: (prefill ms, per-step ms)}. Step i of one model is paired with step i of the other: the same position
    in the KV cache, the same place in a run of steps, a fraction of a second apart. (Interleaving single steps
    of the two models was tried and is biased: each step then runs after the other model's, colder than a
    server's steps, and the same file timed against itself read 0.93.)"""
    order = [first] + [n for n in models if n != first]
    return {name: _run(models[name], prompt, new_tokens) for name in order}


@dataclass(frozen=True)
class ABLatency:
    """A candidate timed against a reference in the same runtime, rounds interleaved, steps paired."""

    protocol: dict
    runtime: str
    threads: int
    rounds: int  # measured rounds: the protocol's repeats, more where the verdict was unclear
    decode: dict  # the candidate's TimingStats (ms per decode step)
    prefill: dict
    reference_decode: dict
    reference_prefill: dict
    decode_ratio: float  # median over decode-step pairs (step i of a round, each model) of candidate / reference
    prefill_ratio: float  # median over rounds' prefill pairs
    decode_interval: dict  # evaluators.paired.PairedRatio: the ratio, its confidence interval, the pairs
    prefill_interval: dict
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]
    wall_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def time_ab(candidate: Path, reference: Path, protocol: LatencyProtocol, threads: int,
            unclear: Callable[[dict], bool] | None = None) -> ABLatency:
    """Time `candidate` against `reference`: warm-up rounds, then the protocol's repeats; while `unclear`
    says the intervals ({"decode_ratio": PairedRatio, "prefill_ratio": ...}) leave a verdict open, more
    rounds, up to the protocol's `max_repeats`."""
    n_ctx = protocol.prompt_tokens + protocol.new_tokens
    load_before = os.getloadavg()
    started = time.perf_counter()
    with loaded(candidate, n_ctx, threads) as cand, loaded(reference, n_ctx, threads) as ref:
        models = {"ref": ref, "cand": cand}
        prompt = random_token_ids(cand.n_vocab(), protocol.prompt_tokens, protocol.seed).tolist()
        samples = {name: ([], []) for name in models}
        index, measured = 0, 0
        while True:
            this_round = _round(models, prompt, protocol.new_tokens, "ref" if index % 2 == 0 else "cand")
            index += 1
            if index <= protocol.warmup:
                continue
            measured += 1
            for name, (prefill, steps) in this_round.items():
                samples[name][0].append(prefill)
                samples[name][1].extend(steps)
            if measured < protocol.repeats:
                continue
            intervals = {"decode_ratio": paired_ratio(samples["cand"][1], samples["ref"][1]),
                         "prefill_ratio": paired_ratio(samples["cand"][0], samples["ref"][0])}
            if measured >= protocol.most_repeats or unclear is None or not unclear(intervals):
                break
    return ABLatency(
        protocol=protocol.to_dict(), runtime=runtime_version(), threads=threads, rounds=measured,
        decode=timing_stats(samples["cand"][1]).to_dict(), prefill=timing_stats(samples["cand"][0]).to_dict(),
        reference_decode=timing_stats(samples["ref"][1]).to_dict(),
        reference_prefill=timing_stats(samples["ref"][0]).to_dict(),
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
