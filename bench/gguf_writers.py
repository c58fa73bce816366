"""The two GGUF writers on a Llama 3.2-1B-shaped model: the planner's own and llama.cpp's converter, A/B.

    nice -n 5 .venv/bin/python bench/gguf_writers.py [--size 1.24B] [--rounds 2]

Every llama.cpp candidate is written as a float GGUF first (llama-quant's plan then quantizes it), and so is the
study's reference: the writer's seconds are in every trial. Llama 3 rotary scaling used to go to the converter (a
subprocess importing torch and transformers, reading the model back from a saved checkpoint); the planner's writer
now writes it. This times both on the same model held in bfloat16 (as a 1B study holds it), alternating, and checks
the two files hold the same tensors byte for byte. The peak is the process tree's resident memory above what it held
before the write (the converter's subprocess included). A row is appended to bench/results/gguf_writers.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_1b import checkpoint  # noqa: E402
from trial_cost import PeakMemory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "bench" / "results" / "gguf_writers.jsonl"


def timed(write, path: Path) -> dict:
    before = PeakMemory.parts(os.getpid())["VmRSS"]
    with PeakMemory(pid=os.getpid()) as peak:
        started = time.perf_counter()
        write(path)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_above_gb": (peak.peak - before) / 1e9}


def same_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names whose type or bytes differ); both files must hold the same names."""
    import numpy as np
    from gguf import GGUFReader

    ours = {t.name: t for t in GGUFReader(str(a)).tensors}
    theirs = {t.name: t for t in GGUFReader(str(b)).tensors}
    if set(ours) != set(theirs):
        return len(ours), sorted(set(ours) ^ set(theirs))
    differ = [name for name, t in theirs.items()
              if ours[name].tensor_type != t.tensor_type or not np.array_equal(ours[name].data, t.data)]
    return len(ours), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.24B")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "planner-study-1b")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from targets.llamacpp.convert import convert
    from targets.llamacpp.gguf_file import write_gguf

    folder = checkpoint(args.size, args.folder / f"llama-{args.size}-random")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    writers = {"planner writer": lambda path: write_gguf(model, tokenizer, path),
               "llama.cpp converter": lambda path: convert(model, tokenizer, path)}
    runs = {name: [] for name in writers}
    with tempfile.TemporaryDirectory(dir=args.folder) as work:
        work = Path(work)
        for round_ in range(args.rounds):
            order = list(writers) if round_ % 2 == 0 else list(writers)[::-1]
            for name in order:
                path = work / f"{name.split()[0]}.gguf"
                runs[name].append(timed(writers[name], path))
                print(f"round {round_ + 1} {name}: {runs[name][-1]['seconds']:.1f} s, "
                      f"peak +{runs[name][-1]['peak_above_gb']:.2f} GB", flush=True)
            if round_ == 0:
                compared, differ = same_tensors(work / "planner.gguf", work / "llama.cpp.gguf")
                print(f"tensors compared: {compared}, differing: {differ or 'none'}", flush=True)
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs["planner writer"], runs["llama.cpp converter"])]
    row = {"size": args.size, "dtype": "bfloat16", "rounds": args.rounds, "runs": runs,
           "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
           "tensors_compared": compared, "tensors_differing": differ,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "load_average_after": os.getloadavg(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=ROOT).stdout.strip()}
    with LOG.open("a") as log:
        log.write(json.dumps(row) + "\n")
    print(f"planner writer / converter, per round: {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
