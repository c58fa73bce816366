"""Search quality: how close each sampler's front gets to the exhaustive front of a real grid, per trial.

    nice -n 10 .venv/bin/python bench/search_quality.py --evaluate     # measure every grid point (resumable)
    .venv/bin/python bench/search_quality.py                            # replay the samplers, tables + PNG

`--evaluate` builds every point of the grid in `_grid.py` (the planner's search space on the llama.cpp target
narrowed to depth {1, 0.8} x MLP {1, 0.75} x quantization {none; RTN onto Q4_0 / Q5_0 / Q8_0 for attention x
MLP, head F16 shared / Q8_0 / Q4_0}) once and measures it through the study's target exactly as a trial does
(`planner.trial.measure`: the GGUF written, decode and prefill timed A/B against the uncompressed model's GGUF
in the same llama.cpp process, perplexity from llama.cpp's logits, weight bytes = the GGUF's tensor bytes),
with demo.toml's protocols, appending one JSON line per point to bench/results/grid-llamacpp.jsonl (an
interrupted run continues where it was). Each pruned model is built once and every quantization of it is
built from a copy (the same result as the planner's build, which applies the stages in the same order to a
fresh copy; checked once on one point, `grid-llamacpp-equivalence.json`).

The replay runs the planner's real study code against the table (see `_grid.Replay`): TPE (the default),
NSGA-II and random, several seeds each, with no budget and under demo.toml's budget (decode <= 0.3x the
uncompressed model, on the same-run ratio). It prints the hypervolume of each run's front relative to the
exhaustive front's after each number of trials, with the same normalisation and reference point for every
method (stated in the output), and writes docs/search_quality.png and bench/results/search_quality_llamacpp.json.
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._grid import (MACHINE, TABLE, Normaliser, Replay, append_row, distinct_built,  # noqa: E402
                         found_values, grid_points, grid_settings, load_table, nondominated,
                         objective_values, reference_decode_ms, stage_key)

SAMPLERS = ("tpe", "nsga2", "random")
BUDGET = "latency=0.3x"  # demo.toml's: decode at most 0.3x the uncompressed model's time per token, same run
NAMES = {"memory": "memory", "latency": "decode"}


def settings_for(budget: str) -> dict[str, dict]:
    """The replayed settings: no budget, and `budget` ("latency=0.3x", "memory=0.25x")."""
    kind, value = budget.split("=")
    return {"no budget": {}, f"{NAMES[kind]} <= {value}": {kind: value}}
CHECKPOINTS = (5, 10, 15, 20, 25, 30, 40, 50, 60)
TARGET_RATIO, TARGET_FRACTION = 0.95, 0.15
DOCS = Path(__file__).resolve().parents[1] / "docs"
OUTPUT = TABLE.parent / "search_quality_llamacpp.json"  # beside the table it replays


# ---------------------------------------------------------------------------------------------------
# Measuring the grid
# ---------------------------------------------------------------------------------------------------


def prune_part(stages) -> list:
    return [s for s in stages if s.technique == "pruning"]


def build_grouped(bench, todo):
    """Yield (params, stages, model, seconds), pruning each shape once and quantizing copies of it."""
    from search_spaces import TECHNIQUES

    groups: dict[str, list] = {}
    for params, stages in todo:
        groups.setdefault(stage_key(prune_part(stages)), []).append((params, stages))
    for group in groups.values():
        prune_stages = prune_part(group[0][1])
        started = time.perf_counter()
        pruned = bench.model
        if prune_stages:
            pruned = TECHNIQUES["pruning"].apply(copy.deepcopy(bench.model), prune_stages[0].spec, bench.context)
        prune_seconds = time.perf_counter() - started
        for params, stages in group:
            started = time.perf_counter()
            rest = [s for s in stages if s.technique != "pruning"]
            model = copy.deepcopy(pruned) if rest else pruned
            for stage in rest:
                model = TECHNIQUES[stage.technique].apply(model, stage.spec, bench.context)
            yield params, stages, model.eval(), {"prune_shared": prune_seconds, "build": time.perf_counter() - started}
            del model
            gc.collect()
        del pruned
        gc.collect()


def machine(bench) -> dict:
    """What the figures were measured on and with."""
    import torch

    import llama_cpp

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "llama_cpp_python": llama_cpp.__version__, "latency_threads": bench.settings.latency_protocol().threads,
            "target": bench.target.name, "load_average": os.getloadavg(),
            "latency_protocol": bench.settings.latency_protocol().to_dict(),
            "perplexity_protocol": bench.settings.perplexity_protocol().to_dict()}


def measured_row(bench, params, stages, model, seconds: dict) -> dict:
    """One grid point measured by the study's target exactly as a trial measures it (planner.trial.measure)."""
    from planner.candidates import describe, estimate_weight_bytes
    from planner.trial import measure

    label = describe(stages)
    started = time.perf_counter()
    load_before = os.getloadavg()
    row, details = measure(bench, model, stages, label=label)
    seconds = {**seconds, "measure": time.perf_counter() - started}
    return {"key": stage_key(stages), "params": params, "label": label, **row,
            "estimated_weight_bytes": estimate_weight_bytes(bench.model, stages),
            "latency": details.get("latency"), "memory": details.get("memory"),
            "perplexity_details": details.get("perplexity"), "runtime": details.get("runtime"),
            "seconds": seconds, "load_average_before": load_before, "load_average_after": os.getloadavg()}


def uses_5_bits(stages) -> bool:
    return any(5 in getattr(s.spec, "bits", {}).values() for s in stages if s.technique == "quantization")


def evaluate(limit: int | None) -> None:
    """Every grid point not yet in the table, measured one after another (latency is timed, so one process)."""
    from planner.quiet import quiet_libraries
    from planner.study import prepare

    quiet_libraries()
    bench = prepare(grid_settings())
    points = grid_points(bench.spaces)
    table = load_table()
    todo = [(params, stages) for params, stages in points if stage_key(stages) not in table]
    facts = machine(bench)
    runs = json.loads(MACHINE.read_text())["runs"] if MACHINE.exists() else []
    MACHINE.write_text(json.dumps({"runs": runs + [{**facts, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    "points_to_measure": len(todo)}]}, indent=1))
    print(f"grid: {len(points)} distinct candidates, {len(table)} in the table, {len(todo)} to measure; target "
          f"{facts['target']}, {facts['cpu_capability']}, llama.cpp threads {facts['latency_threads']}, torch "
          f"threads {facts['torch_threads']}, load {os.getloadavg()[0]:.2f}", flush=True)
    # Bits {4, 8} first (a grid without Q5_0, complete on its own), then the Q5_0 points.
    todo = [p for p in todo if not uses_5_bits(p[1])] + [p for p in todo if uses_5_bits(p[1])]
    if limit is not None:
        todo = todo[:limit]
    core = [p for p in todo if not uses_5_bits(p[1])]
    built = itertools.chain(build_grouped(bench, core), build_grouped(bench, todo[len(core):]))
    for done, (params, stages, model, seconds) in enumerate(built, 1):
        row = measured_row(bench, params, stages, model, seconds)
        append_row(row)
        print(f"[{done}/{len(todo)}] {row['label']:<50} ppl {row['perplexity']:8.2f}  {row['weight_mb']:6.1f} MB  "
              f"decode {row['decode_ms_p50']:5.1f} ms ({row['decode_ratio']:.3f}x)  build {seconds['build']:4.1f} s  "
              f"measure {row['seconds']['measure']:4.1f} s  load {os.getloadavg()[0]:.2f}", flush=True)
    check_equivalence(bench, points)


def check_equivalence(bench, points) -> None:
    """Once: the planner's own build of one pruned + quantized point gives the stored perplexity and bytes."""
    from planner.candidates import build

    marker = TABLE.parent / "grid-llamacpp-equivalence.json"
    table = load_table()
    if marker.exists() or len(table) < len(points):
        return
    params, stages = next((p, s) for p, s in points if len(s) == 2 and s[1].spec.method == "rtn")
    row = table[stage_key(stages)]
    again = measured_row(bench, params, stages, build(bench.model, stages, bench.context).model, {})
    result = {"label": row["label"], "table_perplexity": row["perplexity"], "planner_build_perplexity":
              again["perplexity"], "table_bytes": row["weight_bytes"], "planner_build_bytes": again["weight_bytes"],
              "table_decode_ratio": row["decode_ratio"], "planner_build_decode_ratio": again["decode_ratio"]}
    marker.write_text(json.dumps(result, indent=2))
    print(f"equivalence check (planner.candidates.build vs the grid's shared pruning): {result}")


# ---------------------------------------------------------------------------------------------------
# Replaying the samplers
# ---------------------------------------------------------------------------------------------------


def exhaustive(table: dict, keys: set, budget: dict, baseline: dict) -> list[tuple]:
    """Objective values of every grid point that meets `budget` (kind -> "0.3x"), as the planner checks it:
    memory on the GGUF tensor bytes against the baseline's, latency on the same-run decode ratio."""
    rows = [table[k] for k in keys]
    for kind, text in budget.items():
        relative = float(text.rstrip("x"))
        if kind == "memory":
            rows = [r for r in rows if r["weight_bytes"] <= relative * baseline["weight_bytes"]]
        elif kind == "latency":
            rows = [r for r in rows if r["decode_ratio"] <= relative]
        else:
            raise ValueError(f"no {kind} budget in this benchmark")
    return [objective_values(r) for r in rows]


def curve(values: list, normaliser: Normaliser, full: float) -> list[float]:
    """Hypervolume ratio after each trial."""
    ratios, seen = [], []
    for v in values:
        if v is not None:
            seen = nondominated(seen + [v])
        ratios.append(normaliser.hv(seen) / full if seen else 0.0)
    return ratios


def replay_all(seeds: int, trials: int, samplers, budget: str, extra: dict | None = None) -> dict:
    replay = Replay(load_table())
    table = replay.table  # keyed by today's specs; decode ms from each point's same-run ratio
    keys = {stage_key(s) for _, s in grid_points(replay.spaces)}
    baseline = table["[]"]
    grid_size = len(keys)
    target_trials = math.ceil(TARGET_FRACTION * grid_size)
    results = {"grid_size": grid_size, "target_trials": target_trials, "settings": {}}
    for name, budget in settings_for(budget).items():
        front = nondominated(exhaustive(table, keys, budget, baseline))
        normaliser = Normaliser(front)
        full = normaliser.hv(front)
        entry = {"front_size": len(front), "feasible_points": len(exhaustive(table, keys, budget, baseline)),
                 "normalisation": normaliser.describe(), "hv_exhaustive": full, "samplers": {}}
        print(f"\n== {name}: exhaustive front {len(front)} points of {entry['feasible_points']} "
              f"{'feasible ' if budget else ''}grid points; hypervolume over (log ppl, decode ms, MB) scaled to "
              f"[0,1] on that front, {normaliser.describe()}", flush=True)
        header(trials)
        variants = [(s, s, None, None, False, "planner") for s in samplers] + [
            (label, *v) for label, v in (extra or {}).items()]
        for label, sampler, make, enqueued, skip, seeding in variants:
            runs = []
            for seed in range(seeds):
                started = time.perf_counter()
                study, _, out = replay.run(sampler, seed, trials, budget,
                                           sampler_object=make(seed, trials) if make else None,
                                           extra_enqueued=enqueued, skip_over_budget=skip, seeding=seeding)
                ratios = curve(found_values(study, bool(budget)), normaliser, full)
                # The target check: a study of exactly target_trials trials (samplers size themselves by it).
                short, _, _ = replay.run(sampler, seed, target_trials, budget,
                                         sampler_object=make(seed, target_trials) if make else None,
                                         extra_enqueued=enqueued, skip_over_budget=skip, seeding=seeding)
                short_ratio = curve(found_values(short, bool(budget)), normaliser, full)[-1]
                runs.append({"seed": seed, "ratios": ratios, "built": distinct_built(study),
                             "short_ratio": short_ratio, "short_built": distinct_built(short)[-1],
                             "seconds": time.perf_counter() - started})
            entry["samplers"][label] = runs
            entry.setdefault("summary", {})[label] = summarise(label, runs, trials, target_trials)
        results["settings"][name] = entry
    return results


def at_evaluations(run: dict, evaluations: int) -> float:
    """HV ratio after the last trial at which at most `evaluations` candidates had been built (a trial rejected
    from its spec or answered by its measured twin builds nothing)."""
    ratio = 0.0
    for r, built in zip(run["ratios"], run["built"]):
        if built > evaluations:
            break
        ratio = r
    return ratio


def first_median(reach: list) -> float | None:
    """Median over seeds of when the target was first reached (a seed that never gets there counts as infinitely late)."""
    med = statistics.median([math.inf if r is None else r for r in reach])
    return None if math.isinf(med) else med


def first_built_reaching(run: dict, target: float) -> int | None:
    """The number of candidates built by which the run's HV ratio first reached `target` (None: never)."""
    return next((e for e in range(1, run["built"][-1] + 1) if at_evaluations(run, e) >= target), None)


def summarise(label: str, runs: list, trials: int, target_trials: int) -> dict:
    """HV ratio by candidates built (= counted trials: `--trials` counts distinct candidates; twins of measured
    candidates and specs over a memory budget are drawn on top and build nothing), median and worst seed."""
    marks = [c for c in CHECKPOINTS if c <= trials]
    med = [statistics.median(at_evaluations(r, c) for r in runs) for c in marks]
    low = [min(at_evaluations(r, c) for r in runs) for c in marks]
    reach = [first_built_reaching(r, TARGET_RATIO) for r in runs]
    reached = sorted(x for x in reach if x is not None)
    shorts = [r["short_ratio"] for r in runs]
    drawn = statistics.median(len(r["ratios"]) for r in runs)
    print(f"  {label:<22} " + " ".join(f"{m:6.3f}" for m in med) + "   (median over seeds)")
    print(f"  {'':<22} " + " ".join(f"{m:6.3f}" for m in low) + "   (worst seed)")
    print(f"  {'':<22} study of {target_trials} trials: HV ratio median {statistics.median(shorts):.3f}, worst "
          f"{min(shorts):.3f}, >= {TARGET_RATIO} in {sum(s >= TARGET_RATIO for s in shorts)}/{len(shorts)} seeds; "
          f"{trials}-trial study: {drawn:.0f} trials drawn (median), first at >= {TARGET_RATIO} after "
          f"{first_median(reach) or 'not reached'} candidates built (median; reached in {len(reached)}/{len(runs)} "
          "seeds)", flush=True)
    return {"median": dict(zip(marks, med)), "worst": dict(zip(marks, low)), "short_median": statistics.median(shorts),
            "short_worst": min(shorts), "short_hits": sum(s >= TARGET_RATIO for s in shorts), "drawn_median": drawn,
            "reached": len(reached), "first_median": first_median(reach)}


def header(trials: int) -> None:
    marks = [c for c in CHECKPOINTS if c <= trials]
    print(f"  {'candidates built ->':<22} " + " ".join(f"{m:>6}" for m in marks))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["settings"])
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), sharey=True, squeeze=False)
    for col, name in enumerate(names):
        entry = results["settings"][name]
        for row, by in enumerate(("trials", "built")):
            ax = axes[row][col]
            for label, runs in entry["samplers"].items():
                if by == "trials":  # trials drawn (repeats drawn on top of the count vary by seed)
                    n = min(len(r["ratios"]) for r in runs)
                    series = [r["ratios"] for r in runs]
                else:
                    n = min(r["built"][-1] for r in runs)
                    series = [[at_evaluations(r, e) for e in range(1, n + 1)] for r in runs]
                xs = list(range(1, n + 1))
                med = [statistics.median(s[i] for s in series) for i in range(n)]
                lo = [min(s[i] for s in series) for i in range(n)]
                hi = [max(s[i] for s in series) for i in range(n)]
                line, = ax.plot(xs, med, label=f"{label} (median of {len(runs)} seeds)")
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
            ax.axhline(TARGET_RATIO, color="grey", ls="--", lw=0.8)
            ax.axvline(results["target_trials"], color="grey", ls=":", lw=0.8)
            ax.set_xlabel("trials drawn (seeds included; twins drawn on top of the count)" if by == "trials" else
                          "candidates built (rejected-from-spec and duplicate trials excluded)")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{name}: {entry['front_size']}-point exhaustive front, grid of {results['grid_size']}")
        axes[0][col].legend(loc="lower right", fontsize=8)
    for row in range(2):
        axes[row][0].set_ylabel("hypervolume / exhaustive hypervolume")
    fig.suptitle("Search quality on the built-in model, llama.cpp target, replayed on the measured grid (band: worst to best seed; "
                 "dashed: 95%; dotted: 15% of the grid)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"\nplot written to {path}")


def table_summary() -> None:
    table = load_table()
    rows = sorted(table.values(), key=lambda r: r["weight_mb"])
    cost = [r["seconds"]["build"] + r["seconds"]["measure"] for r in rows]
    decode, prefill = reference_decode_ms(table)
    loads = [r["load_average_before"][0] for r in rows]
    same = sum(r["weight_bytes"] == r["estimated_weight_bytes"] for r in rows)
    print(f"table: {len(rows)} points; build + measure per point median {statistics.median(cost):.1f} s, "
          f"{sum(cost) / 60:.1f} min in all, plus one pruning per shape; load average (1 min) "
          f"{min(loads):.1f}-{max(loads):.1f}; uncompressed GGUF's decode p50 {decode:.2f} ms, prefill p50 "
          f"{prefill:.1f} ms (median of its A/B runs: the scale of the replay's decode ms); GGUF tensor bytes equal "
          f"the planner's spec-only estimate for {same} of {len(rows)} points")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluate", action="store_true", help="measure the grid points not yet in the table")
    parser.add_argument("--limit", type=int, default=None, help="with --evaluate: at most this many points")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=60, help="trials per replayed study (the curve's length)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--plot", type=Path, default=DOCS / "search_quality.png")
    parser.add_argument("--budget", default=BUDGET, help="kind=fraction replayed beside no budget (default: %(default)s)")
    parser.add_argument("--no-before", action="store_true", help="leave out the hand-picked-seeds-only comparison")
    parser.add_argument("--replot", action="store_true", help="only draw the plot again from the stored replay")
    args = parser.parse_args()
    if args.evaluate:
        evaluate(args.limit)
        return
    if args.replot:
        plot(json.loads(OUTPUT.read_text()), args.plot)
        return
    table_summary()
    samplers = [s for s in args.samplers.split(",") if s]
    results = {"header_trials": args.trials}
    print(f"replay: {args.seeds} seeds per sampler, studies of {args.trials} trials (curves) and of 15% of the grid")
    results.update(replay_all(args.seeds, args.trials, samplers, args.budget, extra=None if args.no_before else prototypes()))
    OUTPUT.write_text(json.dumps(results))
    try:
        plot(results, args.plot)
    except ImportError:
        print("\nno plot: matplotlib is not installed (pip install -e .[bench])")


def prototypes() -> dict:
    """Variants of the default search run through the same replay: label -> (sampler name, sampler factory or
    None, extra enqueued trial parameters, skip enqueued candidates over the memory budget, seeding). The
    planner's seeding before the search-quality benchmark (hand-picked presets on the unpruned model only)."""
    return {"tpe, hand-picked seeds only (before)": ("tpe", None, None, False, "hand_picked"),
            "random, hand-picked seeds only (before)": ("random", None, None, False, "hand_picked")}


if __name__ == "__main__":
    main()
