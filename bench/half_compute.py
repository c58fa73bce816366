"""What computing a 16-bit model in float32 (`search_spaces.compute.float32_compute`) saves on this CPU.

    nice -n 5 .venv/bin/python bench/half_compute.py [--size 1.24B] [--rounds 3]

A Llama-shaped model with random weights (bench/cost_growth.py's sizes) held in bfloat16, as `dtype = "auto"`
holds a 1B model on a 24 GB machine. Timed A/B in one process, alternating, `--rounds` times each: a calibration
pass (4 windows of 256 tokens, no gradients, as the importance matrix and the KL gains run) and a distillation step
(a teacher forward, a depth-0.8 student's forward and backward, batch 4 x 256), each computed in bfloat16 as torch
does and within `float32_compute`. Prints the medians, their ratio with the spread of the per-round ratios, the
process's peak memory, the CPU's capability and whether it has bfloat16 instructions; appends a row to
bench/results/half_compute.jsonl. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LOG = ROOT / "bench" / "results" / "half_compute.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.24B", help="a size of bench/cost_growth.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from _grid import append_row
    from cost_growth import SIZES, random_model
    from planner.quiet import quiet_libraries
    from search_spaces.compute import NATIVE_FLAGS, computes_slowly, cpu_flags, float32_compute
    from search_spaces.distillation.train import kd_loss

    quiet_libraries()
    torch.set_num_threads(args.threads)
    teacher = random_model(args.size, "bfloat16")
    layers = teacher.config.num_hidden_layers
    student = random_model(args.size, "bfloat16", num_hidden_layers=round(0.8 * layers))
    vocab = teacher.config.vocab_size
    windows = torch.randint(0, vocab, (4, 256), generator=torch.Generator().manual_seed(0))

    def calibration(f32: bool) -> None:
        with torch.inference_mode(), float32_compute(teacher, when=f32):
            teacher(input_ids=windows, use_cache=False)

    def distillation(f32: bool) -> None:
        with torch.no_grad(), float32_compute(teacher, when=f32):
            target = teacher(input_ids=windows, use_cache=False).logits
        with float32_compute(student, when=f32):
            logits = student(input_ids=windows, use_cache=False).logits
        kd_loss(logits, target, windows, 2.0, 0.5).backward()
        student.zero_grad(set_to_none=True)

    seconds = {(work, f32): [] for work in ("calibration pass", "distillation step") for f32 in (False, True)}
    for _ in range(args.rounds):
        for (work, f32), times in seconds.items():
            started = time.perf_counter()
            (calibration if work == "calibration pass" else distillation)(f32)
            times.append(time.perf_counter() - started)
            print(f"{work} in {'float32' if f32 else 'bfloat16'}: {times[-1]:.1f} s", flush=True)
    summary = {}
    for work in ("calibration pass", "distillation step"):
        half, full = seconds[(work, False)], seconds[(work, True)]
        ratios = [h / f for h, f in zip(half, full)]
        summary[work] = {"bfloat16_s": statistics.median(half), "float32_s": statistics.median(full),
                         "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}
        print(f"{work}: bfloat16 {summary[work]['bfloat16_s']:.1f} s, float32 compute "
              f"{summary[work]['float32_s']:.1f} s: {summary[work]['speedup']:.2f}x faster "
              f"(per round {min(ratios):.2f}-{max(ratios):.2f})")
    native = sorted(cpu_flags() & NATIVE_FLAGS[torch.bfloat16])
    row = {"size": args.size, "rounds": args.rounds, "threads": args.threads, "summary": summary,
           "seconds": {f"{w} {'float32' if f else 'bfloat16'}": t for (w, f), t in seconds.items()},
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bfloat16_instructions": native,
           "float32_compute_by_default": computes_slowly(teacher), "load": round(os.getloadavg()[0], 2),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    append_row(row, LOG)


if __name__ == "__main__":
    main()
