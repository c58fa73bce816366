"""Against uniform baselines: the planner's recommended candidate vs the best uniform recipe, per budget.

    .venv/bin/python bench/uniform_baselines.py [--seeds 10] [--trials 20,40] [--budgets memory=0.3x,...]

Uses the measured grid table of search_quality.py (llama.cpp target; run `search_quality.py --evaluate` first).
For each budget (weights <= a fraction of the baseline's GGUF tensor bytes, or decode <= a fraction of the
uncompressed GGUF's time per token, on the same-run ratio the planner checks), the planner's search is
replayed against the table (its real study code: default sampler, seeds enqueued, budgets as constraints,
the recommended candidate = best perplexity among feasible measured trials; see _grid.Replay) for several
seeds and study lengths, and its recommended candidate is put beside the best *uniform* recipe of the grid
that meets the same budget: one GGUF type for every quantized layer group (RTN Q4_0 / Q5_0 / Q8_0 for
attention and MLP alike, the head F16 or the same type), no pruning, or the uncompressed model. The best
candidate of the whole grid under the budget (the oracle) is shown too. The planner must never lose.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._grid import TABLE, Replay, grid_points, load_table, stage_key  # noqa: E402

DEFAULT_BUDGETS = "memory=0.3x,memory=0.22x,latency=0.25x"
METRIC = {"memory": "weight_bytes", "latency": "decode_ratio"}
NAMES = {"memory": "memory", "latency": "decode"}


def uniform(row: dict) -> bool:
    """One GGUF type everywhere that is quantized: attention = MLP, the head F16 (shared) or that type too."""
    params = row["params"]
    if params.get("pruning.enabled"):
        return False
    method = params["quantization.method"]
    if method == "none":
        return True  # the uncompressed model
    bits = (params[f"quantization.{method}.attn_bits"], params[f"quantization.{method}.mlp_bits"])
    return bits[0] == bits[1] and params.get(f"quantization.{method}.head_bits", 16) in (16, bits[0])


def parse_budgets(text: str) -> dict[str, tuple[str, float]]:
    budgets = {}
    for item in text.split(","):
        kind, value = item.split("=")
        budgets[f"{NAMES[kind]} <= {value}"] = (kind, float(value.rstrip("x")))
    return budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", default="20,40", help="study lengths to replay (comma-separated)")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                        help="kind=fraction of the baseline, comma-separated (memory: GGUF tensor bytes; latency: the "
                             "same-run decode ratio)")
    parser.add_argument("--before", action="store_true",
                        help="seed studies as the planner did before the search-quality benchmark (hand-picked only)")
    args = parser.parse_args()
    replay = Replay(load_table())
    table = replay.table  # keyed by today's specs, decode ms from each point's same-run ratio
    keys = {stage_key(s) for _, s in grid_points(replay.spaces)}
    rows = [table[k] for k in keys]
    baseline = table["[]"]
    results = []
    print(f"grid of {len(rows)} measured candidates; baseline ppl {baseline['perplexity']:.2f}, "
          f"{baseline['weight_mb']:.1f} MB (GGUF tensor bytes); planner = replayed "
          f"'{args.sampler}' studies, {args.seeds} seeds each\n")
    print(f"{'budget':<16} {'limit':>10} {'best uniform recipe':<38} {'ppl':>8} {'oracle (grid best)':<50} {'ppl':>8}"
          f"  planner recommended ppl by study length: median [worst] (losses)")
    for name, (kind, relative) in parse_budgets(args.budgets).items():
        limit = relative * baseline[METRIC[kind]] if kind == "memory" else relative  # a ratio is checked as such
        meets = [r for r in rows if r[METRIC[kind]] <= limit]
        best_uniform = min((r for r in meets if uniform(r)), key=lambda r: r["perplexity"], default=None)
        oracle = min(meets, key=lambda r: r["perplexity"])
        shown_limit = f"{limit / 1e6:.1f} MB" if kind == "memory" else f"{limit:.2f}x"
        cells, entry = [], {"budget": name, "limit": limit, "oracle": oracle["label"],
                            "oracle_ppl": oracle["perplexity"], "planner": {}}
        if best_uniform is not None:
            entry.update(uniform=best_uniform["label"], uniform_ppl=best_uniform["perplexity"])
        for trials in [int(t) for t in args.trials.split(",")]:
            found = []
            for seed in range(args.seeds):
                _, _, out = replay.run(args.sampler, seed, trials, {kind: f"{relative}x"},
                                       seeding="hand_picked" if args.before else "planner")
                rec = out.recommended
                found.append((rec.user_attrs["metrics"]["perplexity"], rec.user_attrs["label"]) if rec else (None, None))
            ppls = [p for p, _ in found if p is not None]
            losses = sum(1 for p, _ in found if p is None or (best_uniform and p > best_uniform["perplexity"] + 1e-9))
            entry["planner"][trials] = found
            cells.append(f"{trials} trials: {statistics.median(ppls):.2f} [{max(ppls):.2f}] ({losses} of {len(found)})"
                         if ppls else f"{trials} trials: none feasible")
        uniform_cell = (f"{best_uniform['label']:<38} {best_uniform['perplexity']:8.2f}" if best_uniform
                        else f"{'(none meets the budget)':<38} {'-':>8}")
        print(f"{name:<16} {shown_limit:>10} {uniform_cell} {oracle['label']:<50} {oracle['perplexity']:8.2f}  "
              + "; ".join(cells), flush=True)
        results.append(entry)
    print("\nrecommended candidates (label: number of seeds), longest study:")
    for entry in results:
        longest = max(entry["planner"])
        labels = {}
        for _, label in entry["planner"][longest]:
            labels[label] = labels.get(label, 0) + 1
        print(f"  {entry['budget']:<16} " + ", ".join(f"{k}: {v}" for k, v in sorted(labels.items(), key=lambda x: -x[1])))
    name = "uniform_baselines_llamacpp" + ("_before" if args.before else "") + ".json"
    (TABLE.parent / name).write_text(json.dumps(results, indent=1))  # beside the table it replays


if __name__ == "__main__":
    main()
