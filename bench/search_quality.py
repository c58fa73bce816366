"""Search quality: how close each sampler's front gets to the exhaustive front of a real grid, per trial.

    nice -n 10 .venv/bin/python bench/search_quality.py --evaluate     # perplexity + bytes of every point (resumable)
    nice -n 10 .venv/bin/python bench/search_quality.py --latency      # latency per compute graph (quiet machine)
    .venv/bin/python bench/search_quality.py                            # replay the samplers, tables + PNG

`--evaluate` builds and measures every point of the grid in `_grid.py` (the planner's search space narrowed
to depth {1, 0.8} x MLP {1, 0.75, 0.5} x quantization {none, rtn/gptq at attn/MLP bits {3,4,8}^2, dynamic-int8
on attn+mlp/attn/mlp}, head shared at 16 bits, group size 128) once, with demo.toml's perplexity protocol, and
appends one JSON line per point to bench/results/grid*.jsonl (an interrupted run continues where it was).
`--latency` times each distinct compute graph (pruned shape x float / dynamic-int8 kernels) round-robin:
rtn/gptq candidates run the float graph of their shape (they are evaluated in float with the weights their
checkpoint decodes to), so per-point timings would differ only by the machine's noise.
Each pruned model is built once and every quantization of it is built from a copy (the same result as the
planner's build, which applies the stages in the same order to a fresh copy; checked once on one point).

The replay runs the planner's real study code against the table (see `_grid.Replay`): TPE (the default),
NSGA-II and random, several seeds each, with no budget and with demo.toml's memory budget (0.3x). It prints
the hypervolume of each run's front relative to the exhaustive front's after each number of trials, with
the same normalisation and reference point for every method (stated in the output), and writes
docs/search_quality.png and bench/results/search_quality.json.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._grid import (LATENCY, RESULTS, TABLE, Normaliser, Replay, append_row, distinct_built,  # noqa: E402
                         found_values, graph_of, grid_points, grid_settings, load_table, nondominated,
                         load_latency, objective_values, stage_key)
from bench._grid import DEPTH_KEEP, MLP_KEEP  # noqa: E402
from planner.candidates import describe  # noqa: E402

SAMPLERS = ("tpe", "nsga2", "random")
SETTINGS = {"no budget": {}, "memory <= 0.3x": {"memory": "0.3x"}}
CHECKPOINTS = (5, 10, 15, 20, 25, 30, 40, 50, 60)
TARGET_RATIO, TARGET_FRACTION = 0.95, 0.15
DOCS = Path(__file__).resolve().parents[1] / "docs"


# ---------------------------------------------------------------------------------------------------
# Measuring the grid
# ---------------------------------------------------------------------------------------------------


def prune_part(stages) -> list:
    return [s for s in stages if s.technique == "pruning"]


def build_grouped(bench, todo):
    """Yield (params, stages, model, build seconds), pruning each shape once and quantizing copies of it."""
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


def evaluate(worker: str, limit: int | None, shard: str = "0/1") -> None:
    """Perplexity and exact stored bytes of every grid point not yet in the table (deterministic figures,
    so two workers may share the machine: `--worker gptq` takes the GPTQ points, `--worker rest` the others)."""
    import torch

    from evaluators.memory import weight_bytes
    from evaluators.perplexity import measure_perplexity
    from planner.candidates import estimate_weight_bytes
    from planner.quiet import quiet_libraries
    from planner.study import prepare

    quiet_libraries()
    bench = prepare(grid_settings())
    points = grid_points(bench.spaces)
    table = load_table()
    todo = [(params, stages) for params, stages in points if stage_key(stages) not in table]
    is_gptq = lambda stages: any(getattr(s.spec, "method", None) == "gptq" for s in stages)  # noqa: E731
    if worker != "all":
        todo = [(p, s) for p, s in todo if is_gptq(s) == (worker == "gptq")]
    index, count = (int(x) for x in shard.split("/"))
    if count > 1:  # whole pruned shapes per shard, so no shape is pruned twice
        shapes = list(dict.fromkeys(stage_key(prune_part(s)) for _, s in todo))
        todo = [(p, s) for p, s in todo if shapes.index(stage_key(prune_part(s))) % count == index]
    out = TABLE if worker in ("all", "rest") else TABLE.with_name(f"{TABLE.stem}.{worker}{index}.jsonl")
    print(f"grid: {len(points)} distinct candidates, {len(table)} in the table, {len(todo)} for worker '{worker}'; "
          f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}", flush=True)
    if limit is not None:
        todo = todo[:limit]
    protocol = bench.settings.perplexity_protocol()
    for done, (params, stages, model, seconds) in enumerate(build_grouped(bench, todo), 1):
        started = time.perf_counter()
        size = weight_bytes(model).total_bytes
        ppl = measure_perplexity(model, bench.tokenizer, bench.corpus.eval, protocol)
        seconds["perplexity"] = time.perf_counter() - started
        estimate = estimate_weight_bytes(bench.model, stages)
        assert size == estimate, (size, estimate, stages)
        label = describe(stages)
        append_row({"key": stage_key(stages), "params": params, "label": label, "graph": graph_of(stages),
                    "weight_bytes": size, "weight_mb": size / 1e6, "perplexity": ppl.perplexity,
                    "bits_per_byte": ppl.bits_per_byte, "perplexity_protocol": protocol.to_dict(),
                    "seconds": seconds, "load_average": os.getloadavg()[0]}, out)
        print(f"[{done}/{len(todo)}] {label:<52} ppl {ppl.perplexity:9.2f}  {size / 1e6:6.1f} MB  "
              f"build {seconds['build']:5.1f} s  ppl {seconds['perplexity']:4.1f} s  load {os.getloadavg()[0]:.2f}",
              flush=True)
    check_equivalence(bench, points)


def measure_graph_latency(rounds: int) -> None:
    """Decode and prefill latency of each distinct compute graph of the grid (pruned shape x kernels), with
    the grid's latency protocol, measured round-robin over all graphs `rounds` times so that load changes
    on a shared machine hit every graph alike; the median over rounds of each round's p50 is kept."""
    import torch

    from evaluators.latency import measure_latency
    from planner.quiet import quiet_libraries
    from planner.study import prepare

    quiet_libraries()
    bench = prepare(grid_settings())
    representatives = {}
    for params, stages in grid_points(bench.spaces):
        representatives.setdefault(graph_of(stages), (params, stages))
    print(f"{len(representatives)} compute graphs; torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    models = {}
    # The pruning stage as it is; quantization only when it changes the kernels (dynamic-int8).
    float_stages = {graph: [s for s in stages if s.technique == "pruning" or s.spec.method == "dynamic-int8"]
                    for graph, (_, stages) in representatives.items()}
    for (params, stages, model, _), graph in zip(build_grouped(bench, [(p, float_stages[g])
                                                                         for g, (p, _) in representatives.items()]),
                                                  representatives):
        models[graph] = model
    protocol = bench.settings.latency_protocol()
    samples = {graph: [] for graph in models}
    for r in range(rounds):
        for graph, model in models.items():
            result = measure_latency(model, protocol)
            samples[graph].append((result.decode.p50_ms, result.prefill.p50_ms, result.load_average_before[0]))
        print(f"round {r + 1}/{rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)
    LATENCY.unlink(missing_ok=True)
    for graph, values in samples.items():
        decode = sorted(v[0] for v in values)
        row = {"graph": graph, "decode_ms_p50": statistics.median(decode),
               "prefill_ms_p50": statistics.median(v[1] for v in values), "decode_rounds": [v[0] for v in values],
               "load_averages": [v[2] for v in values], "protocol": protocol.to_dict(),
               "layers": models[graph].config.num_hidden_layers, "intermediate": models[graph].config.intermediate_size}
        append_row(row, LATENCY)
        print(f"  {graph:<40} decode p50 {row['decode_ms_p50']:6.1f} ms (rounds {decode[0]:.1f}-{decode[-1]:.1f})  "
              f"prefill {row['prefill_ms_p50']:6.1f} ms  ({row['layers']} layers, MLP {row['intermediate']})", flush=True)


def check_equivalence(bench, points) -> None:
    """Once: the planner's own build of one pruned + quantized point gives the stored perplexity and bytes."""
    from planner.candidates import build

    marker = RESULTS / "grid-equivalence.json"
    table = load_table()
    if marker.exists() or len(table) < len(points):
        return
    from evaluators.memory import weight_bytes
    from evaluators.perplexity import measure_perplexity

    params, stages = next((p, s) for p, s in points if len(s) == 2 and s[1].spec.method == "rtn")
    row = table[stage_key(stages)]
    built = build(bench.model, stages, bench.context).model
    again = measure_perplexity(built, bench.tokenizer, bench.corpus.eval, bench.settings.perplexity_protocol())
    result = {"label": row["label"], "table_perplexity": row["perplexity"], "planner_build_perplexity":
              again.perplexity, "table_bytes": row["weight_bytes"], "planner_build_bytes": weight_bytes(built).total_bytes}
    marker.write_text(json.dumps(result, indent=2))
    print(f"equivalence check (planner.candidates.build vs the grid's shared pruning): {result}")


# ---------------------------------------------------------------------------------------------------
# Replaying the samplers
# ---------------------------------------------------------------------------------------------------


def exhaustive(table: dict, keys: set, budget: dict, baseline: dict) -> list[tuple]:
    rows = [table[k] for k in keys]
    if "memory" in budget:
        limit = float(budget["memory"].rstrip("x")) * baseline["weight_bytes"]
        rows = [r for r in rows if r["weight_bytes"] <= limit]
    return [objective_values(r) for r in rows]


def curve(values: list, normaliser: Normaliser, full: float) -> list[float]:
    """Hypervolume ratio after each trial."""
    ratios, seen = [], []
    for v in values:
        if v is not None:
            seen = nondominated(seen + [v])
        ratios.append(normaliser.hv(seen) / full if seen else 0.0)
    return ratios


def first_reaching(ratios: list[float], target: float) -> int | None:
    return next((i + 1 for i, r in enumerate(ratios) if r >= target), None)


def replay_all(seeds: int, trials: int, samplers, extra: dict | None = None) -> dict:
    table = load_table()
    replay = Replay(table)
    keys = {stage_key(s) for _, s in grid_points(replay.spaces)}
    baseline = table["[]"]
    grid_size = len(keys)
    target_trials = math.ceil(TARGET_FRACTION * grid_size)
    results = {"grid_size": grid_size, "target_trials": target_trials, "settings": {}}
    for name, budget in SETTINGS.items():
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
    """Median first trial at the target over seeds (a seed that never gets there counts as infinitely late)."""
    med = statistics.median([math.inf if r is None else r for r in reach])
    return None if math.isinf(med) else med


def summarise(label: str, runs: list, trials: int, target_trials: int) -> dict:
    marks = [c for c in CHECKPOINTS if c <= trials]
    med = [statistics.median(r["ratios"][c - 1] for r in runs) for c in marks]
    low = [min(r["ratios"][c - 1] for r in runs) for c in marks]
    reach = [first_reaching(r["ratios"], TARGET_RATIO) for r in runs]
    reached = sorted(x for x in reach if x is not None)
    shorts = [r["short_ratio"] for r in runs]
    by_evals = [at_evaluations(r, target_trials) for r in runs]
    print(f"  {label:<22} " + " ".join(f"{m:6.3f}" for m in med) + "   (median over seeds)")
    print(f"  {'':<22} " + " ".join(f"{m:6.3f}" for m in low) + "   (worst seed)")
    print(f"  {'':<22} study of {target_trials} trials: HV ratio median {statistics.median(shorts):.3f}, worst "
          f"{min(shorts):.3f}, >= {TARGET_RATIO} in {sum(s >= TARGET_RATIO for s in shorts)}/{len(shorts)} seeds "
          f"({statistics.median(r['short_built'] for r in runs):.0f} candidates built, median)")
    print(f"  {'':<22} {trials}-trial study after {target_trials} candidates built: median "
          f"{statistics.median(by_evals):.3f}, worst {min(by_evals):.3f}, >= {TARGET_RATIO} in "
          f"{sum(b >= TARGET_RATIO for b in by_evals)}/{len(by_evals)}; first trial at >= {TARGET_RATIO}: median "
          f"{first_median(reach) or 'not reached'} "
          f"(reached in {len(reached)}/{len(runs)} seeds)", flush=True)
    return {"median": dict(zip(marks, med)), "worst": dict(zip(marks, low)), "short_median": statistics.median(shorts),
            "short_worst": min(shorts), "short_hits": sum(s >= TARGET_RATIO for s in shorts),
            "evals_median": statistics.median(by_evals), "evals_worst": min(by_evals),
            "evals_hits": sum(b >= TARGET_RATIO for b in by_evals), "reached": len(reached),
            "first_median": first_median(reach)}


def header(trials: int) -> None:
    marks = [c for c in CHECKPOINTS if c <= trials]
    print(f"  {'trials ->':<22} " + " ".join(f"{m:>6}" for m in marks))


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
                if by == "trials":
                    n = len(runs[0]["ratios"])
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
            ax.set_xlabel("trials (presets included)" if by == "trials" else
                          "candidates built (rejected-from-spec and duplicate trials excluded)")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{name}: {entry['front_size']}-point exhaustive front, grid of {results['grid_size']}")
        axes[0][col].legend(loc="lower right", fontsize=8)
    for row in range(2):
        axes[row][0].set_ylabel("hypervolume / exhaustive hypervolume")
    fig.suptitle("Search quality on the built-in model, replayed on the measured grid (band: worst to best seed; "
                 "dashed: 95%; dotted: 15% of the grid)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"\nplot written to {path}")


def table_summary() -> None:
    table = load_table()
    rows = sorted(table.values(), key=lambda r: r["weight_mb"])
    build = [r["seconds"]["build"] + r["seconds"]["perplexity"] for r in rows]
    gptq = [b for r, b in zip(rows, build) if "gptq" in r["label"]]
    print(f"table: {len(rows)} points; build + perplexity per point median {statistics.median(build):.1f} s "
          f"(gptq {statistics.median(gptq or [0]):.1f} s), {sum(build) / 60:.1f} min in all, plus one pruning per shape; "
          f"{len(load_latency())} compute graphs timed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluate", action="store_true", help="measure the grid points not yet in the table")
    parser.add_argument("--worker", choices=("all", "gptq", "rest"), default="all",
                        help="with --evaluate: which points this process measures (two may run at once)")
    parser.add_argument("--shard", default="0/1", help="with --evaluate: K/N, this process's share of the shapes")
    parser.add_argument("--latency", action="store_true", help="measure each compute graph's latency (quiet machine)")
    parser.add_argument("--rounds", type=int, default=5, help="with --latency: interleaved rounds")
    parser.add_argument("--limit", type=int, default=None, help="with --evaluate: at most this many points")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=60, help="trials per replayed study (the curve's length)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--plot", type=Path, default=DOCS / "search_quality.png")
    parser.add_argument("--count-effect", action="store_true",
                        help="only compare what --trials counts (distinct candidates vs every trial) under 0.3x memory")
    args = parser.parse_args()
    if args.evaluate:
        evaluate(args.worker, args.limit, args.shard)
        return
    if args.latency:
        measure_graph_latency(args.rounds)
        return
    if args.count_effect:
        count_effect(args.seeds)
        return
    table_summary()
    samplers = [s for s in args.samplers.split(",") if s]
    results = {"header_trials": args.trials}
    print(f"replay: {args.seeds} seeds per sampler, studies of {args.trials} trials (curves) and of 15% of the grid")
    results.update(replay_all(args.seeds, args.trials, samplers, extra=prototypes()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search_quality.json").write_text(json.dumps(results))
    plot(results, args.plot)


def count_effect(seeds: int) -> None:
    """TPE studies of 15% of the grid under demo.toml's memory budget, counted as the planner counts (distinct
    candidates built) and as it counted before (every trial, twins and spec rejections included)."""
    replay = Replay(load_table())
    table = replay.table  # keyed by today's specs
    keys = {stage_key(s) for _, s in grid_points(replay.spaces)}
    budget = SETTINGS["memory <= 0.3x"]
    front = nondominated(exhaustive(table, keys, budget, table["[]"]))
    normaliser = Normaliser(front)
    full = normaliser.hv(front)
    trials = math.ceil(TARGET_FRACTION * len(keys))
    print(f"tpe, memory <= 0.3x, studies of {trials} trials, {seeds} seeds: HV ratio (median, worst, seeds >= "
          f"{TARGET_RATIO}), candidates built (median), trials drawn (median)")
    for label, every in (("every trial counts (before)", True), ("distinct candidates count (now)", False)):
        ratios, built, drawn = [], [], []
        for seed in range(seeds):
            study, _, _ = replay.run("tpe", seed, trials, budget, every_trial_counts=every)
            ratios.append(curve(found_values(study, True), normaliser, full)[-1])
            built.append(distinct_built(study)[-1])
            drawn.append(len(study.trials))
        print(f"  {label:<32} {statistics.median(ratios):.3f} {min(ratios):.3f} "
              f"{sum(r >= TARGET_RATIO for r in ratios)}/{seeds}   built {statistics.median(built):.0f}   "
              f"drawn {statistics.median(drawn):.0f}", flush=True)


def pruned_presets(shapes) -> list[dict]:
    """The 4-bit GPTQ and dynamic-int8 presets on pruned shapes (depth keep, MLP keep), as trial parameters."""
    quant = [{"quantization.method": "gptq", "quantization.gptq.attn_bits": 4, "quantization.gptq.mlp_bits": 4},
             {"quantization.method": "dynamic-int8", "quantization.dynamic-int8.groups": "attn+mlp"}]
    return [{"pruning.enabled": True, "pruning.depth_keep": d, "pruning.mlp_keep": m, **q} for d, m in shapes for q in quant]


def prototypes() -> dict:
    """Variants of the default search tried against it: label -> (sampler name, sampler factory or None, extra
    enqueued trial parameters, skip enqueued candidates over the memory budget, seeding). The planner's seeding
    before this benchmark, and a prototype of a smaller warm start, run through the same replay."""
    corners = [(1.0, min(MLP_KEEP)), (min(DEPTH_KEEP), 1.0), (min(DEPTH_KEEP), min(MLP_KEEP))]
    shapes = [(d, m) for d in DEPTH_KEEP for m in MLP_KEEP if (d, m) != (1.0, 1.0)]
    return {"tpe, hand-picked seeds only (before)": ("tpe", None, None, False, "hand_picked"),
            "random, hand-picked seeds only (before)": ("random", None, None, False, "hand_picked"),
            "tpe + presets on pruning corners": ("tpe", None, pruned_presets(corners), True, "hand_picked")}


if __name__ == "__main__":
    main()
