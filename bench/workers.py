"""Scale-out, measured: trials per hour of one `planner worker` against two on a shared PostgreSQL study.

    bash -c 'source .ci/start-postgres && start_postgres && nice -n 5 .venv/bin/python bench/workers.py'
    .venv/bin/python bench/workers.py --storage postgresql://user@host/db [--trials 12] [--cores 1]

Each configuration is a study of its own, made as a user makes one (`planner create`: the baseline measured, the
hand-picked candidates queued), then its workers started at once, each `planner worker` pinned to `--cores` CPUs
of its own (taskset; llama.cpp and torch on those cores only, the study's decode timed on as many threads): two
workers on a machine's two halves stand for two machines of that many cores (the storage, memory bandwidth and
page cache are shared here, not across machines). The space is the llama.cpp target's quantization alone (RTN
onto GGUF's grids and llama-quant allocations) on the built-in model with the demo's evaluation protocol, so
every trial is of the same kind. Each configuration starts from an empty cache (the built-in assets only), so each
pays for its own sensitivity tables and decode costs as a new study does. Throughput: counted trials over the span
from the first trial's start to the last one's end. Rows: bench/results/workers.jsonl. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from study_1b import fresh_cache, start  # noqa: E402

STUDY_FILE = """
model = "builtin:smollm2-135m"
data = "builtin:shakespeare"
trials = {trials}
seed = 0
target = "llama.cpp"
memory_budget = "110MB"

[evaluation.perplexity]
context_length = 512
stride = 512
max_tokens = 1536

[evaluation.latency]
prompt_tokens = 64
new_tokens = 16
repeats = 3
warmup = 1
threads = {cores}

[space]
distillation = false
pruning = false

[space.quantization]
methods = ["rtn", "llama-quant"]
bits = [4, 5, 8]
head_bits = [16, 8, 4]
"""


def planner(argv: list[str], log: Path, cache: Path, cores: list[int] | None = None) -> subprocess.Popen:
    """The planner CLI in its own process (pinned to `cores`, with the cache `cache`), its output appended to `log`."""
    pin = ["taskset", "-c", ",".join(map(str, cores))] if cores else []
    env = {**os.environ, "PLANNER_CACHE": str(cache),
           "OMP_NUM_THREADS": str(len(cores)) if cores else os.environ.get("OMP_NUM_THREADS", "")}
    return start(argv, log, {k: v for k, v in env.items() if v}, pin)


def finished(process: subprocess.Popen, what: str) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{what} exited {process.returncode}")


def throughput(storage: str, name: str) -> dict:
    """Counted trials (distinct candidates built and measured) and the span from the first one's start to the last
    one's end."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage)
    measured = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "measurements" in t.user_attrs
                and "duplicate_of" not in t.user_attrs]  # a twin takes its candidate's figures: not counted
    begin = min(t.datetime_start for t in measured)
    end = max(t.datetime_complete for t in measured)
    span = (end - begin).total_seconds()
    workers = {json.dumps(t.user_attrs["worker"], sort_keys=True) for t in measured if t.user_attrs.get("worker")}
    return {"counted": len(measured), "span_s": round(span, 1), "per_hour": round(3600 * len(measured) / span, 1),
            "mean_trial_s": round(sum((t.datetime_complete - t.datetime_start).total_seconds() for t in measured)
                                  / len(measured), 1), "workers_seen": len(workers) or None,
            "labels": [t.user_attrs.get("label") for t in measured]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("PLANNER_TEST_POSTGRES"),
                        help="a PostgreSQL URL (default: $PLANNER_TEST_POSTGRES, as .ci/start-postgres exports)")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--cores", type=int, default=1, help="CPUs of each worker")
    parser.add_argument("--work", type=Path, default=Path("/tmp/planner-workers"))
    args = parser.parse_args()
    if not args.storage:
        raise SystemExit("no storage: pass --storage postgresql://... or start one with .ci/start-postgres")
    if 2 * args.cores > len(os.sched_getaffinity(0)):
        raise SystemExit(f"two workers of {args.cores} core(s) need {2 * args.cores} CPUs")
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    study_file = args.work / "workers.toml"
    study_file.write_text(STUDY_FILE.format(trials=args.trials, cores=args.cores))
    log = RESULTS / "workers.log"
    log.write_text("")
    stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    rows = []
    for count in (1, 2):
        name = f"workers-{count}-{stamp}"
        cache = fresh_cache(args.work / f"cache-{count}")  # each configuration computes its own tables and costs
        finished(planner(["create", "--study-file", str(study_file), "--study", name, "--storage", args.storage],
                         log, cache), "planner create")
        started = time.perf_counter()
        processes = [planner(["worker", "--study", name, "--storage", args.storage, "-q"], log, cache,
                             list(range(i * args.cores, (i + 1) * args.cores))) for i in range(count)]
        for process in processes:
            finished(process, "planner worker")
        row = {"workers": count, "cores_each": args.cores, "trials": args.trials, "study": name,
               "wall_s": round(time.perf_counter() - started, 1), **throughput(args.storage, name),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_after": os.getloadavg()[0],
               "when": time.strftime("%Y-%m-%d %H:%M")}
        rows.append(row)
        with (RESULTS / "workers.jsonl").open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(f"{count} worker(s) x {args.cores} core(s): {row['counted']} trials in {row['span_s']:.0f} s, "
              f"{row['per_hour']:.0f} trials/hour (mean trial {row['mean_trial_s']:.0f} s)", flush=True)
    print(f"two workers against one: {rows[1]['per_hour'] / rows[0]['per_hour']:.2f}x the trials per hour")


if __name__ == "__main__":
    main()
