"""Does a decode ratio's interval cover the true ratio as often as it says? A/A timings and a simulation.

    .venv/bin/python bench/interval_coverage.py aa --times 40 --label quiet          # fixed rounds, raw runs kept
    .venv/bin/python bench/interval_coverage.py sequential --times 40 --label quiet  # the stopping rule
    .venv/bin/python bench/interval_coverage.py simulate                             # both statistics, synthetic
    .venv/bin/python bench/interval_coverage.py summary                              # the tables, from the files

A/A: the built-in model as Q4_K_M, timed against a byte copy of itself (the true ratio is 1), each time loaded
fresh with the studies' protocol (settings.SEARCH_LATENCY: 64-token prompt, 16 decode steps, llama-cpp-python's
default threads). `aa` times 7 of the runtime's rounds (runtime.fresh_rounds: R C R, C R C, ..., each in fresh loads) and
keeps every run, so the statistic the runtime uses (a t interval over the rounds: evaluators.paired,
runtime.round_figures) and the one it replaced (a cluster bootstrap of the median step ratio over rounds that
share their bracketing reference runs, read off the same run sequence) are both read off the same timings at
2 to 7 rounds. `sequential` runs runtime.time_ab itself with a rule that keeps timing while the interval straddles 1.0 (a budget exactly at
the truth: every clear verdict is a wrong one), looking at the studies' schedule. `simulate` feeds synthetic
runs (run-level noise, heavy-tailed bursts, a drifting machine) through the same functions. Results append to
bench/results/interval_coverage.jsonl with the load average, the threads and the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.paired import CONFIDENCE, look_confidence, looks, rounds_ratio  # noqa: E402
from targets.llamacpp.runtime import round_figures  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "interval_coverage.jsonl"
ROUNDS = (2, 3, 4, 5, 7)


def machine() -> dict:
    import torch

    return {"cpu": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(), "load": os.getloadavg()}


def aa_files(folder: Path) -> tuple[Path, Path]:
    """The built-in model as Q4_K_M (llama-quantize) and a byte copy of it."""
    from planner.sources import ModelSource, load_model
    from targets.llamacpp.gguf_file import write_gguf
    from targets.llamacpp.quantize import quantize_gguf

    model, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m"), "cpu")
    float_path, a, b = folder / "float.gguf", folder / "a.gguf", folder / "b.gguf"
    write_gguf(model, tokenizer, float_path)
    quantize_gguf(float_path, a, ftype="Q4_K_M")
    shutil.copyfile(a, b)
    return a, b


# --- the statistic this replaced, for comparison on the same runs -------------------------------------------
def bracketed_bootstrap(runs: list, rounds: int, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The former interval: candidate run k (run 2k+1) against the geometric mean of the reference runs before
    and after it, step by step; the median of the step ratios, resampled by whole rounds (rounds share their
    bracketing reference runs)."""
    members = []
    for k in range(rounds):
        before, cand, after = runs[2 * k][1], runs[2 * k + 1][1], runs[2 * k + 2][1]
        members.append(np.asarray(cand) / np.sqrt(np.asarray(before) * np.asarray(after)))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, rounds, size=(resamples, rounds))
    medians = np.array([np.median(np.concatenate([members[i] for i in row])) for row in picks])
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def t_interval(runs: list, rounds: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    decode, _ = round_figures(runs[: 3 * rounds])
    found = rounds_ratio(decode, confidence)
    return found.low, found.high


def covers(interval: tuple[float, float], truth: float = 1.0) -> bool:
    return interval[0] <= truth <= interval[1]


# --- A/A timings ---------------------------------------------------------------------------------------------
def time_aa(times: int, label: str, sequential: bool, rounds: int = max(ROUNDS)) -> None:
    from planner.settings import SEARCH_LATENCY
    from targets.llamacpp.runtime import fresh_rounds, serving_threads, time_ab

    protocol = SEARCH_LATENCY
    folder = Path(tempfile.mkdtemp(prefix="planner-aa-"))
    try:
        a, b = aa_files(folder)
        for i in range(times):
            started, before = time.perf_counter(), machine()
            if sequential:  # the runtime's own timing, looking on while the interval straddles 1.0
                ab = time_ab(b, a, protocol, unclear=lambda found: found["decode_ratio"].verdict(1.0) == "undecided")
                entry = {"mode": "sequential", "rounds": ab.rounds, "interval": ab.decode_interval,
                         "verdict": ab_verdict(ab.decode_interval)}
            else:  # the runtime's rounds (each in fresh loads), every run kept
                round_runs = fresh_rounds(b, a, protocol)
                entry = {"mode": "aa", "design": "fresh rounds",
                         "runs": [run for k in range(rounds) for run in round_runs(k)]}
            entry.update(label=label, repetition=i, seconds=time.perf_counter() - started, machine=before,
                         load_after=os.getloadavg(), threads=serving_threads(protocol.threads).decode,
                         protocol=protocol.to_dict(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
            RESULTS.parent.mkdir(exist_ok=True)
            with RESULTS.open("a") as out:
                out.write(json.dumps(entry) + "\n")
            shown = f"{entry['verdict']} at {entry['rounds']} rounds" if sequential else \
                f"t interval at 3 rounds {'covers' if covers(t_interval(entry['runs'], 3)) else 'MISSES'} 1"
            print(f"{label} {i + 1}/{times}: {shown} ({entry['seconds']:.1f} s, load {before['load'][0]:.2f})",
                  flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ab_verdict(interval: dict) -> str:
    if interval["low"] <= 1.0 < interval["high"]:
        return "undecided"
    return "wrong: meets" if interval["high"] <= 1.0 else "wrong: over"


# --- simulation ----------------------------------------------------------------------------------------------
def synthetic_runs(rng, runs: int, steps: int, run_sd: float, step_sd: float, drift_sd: float,
                   burst_rate: float, burst_size: float, ratio: float = 1.0) -> list:
    """A run sequence R C R C ... whose candidate is `ratio` times the reference's speed: per run, a drifting
    machine level (a random walk, `drift_sd` a run), run noise (normal, `run_sd`), now and then a burst (another
    process: with probability `burst_rate` a run is slower by up to `burst_size`, uniformly), step noise."""
    level = np.cumsum(rng.normal(0, drift_sd, runs))
    out = []
    for j in range(runs):
        base = 10.0 * (ratio if j % 2 else 1.0)
        burst = rng.uniform(0, burst_size) if rng.random() < burst_rate else 0.0
        log_time = np.log(base) + level[j] + rng.normal(0, run_sd) + burst + rng.normal(0, step_sd, steps)
        out.append((list(np.exp(log_time[:3])), list(np.exp(log_time))))
    return out


SETTINGS = {  # (run_sd, step_sd, drift_sd, burst_rate, burst_size)
    "quiet": (0.01, 0.02, 0.005, 0.0, 0.0),
    "drifting": (0.01, 0.02, 0.03, 0.0, 0.0),
    "bursts": (0.02, 0.03, 0.01, 0.15, 0.5),
    "busy": (0.05, 0.05, 0.03, 0.3, 1.0),
}


def simulate(times: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for name, params in SETTINGS.items():
        hits = {("t", r): 0 for r in ROUNDS} | {("bootstrap", r): 0 for r in ROUNDS}
        wrong = 0
        schedule = looks(3, 12)
        confidence = look_confidence(schedule)
        for _ in range(times):
            runs = synthetic_runs(rng, 3 * 12, 16, *params)
            for r in ROUNDS:
                hits[("t", r)] += covers(t_interval(runs, r))
                hits[("bootstrap", r)] += covers(bracketed_bootstrap(runs, r, resamples=400))
            for r in schedule:  # the stopping rule: look at 3, 6, 12 rounds, stop once clear of 1.0
                low, high = t_interval(runs, r, confidence)
                if not (low <= 1.0 < high):
                    wrong += 1
                    break
        rows.append({"mode": "simulate", "setting": name, "params": params, "times": times,
                     "coverage": {f"{kind} {r}": hits[(kind, r)] / times for kind, r in hits},
                     "sequential_wrong": wrong / times})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- summary -------------------------------------------------------------------------------------------------
def summary() -> None:
    entries = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    groups = sorted({(e["label"], e.get("design", "")) for e in entries if e["mode"] == "aa"})
    for label, design in groups:
        aa = [e for e in entries if e["mode"] == "aa" and e["label"] == label and e.get("design", "") == design]
        loads = [e["machine"]["load"][0] for e in aa]
        print(f"A/A, {label}, {design}: {len(aa)} timings, load {min(loads):.2f}-{max(loads):.2f}, "
              f"{aa[0]['threads']} decode thread(s), {aa[0]['machine']['cpu']}, "
              f"{np.median([e['seconds'] for e in aa]):.1f} s a timing")
        for r in (r for r in ROUNDS if all(len(e["runs"]) >= 3 * r for e in aa)):
            t = sum(covers(t_interval(e["runs"], r)) for e in aa)
            boot = sum(covers(bracketed_bootstrap(e["runs"], r)) for e in aa)
            widths = [np.subtract(*t_interval(e["runs"], r)[::-1]) for e in aa]
            print(f"  {r} rounds: t interval covers 1 in {t}/{len(aa)} ({t / len(aa):.0%}), median width "
                  f"{np.median(widths):.3f}; former bootstrap {boot}/{len(aa)} ({boot / len(aa):.0%})")
    for label in sorted({e["label"] for e in entries if e["mode"] == "sequential"}):
        seq = [e for e in entries if e["mode"] == "sequential" and e["label"] == label]
        wrong = sum(e["verdict"] != "undecided" for e in seq)
        rounds = [e["rounds"] for e in seq]
        print(f"sequential, {label}: {len(seq)} timings against a budget at the truth, wrong verdicts {wrong} "
              f"({wrong / len(seq):.0%}); rounds taken {dict(sorted({r: rounds.count(r) for r in rounds}.items()))}")
    for e in (e for e in entries if e["mode"] == "simulate"):
        print(f"simulated {e['setting']} ({e['times']}x): " + ", ".join(f"{k} {v:.1%}" for k, v in e["coverage"].items())
              + f"; sequential wrong {e['sequential_wrong']:.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("aa", "sequential", "simulate", "summary"))
    parser.add_argument("--times", type=int, default=40)
    parser.add_argument("--label", default="quiet", help="what else the machine was doing")
    parser.add_argument("--rounds", type=int, default=max(ROUNDS), help="aa: rounds a timing (coverage is read "
                        "at every count up to it)")
    args = parser.parse_args()
    if args.mode in ("aa", "sequential"):
        time_aa(args.times, args.label, args.mode == "sequential", args.rounds)
    elif args.mode == "simulate":
        rows = simulate(args.times)
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
    else:
        summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
