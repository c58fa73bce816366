"""Against uniform baselines: the planner's recommended candidate vs the best uniform recipe, per budget.

    .venv/bin/python bench/uniform_baselines.py [--seeds 10] [--trials 20,40]

Uses the measured grid table of search_quality.py (run `search_quality.py --evaluate` and `--latency` first).
For each budget (weights <= 0.4x and <= 0.25x of the baseline's, decode p50 <= 0.7x of the baseline's), the
planner's search is replayed against the table (its real study code: default sampler, presets enqueued,
budgets as constraints, the recommended candidate = best perplexity among feasible measured trials; see
_grid.Replay) for several seeds and study lengths, and its recommended candidate is put beside the best
*uniform* recipe of the grid that meets the same budget: one bit-width for every quantized layer group
(rtn or gptq at a/a bits, dynamic-int8 on attn+mlp, or the unquantized model) and no pruning. The best
candidate of the whole grid under the budget (the oracle) is shown too. The planner must never lose.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._grid import RESULTS, Replay, grid_points, load_table, stage_key  # noqa: E402


BUDGETS = {"memory <= 0.4x": ("memory", 0.4), "memory <= 0.25x": ("memory", 0.25), "decode <= 0.7x": ("latency", 0.7)}
METRIC = {"memory": "weight_bytes", "latency": "decode_ms_p50"}


def uniform(row: dict) -> bool:
    params = row["params"]
    if "prune(" in row["label"]:  # the label, not a parameter name: rows stored before the prefix rename
        return False
    method = params["quantization.method"]
    if method in ("rtn", "gptq"):
        return params[f"quantization.{method}.attn_bits"] == params[f"quantization.{method}.mlp_bits"]
    if method == "dynamic-int8":
        return params["quantization.dynamic-int8.groups"] == "attn+mlp"
    return True  # no quantization: 16 bits everywhere


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", default="20,40", help="study lengths to replay (comma-separated)")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--before", action="store_true",
                        help="seed studies as the planner did before the search-quality benchmark (hand-picked only)")
    args = parser.parse_args()
    table = load_table()
    replay = Replay(table)
    keys = {stage_key(s) for _, s in grid_points(replay.spaces)}
    rows = [table[k] for k in keys]
    baseline = table["[]"]
    results = []
    print(f"grid of {len(rows)} measured candidates; baseline ppl {baseline['perplexity']:.2f}, "
          f"{baseline['weight_mb']:.1f} MB, decode {baseline['decode_ms_p50']:.2f} ms; planner = replayed "
          f"'{args.sampler}' studies, {args.seeds} seeds each\n")
    print(f"{'budget':<16} {'limit':>10} {'best uniform recipe':<38} {'ppl':>8} {'oracle (grid best)':<50} {'ppl':>8}"
          f"  planner recommended ppl by study length: median [worst] (losses)")
    for name, (kind, relative) in BUDGETS.items():
        limit = relative * baseline[METRIC[kind]]
        meets = [r for r in rows if r[METRIC[kind]] <= limit]
        best_uniform = min((r for r in meets if uniform(r)), key=lambda r: r["perplexity"], default=None)
        oracle = min(meets, key=lambda r: r["perplexity"])
        shown_limit = f"{limit / 1e6:.1f} MB" if kind == "memory" else f"{limit:.2f} ms"
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "uniform_baselines" + ("_before" if args.before else "") + ".json"
    (RESULTS / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
