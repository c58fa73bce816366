"""A whole study on a 1B model, as a user runs it: wall time, peak memory of the process tree, seconds per trial.

    nice -n 5 .venv/bin/python bench/study_1b.py [--size 1.24B] [--trials 20] [--budget 800MB] [--stop-after 7200]
        [--timeout 6000]

A Llama-shaped model (`cost_growth.SIZES`: 1.24 B is Llama-3.2-1B's shape) with random weights (cost, not
accuracy: its perplexity is nonsense, every candidate's alike) is saved once as a bfloat16 checkpoint, as
Llama-3.2-1B ships, with the built-in tokenizer. Then, each in its own process with empty caches (a fresh
PLANNER_CACHE holding only the built-in assets):

    planner search --study-file studies/demo.toml --model <checkpoint> --memory-budget <budget> --trials N ...
    planner apply <its recipe> --out <folder>

i.e. the demo study's space (the llama.cpp target's default less GPTQ) and CPU-sized evaluation protocol, with
`--dtype auto` choosing the precision for this machine's memory. The resident memory of the whole process tree
is sampled every 0.5 s (anonymous and mapped-file parts). `--stop-after` seconds ends the search early (the
trials done so far are kept and reported); `--timeout` is the search's own (the search ends within it, counted
from its start: no trial starts after it, nor one its finished trials predict to run past it; then it reports,
recommends and ships what it measured). Rows: bench/results/study_1b.jsonl; the search's output beside it.
Figures, not assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cost_growth import SIZES  # noqa: E402
from trial_cost import PeakMemory  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ASSETS = ("models", "corpora", "wheels")  # what a fresh cache shares with the user's (fetched, not computed)


def checkpoint(size: str, folder: Path) -> Path:
    """The random-weight model of `size` saved in bfloat16 with the built-in tokenizer (once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from planner import assets

    builtin = assets.cache_root() / "models" / "smollm2-135m"
    config = AutoConfig.from_pretrained(builtin)
    for name, value in SIZES[size].items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(builtin).save_pretrained(folder)
    return folder


def fresh_cache(folder: Path) -> Path:
    """A cache with the user's fetched assets and nothing computed (sensitivities, students, decode costs)."""
    from planner import assets

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ASSETS:
        if (assets.cache_root() / name).exists():
            (folder / name).symlink_to(assets.cache_root() / name)
    return folder


def start(argv: list[str], log: Path, env: dict, prefix: list[str] = ()) -> subprocess.Popen:
    """The planner CLI started in its own process (after `prefix`, e.g. a taskset pinning), its output appended to
    `log` after the command line."""
    with log.open("a") as out:
        out.write(f"$ {' '.join([*prefix, 'planner', *argv])}\n")
        out.flush()
        return subprocess.Popen([*prefix, sys.executable, "-m", "cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env)


def run(argv: list[str], log: Path, env: dict, stop_after: float | None) -> dict:
    """The planner CLI in its own process, its output appended to `log`: wall seconds, exit code, peak memory."""
    started = time.perf_counter()
    process = start(argv, log, env)
    with PeakMemory(process.pid, interval=0.5) as peak:
        try:
            code = process.wait(timeout=stop_after)
        except subprocess.TimeoutExpired:
            process.terminate()
            code = process.wait()
    return {"seconds": round(time.perf_counter() - started, 1), "exit": code, "peak_rss": peak.peak,
            "peak_anon": peak.anon, "peak_file": peak.file}


def trials(storage: str, name: str) -> list[dict]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage)
    return [{"number": t.number, "state": t.state.name, "label": t.user_attrs.get("label"),
             "seconds": t.user_attrs.get("seconds"), "not_started": t.user_attrs.get("not_started"),
             "values": t.values} for t in study.trials]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.24B", choices=sorted(SIZES))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--budget", default="800MB", help="the memory budget (Llama-3.2-1B's Q4_K_M file: 808 MB)")
    parser.add_argument("--stop-after", type=float, default=None, help="end the search after this many seconds")
    parser.add_argument("--timeout", type=float, default=None,
                        help="planner search --timeout: end the search within this many seconds, then report, "
                             "recommend and ship what was measured (as a user with a time budget runs it)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/planner-study-1b"))
    args = parser.parse_args()

    import torch

    from search_spaces.compute import NATIVE_FLAGS, cpu_flags

    model = checkpoint(args.size, args.work / f"llama-{args.size}-random")
    env = {**os.environ, "PLANNER_CACHE": str(fresh_cache(args.work / "cache"))}
    name = f"study-{args.size}"
    storage = f"sqlite:///{args.work / (name + '.db')}"
    (args.work / f"{name}.db").unlink(missing_ok=True)
    recipe = args.work / f"{name}-recipe.yaml"
    log = RESULTS / f"{name}.log"
    log.write_text("")
    row = {"size": args.size, "trials": args.trials, "budget": args.budget, "timeout": args.timeout,
           "started": time.strftime("%Y-%m-%d %H:%M"),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
           # a 1B student trained 8x faster on a machine with these (sections 14 and 16): the row says which it had
           "native_16bit": sorted(set().union(*NATIVE_FLAGS.values()) & cpu_flags()),
           "load_before": os.getloadavg()[0], "code": subprocess.run(
               ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()}
    row["search"] = run(["search", "--study-file", "studies/demo.toml", "--model", str(model), "--study", name,
                         "--storage", storage, "--memory-budget", args.budget, "--trials", str(args.trials),
                         "--recipe", str(recipe), *(["--timeout", str(args.timeout)] if args.timeout else [])],
                        log, env, args.stop_after)
    if row["search"]["exit"] == 0 and recipe.is_file():
        row["apply"] = run(["apply", str(recipe), "--out", str(args.work / f"{name}-deploy"), "--force"], log, env,
                           None)
    row["trials_run"] = trials(storage, name)
    row["load_after"] = os.getloadavg()[0]
    with (RESULTS / "study_1b.jsonl").open("a") as out:
        out.write(json.dumps(row) + "\n")
    total = row["search"]["seconds"] + row.get("apply", {}).get("seconds", 0)
    print(f"{name}: search {row['search']['seconds'] / 60:.1f} min (exit {row['search']['exit']}), apply "
          f"{row.get('apply', {}).get('seconds', 0) / 60:.1f} min, total {total / 60:.1f} min; peak "
          f"{max(row['search']['peak_rss'], row.get('apply', {}).get('peak_rss', 0)) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
