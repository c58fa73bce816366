"""What structured pruning and distillation buy on the built-in model: perplexity, weight MB, CPU decode ms.

    .venv/bin/python bench/prune_distill.py [--threads N] [--tokens 4096] [--steps 40] [--skip-students]

Prints one row per structured-pruning ratio of a ladder (MLP width, KV groups, depth, combined) and per
distilled student size (perplexity before and after distillation, seconds per training step). Weight
MB is measured (`evaluators.memory.weight_bytes`) beside the planner's estimate made before building.
Figures, not assertions: the machine is shared and noisy, so decode is given as p50 and min over every
decode step of several runs, with the load average.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.latency import LatencyProtocol, TimingStats, measure_latency  # noqa: E402
from evaluators.memory import weight_bytes  # noqa: E402
from evaluators.perplexity import PerplexityProtocol, measure_perplexity  # noqa: E402
from planner.quiet import quiet_libraries  # noqa: E402
from planner.sources import DataSource, ModelSource, load_corpus, load_model  # noqa: E402
from search_spaces import distillation, pruning  # noqa: E402
from search_spaces.base import BuildContext  # noqa: E402
from search_spaces.distillation.student import derive_student  # noqa: E402

PRUNING_LADDER = [
    ("mlp 75%", dict(mlp_keep=0.75)),
    ("mlp 50%", dict(mlp_keep=0.5)),
    ("kv groups 2/3", dict(heads_keep=0.67)),
    ("depth 26/30", dict(depth_keep=26 / 30)),
    ("depth 24/30", dict(depth_keep=0.8)),
    ("depth 24/30 + mlp 75%", dict(depth_keep=0.8, mlp_keep=0.75)),
]
AB_VARIANT = "mlp 50%"  # the claim to check: half the MLP width decodes measurably faster on a CPU
STUDENTS = [
    ("student depth 24/30", dict(depth_keep=0.8)),
    ("student depth 21/30 + mlp 75%", dict(depth_keep=0.7, mlp_keep=0.75)),
]
LR = 2e-4
HEADER = f"{'variant':<32} {'params M':>8} {'weights MB':>10} {'est. MB':>8} {'ppl':>8} {'decode p50':>10} {'min':>6}"


def measure(model, tokenizer, corpus, perplexity: PerplexityProtocol, latency: LatencyProtocol) -> dict:
    lat = measure_latency(model, latency)
    return {
        "params": sum(p.numel() for p in model.parameters()) / 1e6,
        "mb": weight_bytes(model).total_bytes / 1e6,
        "ppl": measure_perplexity(model, tokenizer, corpus.eval, perplexity).perplexity,
        "decode": lat.decode.p50_ms,
        "decode_min": lat.decode.min_ms,
    }


def decode_ab(baseline, pruned, latency: LatencyProtocol, rounds: int) -> list[tuple[TimingStats, TimingStats]]:
    """Decode timings of the two models measured alternately, so load changes on a shared machine hit both alike."""
    return [(measure_latency(baseline, latency).decode, measure_latency(pruned, latency).decode) for _ in range(rounds)]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def row(name: str, figures: dict, estimate_mb: float, extra: str = "") -> str:
    return (f"{name:<32} {figures['params']:8.1f} {figures['mb']:10.1f} {estimate_mb:8.1f} {figures['ppl']:8.2f} "
            f"{figures['decode']:8.2f}ms {figures['decode_min']:6.2f}{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens per perplexity")
    parser.add_argument("--steps", type=int, default=40, help="distillation steps per student")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--ab-rounds", type=int, default=5,
                        help="interleaved decode rounds, baseline vs " + AB_VARIANT.replace("%", "%%"))
    parser.add_argument("--skip-students", action="store_true")
    args = parser.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m"), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, seed=0, model_id="builtin:smollm2-135m",
                           progress=False)
    perplexity = PerplexityProtocol(context_length=512, stride=512, max_tokens=args.tokens)
    latency = LatencyProtocol(prompt_tokens=64, new_tokens=24, warmup=2, repeats=5)
    print(f"built-in model, held-out perplexity on {args.tokens} tokens (window 512), decode ms/token after a "
          f"64-token prompt ({latency.repeats} x {latency.new_tokens} steps); torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print(HEADER)
    baseline = measure(model, tokenizer, corpus, perplexity, latency)
    print(row("baseline", baseline, baseline["mb"]), flush=True)

    for name, ratios in PRUNING_LADDER:
        spec = pruning.PruneSpec(**ratios, calibration_samples=args.calibration_samples, calibration_seq_len=256)
        started = time.perf_counter()
        pruned = pruning.apply(copy.deepcopy(model), spec, context)
        seconds = time.perf_counter() - started
        figures = measure(pruned, tokenizer, corpus, perplexity, latency)
        speedup = baseline["decode"] / figures["decode"]
        print(row(name, figures, pruning.estimate(model, spec).weight_bytes / 1e6,
                  f"  x{speedup:.2f} decode, built in {seconds:.0f} s"), flush=True)
        if name == AB_VARIANT:
            half_mlp = pruned
        del pruned

    pairs = decode_ab(model, half_mlp, latency, args.ab_rounds)
    print(f"\ndecode A/B, baseline vs {AB_VARIANT}, {len(pairs)} interleaved rounds, ms/token p50 (min): "
          + ", ".join(f"{a.p50_ms:.1f} ({a.min_ms:.1f}) vs {b.p50_ms:.1f} ({b.min_ms:.1f})" for a, b in pairs))
    faster = sum(b.p50_ms < a.p50_ms for a, b in pairs)
    print(f"  {AB_VARIANT} faster in {faster}/{len(pairs)} rounds; median speed-up "
          f"x{median([a.p50_ms / b.p50_ms for a, b in pairs]):.2f} by p50, "
          f"x{median([a.min_ms / b.min_ms for a, b in pairs]):.2f} by min", flush=True)
    del half_mlp

    if args.skip_students:
        return
    print(f"\ndistilled students: {args.steps} steps of {args.batch} x {args.seq_len} training tokens at lr {LR}, "
          f"initialised from the teacher by importance (ppl before -> after distillation)")
    print(HEADER)
    for name, ratios in STUDENTS:
        spec = distillation.DistillSpec(**ratios, steps=args.steps, batch_size=args.batch, seq_len=args.seq_len,
                                        lr=LR, importance_samples=args.calibration_samples)
        undistilled, _ = derive_student(model, spec.structure, spec.init, context, spec.importance_samples,
                                        spec.importance_seq_len)
        before = measure_perplexity(undistilled, tokenizer, corpus.eval, perplexity).perplexity
        del undistilled
        student = distillation.apply(model, spec, context)
        report = distillation.report_of(student)
        figures = measure(student, tokenizer, corpus, perplexity, latency)
        print(row(name, figures, distillation.estimate(model, spec).weight_bytes / 1e6,
                  f"  ppl {before:.2f} -> {figures['ppl']:.2f}, {report.seconds_per_step:.2f} s/step "
                  f"(loss {report.first_loss:.2f} -> {report.final_loss:.2f})"), flush=True)
        del student
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
