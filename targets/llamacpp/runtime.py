"""llama.cpp through llama-cpp-python: load a GGUF, time prefill and decode in A/B rounds against a reference
GGUF, and read the runtime's own logits over the held-out windows.

Latency protocol (`time_ab`): both models load once; after the warm-up the runs alternate reference,
candidate, reference, candidate, ..., so every run follows one of the other model (a model run twice in a row
is faster the second time: flipping the order each round, as this did before, gave that to one model more
often, and the same file timed against itself read 0.93). A run is a prefill of the protocol's random prompt
followed by greedy one-token decode steps back to back through llama.cpp's KV cache, as a server runs them
(the protocol's prefills of the prompt first, `prefills_of`, the last one leading into the decode). A candidate's figure is the
median over its decode steps. Its ratio comes from independent rounds (`round_figures`): the run sequence is
cut into triplets, R C R then C R C, ..., and each triplet's middle run is set against the geometric mean of
its two neighbours, step by step (the same cache position), so a drift of the machine across the triplet
cancels; triplets share no run, and each round runs in fresh loads of both files (`fresh_rounds`: where the
OS places a file's pages moves its speed a little from one load to the next), so the rounds are independent
and evaluators.paired's t interval over them has the coverage it claims (a round a triplet plus two short
warm-up passes, where the bracketing rounds this replaces took 2 runs, with neighbouring rounds sharing a
reference run and all of them one load: their interval was too narrow). Where a caller's verdict is still
open (the interval straddles its budget) the timing goes on, looking again at a fixed schedule of round
counts (evaluators.paired.looks) with each look's confidence lowered so that a wrong verdict stays as rare
as the level says, up to the protocol's limit.

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
Then both must stay in memory while timed: where the machine cannot hold them beside the process, the kernel
drops their pages and decode steps read weights from disk (a 3.2 B model's BF16 reference is 6.4 GB, beside a
study holding the model and its work on a 24 GB machine). Every timing counts the bytes the process read
from storage during its timed runs (`disk_bytes`, the kernel's per-process I/O count: nothing for files that
stay in memory) and `from_disk_reason` says when the figures are the disk's. (Major page faults undercount it:
a fault's readahead brings many pages; 64 MB read back through a mapping took one.)
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
from evaluators.paired import look_confidence, looks, round_log_ratio, rounds_ratio
from evaluators.runtime import random_token_ids
from targets.llamacpp.quantize import default_threads

RUNTIME = "llama.cpp"
READ_CHUNK = 1 << 24
DISK_SHARE = 0.01  # of the timed files' bytes read from storage while timed: the figures are the disk's beyond it
DISK_FLOOR = 1 << 20  # bytes: below it, whatever the files' size (a library's page read in is not a timing's)


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


# Prefills per run where the protocol leaves it open (`LatencyProtocol.prefills` None): a prefill is one sample
# where a run has `new_tokens` decode steps, so each run prefills the prompt this many times (from an empty cache
# each time) and its prefill ratio's round figures are each of several pairs, as decode's are. A study that has
# no prefill budget asks for 1 (the prefill every run needs before its decode): its prefill ratio then has one
# pair a round, a wider interval, and is left out of the tables where that spans more than PREFILL_SPREAD.
PREFILLS = 3


def prefills_of(protocol: LatencyProtocol) -> int:
    return PREFILLS if protocol.prefills is None else protocol.prefills


def _warm(llm, prompt: list[int]) -> None:
    """A warm-up pass: one prefill and one step, which reads every weight once (a model just loaded faults its
    mapped pages in on its first pass)."""
    _, token = _prefill(llm, prompt)
    _step(llm, token)


def _run(llm, prompt: list[int], protocol: LatencyProtocol) -> tuple[list[float], list[float]]:
    """The protocol's prefills (`prefills_of`), then its `new_tokens` greedy decode steps back to back after the
    last, as a server runs them; (prefill ms, step ms)."""
    prefills = []
    for _ in range(prefills_of(protocol)):
        ms, token = _prefill(llm, prompt)
        prefills.append(ms)
    steps = []
    for _ in range(protocol.new_tokens):
        ms, token = _step(llm, token)
        steps.append(ms)
    return prefills, steps


def round_figures(runs: list[tuple[list[float], list[float]]]) -> tuple[list[float], list[float]]:
    """(decode log ratios, prefill log ratios), one per complete round, of a run sequence that alternates
    reference, candidate, reference, ... (run j the reference's when j is even): round k is runs 3k to 3k+2,
    R C R when k is even, C R C when odd, its middle run against the geometric mean of its neighbours, step by
    step and prefill by prefill (evaluators.paired.round_log_ratio), as log(candidate / reference)."""
    decode, prefill = [], []
    for k in range(len(runs) // 3):
        before, middle, after = runs[3 * k: 3 * k + 3]
        sign = 1.0 if k % 2 == 0 else -1.0  # a C R C round's middle run is the reference's
        for which, out in ((1, decode), (0, prefill)):
            neighbours = np.sqrt(np.asarray(before[which], dtype=float) * np.asarray(after[which], dtype=float))
            out.append(sign * round_log_ratio(middle[which], neighbours))
    return decode, prefill


@dataclass(frozen=True)
class ABLatency:
    """A candidate timed against a reference in the same runtime, rounds interleaved, steps paired."""

    protocol: dict
    runtime: str
    threads: int  # decode (n_threads)
    batch_threads: int  # prefill (n_threads_batch)
    rounds: int  # measured rounds (runtime.round_figures): the protocol's repeats, more where a verdict was unclear
    decode: dict  # the candidate's TimingStats (ms per decode step)
    prefill: dict
    reference_decode: dict
    reference_prefill: dict
    decode_ratio: float  # exp(mean over rounds of the round's log ratio of candidate / reference decode steps)
    prefill_ratio: float  # the same over prefills (prefills_of(protocol) a run)
    decode_interval: dict  # evaluators.paired.PairedRatio: the ratio, its t interval over rounds, its confidence
    prefill_interval: dict
    decode_rounds: list  # each round's log ratio of candidate / reference (what the interval is of)
    prefill_rounds: list
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]
    wall_seconds: float
    disk_bytes: int | None = None  # read from storage during the timed runs (None: the kernel does not say)
    files_bytes: int = 0  # the candidate's and the reference's files (one file where they are the same)

    def to_dict(self) -> dict:
        return asdict(self)


class Runs(list):
    """A round's runs, and the bytes this process read from storage while they ran."""

    disk_bytes: int | None = None


def bytes_read_from_disk() -> int | None:
    """Bytes this process has caused to be read from storage so far (reads and its mappings' page faults, with
    their readahead; not what the page cache served), or None where the kernel does not count them."""
    try:
        with open("/proc/self/io", encoding="ascii") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("read_bytes:"))
    except (OSError, StopIteration, ValueError):
        return None


def with_disk_reads(runs) -> Runs:
    """Runs (a generator of `_run` calls) run now, with the bytes read from storage while they ran."""
    before = bytes_read_from_disk()
    done = Runs(runs)
    after = bytes_read_from_disk()
    done.disk_bytes = None if before is None or after is None else after - before
    return done


def from_disk_reason(ab: ABLatency) -> str | None:
    """Why an A/B timing's figures are the disk's, or None: its timed runs read more than DISK_SHARE of the timed
    files' bytes from storage (at least DISK_FLOOR). Files that stay in memory read nothing once loaded (from_disk
    read them in before the warm-up); files whose pages the kernel drops read their weights again at each step."""
    if ab.disk_bytes is None or ab.disk_bytes <= max(DISK_FLOOR, DISK_SHARE * ab.files_bytes):
        return None
    return (f"timed from disk: {ab.disk_bytes / 1e6:.0f} MB read from storage while timed, the files timed being "
            f"{ab.files_bytes / 1e6:.0f} MB (they did not stay in memory beside the study: the latency figures are "
            "the disk's, not the runtime's)")


def time_ab(candidate: Path, reference: Path, protocol: LatencyProtocol,
            unclear: Callable[[dict], bool] | None = None) -> ABLatency:
    """Time `candidate` against `reference` with the protocol's threads (`serving_threads`), each round in fresh
    loads (`fresh_rounds`): the protocol's repeats; while `unclear` says the intervals ({"decode_ratio":
    PairedRatio, "prefill_ratio": ...}) leave a verdict open, more rounds on the looks' schedule, up to the
    protocol's `most_repeats`."""
    return timed_rounds(fresh_rounds(candidate, reference, protocol), protocol, unclear,
                        files_bytes=size_of_files(candidate, reference))


def size_of_files(*paths: Path) -> int:
    """The bytes of the files timed, each once (a baseline is its reference file timed against itself)."""
    return sum(path.stat().st_size for path in {Path(p).resolve() for p in paths})


def fresh_rounds(candidate: Path, reference: Path, protocol: LatencyProtocol) -> Callable[[int], list]:
    """Round k's three runs (R C R for even k, C R C for odd), each round in a session of its own: both files
    read back from disk and loaded again, the outer model first (so the order alternates too), the protocol's
    warm-up passes (outer, then middle: the triplet's first run follows the other model), then the triplet.
    Rounds in one session share where the OS placed the files' pages and the runtime its buffers, and that
    moved a file against its own byte copy by 0.3-0.9% from one session to the next (docs/benchmarks.md
    section 11): an interval over rounds of one session was too narrow for the ratio the next load serves."""
    n_ctx = protocol.prompt_tokens + protocol.new_tokens

    def round_runs(k: int) -> list:
        outer, middle = (reference, candidate) if k % 2 == 0 else (candidate, reference)
        for path in (outer, middle):
            from_disk(path)
        with loaded(outer, n_ctx, protocol.threads) as first, loaded(middle, n_ctx, protocol.threads) as second:
            prompt = random_token_ids(first.n_vocab(), protocol.prompt_tokens, protocol.seed).tolist()
            for _ in range(protocol.warmup):
                _warm(first, prompt)
                _warm(second, prompt)
            return with_disk_reads(_run(llm, prompt, protocol) for llm in (first, second, first))
    return round_runs


def loaded_rounds(cand, ref, protocol: LatencyProtocol) -> Callable[[int], list]:
    """Round k's three runs on models already loaded (one session: a cost model's timings, where a fraction of a
    percent between sessions does not matter), the protocol's warm-up passes once before the first."""
    prompt = random_token_ids(cand.n_vocab(), protocol.prompt_tokens, protocol.seed).tolist()
    for _ in range(protocol.warmup):
        _warm(ref, prompt)
        _warm(cand, prompt)

    def round_runs(k: int) -> list:
        order = (ref, cand, ref) if k % 2 == 0 else (cand, ref, cand)  # R C R C R C ...: each after the other
        return with_disk_reads(_run(llm, prompt, protocol) for llm in order)
    return round_runs


def time_many(candidates: list[Path], reference: Path, protocol: LatencyProtocol) -> list["ABLatency"]:
    """Each candidate timed against one reference, read and loaded once (a cost model times many files against
    the same float GGUF), its rounds in one session (`loaded_rounds`)."""
    n_ctx = protocol.prompt_tokens + protocol.new_tokens
    from_disk(reference)
    timings = []
    with loaded(reference, n_ctx, protocol.threads) as ref:
        for candidate in candidates:
            from_disk(candidate)
            with loaded(candidate, n_ctx, protocol.threads) as cand:
                timings.append(timed_rounds(loaded_rounds(cand, ref, protocol), protocol,
                                            files_bytes=size_of_files(candidate, reference)))
    return timings


def timed_rounds(round_runs: Callable[[int], list], protocol: LatencyProtocol,
                 unclear: Callable[[dict], bool] | None = None, files_bytes: int = 0) -> "ABLatency":
    """The A/B timing from `round_runs` (round k -> its three runs, `Runs` where they say what they read from
    storage); `files_bytes`: the files' size, for `from_disk_reason`. Without `unclear` the protocol's repeats are
    timed and one interval made (CONFIDENCE); with it, the intervals are looked at after each count of rounds
    in `looks(repeats, most_repeats)`, each at `look_confidence` of that schedule, until `unclear` is
    satisfied."""
    threads = serving_threads(protocol.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    schedule = looks(protocol.repeats, protocol.most_repeats if unclear is not None else 0)  # no rule: one look
    confidence = look_confidence(schedule)  # CONFIDENCE itself for a single look
    runs = []  # R C R C R C ...: round k's triplet is runs 3k to 3k+2
    disk_bytes = 0  # None once a round's runs could not say
    for rounds in schedule:
        while len(runs) < 3 * rounds:
            done = round_runs(len(runs) // 3)
            runs.extend(done)
            read = getattr(done, "disk_bytes", None)
            disk_bytes = None if read is None or disk_bytes is None else disk_bytes + read
        decode, prefill = round_figures(runs)
        intervals = {"decode_ratio": rounds_ratio(decode, confidence), "prefill_ratio": rounds_ratio(prefill, confidence)}
        if unclear is None or not unclear(intervals):
            break
    timed = {"candidate": runs[1::2], "reference": runs[0::2]}
    steps = {who: [ms for _, run in timed[who] for ms in run] for who in timed}
    prefills = {who: [ms for run, _ in timed[who] for ms in run] for who in timed}
    return ABLatency(
        protocol=protocol.to_dict(), runtime=runtime_version(), threads=threads.decode,
        batch_threads=threads.batch, rounds=len(decode),
        decode=timing_stats(steps["candidate"]).to_dict(), prefill=timing_stats(prefills["candidate"]).to_dict(),
        reference_decode=timing_stats(steps["reference"]).to_dict(),
        reference_prefill=timing_stats(prefills["reference"]).to_dict(),
        decode_ratio=intervals["decode_ratio"].ratio, prefill_ratio=intervals["prefill_ratio"].ratio,
        decode_interval=intervals["decode_ratio"].to_dict(), prefill_interval=intervals["prefill_ratio"].to_dict(),
        decode_rounds=decode, prefill_rounds=prefill,
        load_average_before=tuple(load_before), load_average_after=tuple(os.getloadavg()),
        wall_seconds=time.perf_counter() - started, disk_bytes=disk_bytes, files_bytes=files_bytes)


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
