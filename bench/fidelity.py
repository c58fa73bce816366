"""Recipe fidelity: do recipes rebuild, in a fresh process, into the candidate whose figures they store?

    nice -n 10 .venv/bin/python bench/fidelity.py [--study demo --storage sqlite:///studies/demo.db]
                                                  [--trials 7,3,26,38,36] [--repeats 5]

The study database is copied to a temporary folder first and only the copy is opened (the original is
never written). For each trial: `planner export --trial N` writes its recipe, `planner apply RECIPE --out DIR
--force` rebuilds it in a fresh process (apply itself re-measures perplexity with the recipe's protocol, 1%
tolerance, and the weight bytes, exactly, and fails otherwise), and a second fresh process rebuilds the same
stages with the planner's build and times decode and prefill `--repeats` times with the recipe's latency
protocol. The unmodified model is timed the same way in that process as a control: the ratio of its decode
time to the study's stored baseline says how much of a latency ratio is the machine's load, not the recipe.
Results are appended to bench/results/fidelity.jsonl (one line per trial; finished trials are skipped).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "bench" / "results" / "fidelity.jsonl"
PLANNER = ROOT / ".venv" / "bin" / "planner"
PYTHON = ROOT / ".venv" / "bin" / "python"


def latency_worker(recipe_path: str, repeats: int) -> None:
    """Fresh process: rebuild the recipe's stages and time them (and the unmodified model) alternately."""
    sys.path.insert(0, str(ROOT))
    import torch

    from evaluators.latency import LatencyProtocol, measure_latency
    from planner import assets
    from planner.candidates import build
    from planner.quiet import quiet_libraries
    from planner.recipes import load_recipe
    from planner.sources import DataSource, ModelSource, load_corpus, load_model
    from search_spaces import TECHNIQUES, BuildContext

    quiet_libraries()
    recipe = load_recipe(Path(recipe_path), TECHNIQUES)
    model, tokenizer = load_model(ModelSource.parse(recipe.model_source), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse(recipe.provenance.get("data") or "builtin:shakespeare"))
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, seed=int(recipe.provenance.get("seed", 0)),
                           cache_dir=assets.cache_root(),
                           model_id=f"{recipe.model_source}@{recipe.model_hash}", progress=False)
    started = time.perf_counter()
    candidate = build(model, list(recipe.stages), context).model
    build_seconds = time.perf_counter() - started
    protocol = LatencyProtocol.from_dict(recipe.metrics["latency"]["protocol"])
    rounds = []
    for _ in range(repeats):
        a = measure_latency(candidate, protocol)
        b = measure_latency(model, protocol)
        rounds.append({"decode": a.decode.p50_ms, "prefill": a.prefill.p50_ms, "baseline_decode": b.decode.p50_ms,
                       "load": a.load_average_before[0]})
    print(json.dumps({"build_seconds": build_seconds, "rounds": rounds, "threads": torch.get_num_threads()}))


def run(cmd: list[str]) -> tuple[int, str, float]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="demo")
    parser.add_argument("--storage", default="sqlite:///studies/demo.db")
    parser.add_argument("--trials", default="7,3,26,38,36", help="comma-separated trial numbers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redo-latency", action="store_true",
                        help="time the logged trials again (e.g. on a quieter machine), keeping their apply results")
    parser.add_argument("--latency-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.latency_worker:
        latency_worker(args.latency_worker, args.repeats)
        return

    source = Path(args.storage.split(":///", 1)[1])
    work = Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    copy = work / "study.db"
    shutil.copyfile(ROOT / source if not source.is_absolute() else source, copy)
    storage = f"sqlite:///{copy}"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=args.study, storage=storage)
    baseline = study.user_attrs["baseline"]
    done = {}
    if LOG.exists():
        done = {(r["study"], r["trial"]): r for r in map(json.loads, LOG.read_text().splitlines()) if r}
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; study '{args.study}' (copied to {copy}); "
          f"stored baseline decode {baseline['decode_ms_p50']:.2f} ms")
    try:
        for number in [int(n) for n in args.trials.split(",") if n]:
            if (args.study, number) in done and args.redo_latency and "rounds" in done[(args.study, number)]:
                recipe = work / f"trial-{number}.yaml"
                run([str(PLANNER), "export", "--study", args.study, "--storage", storage, "--trial", str(number),
                     "-o", str(recipe)])
                code, out, _ = run([str(PYTHON), __file__, "--latency-worker", str(recipe), "--repeats",
                                    str(args.repeats)])
                if code == 0:
                    row = done[(args.study, number)]
                    row.update(rounds=json.loads(out.strip().splitlines()[-1])["rounds"], load_average=os.getloadavg()[0])
                    LOG.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
                    print(f"trial {number}: timed again", flush=True)
                continue
            if (args.study, number) in done:
                continue
            recipe = work / f"trial-{number}.yaml"
            code, out, _ = run([str(PLANNER), "export", "--study", args.study, "--storage", storage, "--trial",
                                str(number), "-o", str(recipe)])
            if code != 0:
                print(f"trial {number}: export failed: {out.strip()}")
                continue
            import yaml

            stored = yaml.safe_load(recipe.read_text())["metrics"]
            code, out, apply_seconds = run([str(PLANNER), "apply", str(recipe), "--out", str(work / f"deploy-{number}"),
                                            "--force"])
            match = re.search(r"perplexity ([0-9.]+) \(recipe ([0-9.]+)\), weights (\d+) bytes \(recipe (\d+)\)", out)
            row = {"study": args.study, "trial": number, "label": stored["summary"]["stages"], "apply_exit": code,
                   "apply_seconds": apply_seconds, "apply_output": out.strip().splitlines()[-3:]}
            if match:
                row.update(perplexity=float(match[1]), stored_perplexity=float(match[2]), weight_bytes=int(match[3]),
                           stored_weight_bytes=int(match[4]))
            code, out, _ = run([str(PYTHON), __file__, "--latency-worker", str(recipe), "--repeats", str(args.repeats)])
            if code == 0:
                timing = json.loads(out.strip().splitlines()[-1])
                row.update(stored_decode=stored["summary"]["decode_ms_p50"],
                           stored_prefill=stored["summary"]["prefill_ms_p50"], stored_baseline_decode=baseline["decode_ms_p50"],
                           rounds=timing["rounds"], build_seconds=timing["build_seconds"])
            else:
                row["latency_error"] = out.strip().splitlines()[-1:]
            row["load_average"] = os.getloadavg()[0]
            LOG.parent.mkdir(parents=True, exist_ok=True)
            with LOG.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[(args.study, number)] = row
            print(f"trial {number} done ({row['label']}), apply exit {row['apply_exit']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report([r for (s, _), r in done.items() if s == args.study])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def report(rows: list[dict]) -> None:
    print(f"\n{'trial':>5} {'candidate':<46} {'apply':>5} {'ppl rebuilt / stored':>24} {'bytes':>12} "
          f"{'decode ratio':>20} {'control ratio':>20} {'prefill ratio':>20}")
    for r in sorted(rows, key=lambda r: r["trial"]):
        ppl = (f"{r['perplexity']:.3f} / {r['stored_perplexity']:.3f}" if "perplexity" in r else "-")
        size = ("exact" if r.get("weight_bytes") == r.get("stored_weight_bytes") and "weight_bytes" in r
                else f"{r.get('weight_bytes')} vs {r.get('stored_weight_bytes')}")
        if "rounds" in r:
            decode = spread([x["decode"] / r["stored_decode"] for x in r["rounds"]])
            control = spread([x["baseline_decode"] / r["stored_baseline_decode"] for x in r["rounds"]])
            prefill = spread([x["prefill"] / r["stored_prefill"] for x in r["rounds"]])
        else:
            decode = control = prefill = "-"
        print(f"{r['trial']:>5} {r['label']:<46} {r['apply_exit']:>5} {ppl:>24} {size:>12} {decode:>20} "
              f"{control:>20} {prefill:>20}")
    print("ratios: rebuilt / stored, median [min-max] over repeats; control: the unmodified model now / the study's "
          "stored baseline, timed alternately with the candidate in the same process")


if __name__ == "__main__":
    main()
