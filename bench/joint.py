"""The joint search against single techniques, under a decode budget quantization alone cannot meet.

    nice -n 10 .venv/bin/python bench/joint.py [--trials 10] [--seeds 0 1 2] [--spaces joint quant ...]

On the built-in model and the default target (llama.cpp on a CPU), with `studies/demo.toml`'s evaluation
protocol and budget (decode <= 0.3x the float model, timed A/B in the same run; 4-bit quantization
everywhere reaches about 0.33x), it runs one real study per space and seed, all at the same trial count:

- joint: distilled students + pruning (with healing) + quantization, as in the demo;
- quant: quantization only;
- prune+quant: structured pruning (no healing) + quantization;
- distill+quant: distilled students + quantization.

For each run it records the recommended candidate's perplexity and kl (objectives: perplexity, kl, decode),
how many trials of each technique combination the study stored, the seconds spent training (students and
healing) as stored on the trials, what the same runs would cost from a cold cache, and how many runs reached
each rung. Students are cached under $PLANNER_CACHE and shared between runs of one seed (the joint and the
distill+quant studies train the same students): the cold-cache column counts each run's own lineages at the
steps they reached, from their recorded seconds per step. Results: bench/results/joint.jsonl (one line per
run, appended) and a table. Figures, not assertions: threads, CPU capability and load are printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from planner import rungs  # noqa: E402
from planner.outcome import measured  # noqa: E402
from planner.quiet import quiet_libraries  # noqa: E402
from planner.settings import make_settings, read_study_file  # noqa: E402
from planner.study import open_study, run_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "joint.jsonl"
DEMO = read_study_file(ROOT / "studies" / "demo.toml")
SPACES = {
    "joint": {},
    "quant": {"distillation": False, "pruning": False},
    "prune+quant": {"distillation": False, "pruning": {**DEMO["space"]["pruning"], "heal": [False]}},
    "distill+quant": {"pruning": False},
}


def settings_for(space: str, seed: int, trials: int, folder: Path):
    values = {**DEMO, "study": f"joint-{space.replace('+', '_')}-{seed}", "storage": f"sqlite:///{folder}/joint.db",
              "recipe": str(folder / "recipe.yaml"), "seed": seed, "trials": trials,
              "objectives": "perplexity,kl,decode_ms_p50",
              "space": {**DEMO["space"], **SPACES[space]}}
    return make_settings(values, {})


def combination(trial) -> str:
    return "+".join(s["technique"] for s in trial.user_attrs.get("stages", [])) or "baseline"


def training_figures(trials) -> dict:
    """Seconds this run trained, and what its lineages would cost trained from nothing (steps x s/step)."""
    spent, cold = 0.0, {}
    for trial in trials:
        for technique, run in trial.user_attrs.get("training", {}).items():
            spent += run["train_seconds"]
            stages = trial.user_attrs["stages"]
            lineage = rungs.lineage(stages, next(i for i, s in enumerate(stages) if s["technique"] == technique))
            cost = run["steps"] * run["seconds_per_step"]
            cold[lineage] = max(cold.get(lineage, 0.0), cost)
    return {"train_seconds": round(spent, 1), "cold_cache_train_seconds": round(sum(cold.values()), 1)}


def run_one(space: str, seed: int, trials: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="planner-joint-") as folder:
        settings = settings_for(space, seed, trials, Path(folder))
        started = time.perf_counter()
        study, bench = open_study(settings)
        outcome = run_study(study, bench, quiet=True)
        seconds = time.perf_counter() - started
    stored = study.get_trials(deepcopy=False)
    best = outcome.recommended
    combos: dict[str, int] = {}
    for trial in stored:
        if measured(trial) and "duplicate_of" not in trial.user_attrs:
            combos[combination(trial)] = combos.get(combination(trial), 0) + 1
    metrics = best.user_attrs["metrics"] if best is not None else {}
    return {
        "space": space, "seed": seed, "trials": trials, "drawn": len(stored), "seconds": round(seconds, 1),
        "recommended": best.user_attrs["label"] if best is not None else None,
        "perplexity": metrics.get("perplexity"), "kl": metrics.get("kl"),
        "decode_ratio": metrics.get("decode_ratio"), "weight_mb": metrics.get("weight_mb"),
        "feasible": sum(1 for t in outcome.front), "combinations": combos,
        "rungs": {t: {str(k): v for k, v in c.items()} for t, c in rungs.rung_counts(study).items()},
        **training_figures(stored),
        "baseline_perplexity": bench.baseline.get("perplexity"),
        "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
        "load": round(os.getloadavg()[0], 2),
    }


def show(rows: list[dict]) -> None:
    print(f"\n{'space':<14} {'ppl (mean over seeds)':>22} {'per seed':>24} {'kl':>7} {'train s':>8} "
          f"{'cold s':>7} {'wall s':>7}  rungs reached (runs per step count)")
    for space in dict.fromkeys(r["space"] for r in rows):
        mine = [r for r in rows if r["space"] == space]
        ppl = [r["perplexity"] for r in mine if r["perplexity"] is not None]
        kls = [r["kl"] for r in mine if r["kl"] is not None]
        per_seed = " ".join(f"{r['perplexity']:.1f}" if r["perplexity"] else "none" for r in mine)
        mean = f"{statistics.mean(ppl):.2f}" if len(ppl) == len(mine) else f"{len(mine) - len(ppl)} without any"
        reached: dict[str, dict[str, int]] = {}
        for r in mine:
            for technique, counts in r["rungs"].items():
                for steps, n in counts.items():
                    reached.setdefault(technique, {}).setdefault(steps, 0)
                    reached[technique][steps] += n
        rung_text = "; ".join(f"{t}: " + ", ".join(f"{n} at {s}" for s, n in sorted(c.items(), key=lambda x: int(x[0])))
                              for t, c in reached.items()) or "-"
        print(f"{space:<14} {mean:>22} {per_seed:>24} {statistics.mean(kls) if kls else float('nan'):7.3f} "
              f"{sum(r['train_seconds'] for r in mine):8.0f} {sum(r['cold_cache_train_seconds'] for r in mine):7.0f} "
              f"{sum(r['seconds'] for r in mine):7.0f}  {rung_text}")
    print("\nrecommended per run:")
    for r in rows:
        ratio = f"{r['decode_ratio']:.3f}x" if r["decode_ratio"] else "-"
        print(f"  {r['space']:<14} seed {r['seed']}: {r['recommended'] or 'none meets the budget'} "
              f"(ppl {r['perplexity'] or float('nan'):.2f}, decode {ratio}); stored {r['combinations']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--spaces", nargs="+", default=list(SPACES), choices=list(SPACES))
    parser.add_argument("--show", action="store_true", help="only print the table of the stored results")
    args = parser.parse_args()
    quiet_libraries()
    if not args.show:
        print(f"decode budget {DEMO['latency_budget']}, {args.trials} trials per study, threads "
              f"{torch.get_num_threads()}, {torch.backends.cpu.get_cpu_capability()}, load {os.getloadavg()[0]:.2f}",
              flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for space in args.spaces:
                row = run_one(space, seed, args.trials)
                print(json.dumps(row), flush=True)
                with open(RESULTS, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    show([r for r in rows if r["space"] in args.spaces and r["seed"] in args.seeds and r["trials"] == args.trials])


if __name__ == "__main__":
    main()
