"""Every candidate as it ships, measured in its target's runtime, on the built-in model.

    .venv/bin/python bench/targets.py [--threads 2] [--rounds 5] [--out bench/results/targets.json]

For each target (llama.cpp, transformers) and quantization (float, Q8_0 / 8-bit, Q4_0 / 4-bit rtn with the head
in F16 or 4-bit, 4-bit GPTQ with the head in F16 or 8-bit, pruned MLP + 4-bit GPTQ), the candidate is built by the planner's own techniques on the target's grid and
measured by the target itself: decode and prefill as ratios to the uncompressed model timed in the same
run (llama.cpp: A/B rounds against its GGUF; transformers: the float model timed right before each
candidate), resident and disk MB, perplexity from the runtime next to the torch evaluation of the very
same weights. K-quants are not in the table: gguf's Python package cannot quantize them, so the writer
does not write them. Figures, not assertions; threads, CPU capability and load are printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.latency import measure_latency  # noqa: E402
from evaluators.perplexity import measure_perplexity  # noqa: E402
from planner.candidates import build, describe  # noqa: E402
from planner.quiet import quiet_libraries  # noqa: E402
from planner.recipes import Stage  # noqa: E402
from planner.settings import make_settings  # noqa: E402
from planner.study import prepare  # noqa: E402
from search_spaces.pruning import PruneSpec  # noqa: E402
from search_spaces.quantization import GPTQSettings, QuantSpec  # noqa: E402

EVALUATION = {"perplexity": {"context_length": 512, "stride": 512, "max_tokens": 2048},
              "latency": {"prompt_tokens": 128, "new_tokens": 32, "warmup": 1, "repeats": 5}}


def candidates(grid: str) -> list[list[Stage]]:
    block = 32 if grid == "gguf" else 128
    bits8 = QuantSpec(method="rtn", bits={"attn": 8, "mlp": 8, "head": 16}, group_size=block, grid=grid)
    bits4 = QuantSpec(method="rtn", bits={"attn": 4, "mlp": 4, "head": 16}, group_size=block, grid=grid)
    gptq4 = QuantSpec(method="gptq", bits={"attn": 4, "mlp": 4, "head": 16}, group_size=block, grid=grid,
                      gptq=GPTQSettings(samples=16, seq_len=256))
    # The tied embedding + head quantized on its own copy: on a 49k vocabulary the head is a fifth of the
    # decode work, so a 16-bit head caps llama.cpp's speed-up.
    bits4_head = QuantSpec(method="rtn", bits={"attn": 4, "mlp": 4, "head": 4}, group_size=block, grid=grid)
    gptq4_head8 = QuantSpec(method="gptq", bits={"attn": 4, "mlp": 4, "head": 8}, group_size=block, grid=grid,
                            gptq=GPTQSettings(samples=16, seq_len=256))
    pruned = PruneSpec(mlp_keep=0.75)
    return [[], [Stage("quantization", bits8)], [Stage("quantization", bits4)], [Stage("quantization", bits4_head)],
            [Stage("quantization", gptq4)], [Stage("quantization", gptq4_head8)],
            [Stage("pruning", pruned), Stage("quantization", gptq4)]]


def transformers_ratio(bench, model, protocol) -> tuple[float, float, float, float]:
    """(decode ms, prefill ms, decode ratio, prefill ratio): the float model timed right before the candidate."""
    base = measure_latency(bench.model, protocol)
    cand = measure_latency(model, protocol)
    return (cand.decode.p50_ms, cand.prefill.p50_ms, cand.decode.p50_ms / base.decode.p50_ms,
            cand.prefill.p50_ms / base.prefill.p50_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per candidate")
    parser.add_argument("--targets", default="llama.cpp,transformers")
    parser.add_argument("--out", type=Path, default=Path("bench/results/targets.json"))
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    evaluation = {**EVALUATION, "latency": {**EVALUATION["latency"], "repeats": args.rounds, "threads": args.threads}}
    print(f"threads {args.threads}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    rows = []
    for target in args.targets.split(","):
        settings = make_settings({"target": target, "evaluation": evaluation, "study": "bench-targets"}, {})
        bench = prepare(settings)
        grid = "gguf" if target == "llama.cpp" else "compressed-tensors"
        print(f"\n{target}: {'candidate':<38} {'decode ms':>9} {'x float':>8} {'prefill x':>9} {'resident MB':>11} "
              f"{'disk MB':>8} {'ppl runtime':>11} {'ppl torch':>9}")
        for stages in candidates(grid):
            started = time.perf_counter()
            model = build(bench.model, stages, bench.context).model
            label = describe(stages)
            row = bench.target.measure(bench.request(), model, label).row
            torch_ppl = measure_perplexity(model, bench.tokenizer, bench.corpus.eval,
                                           settings.perplexity_protocol()).perplexity
            if target == "llama.cpp":
                decode, prefill, ratio, prefill_ratio = (row["decode_ms_p50"], row["prefill_ms_p50"], row["decode_ratio"],
                                                         row["prefill_ratio"])
            else:
                decode, prefill, ratio, prefill_ratio = transformers_ratio(bench, model, settings.latency_protocol())
            result = {"target": target, "candidate": label, "decode_ms": decode, "decode_ratio": ratio,
                      "prefill_ms": prefill, "prefill_ratio": prefill_ratio, "resident_mb": row["weight_bytes"] / 1e6,
                      "disk_mb": row["disk_bytes"] / 1e6, "perplexity_runtime": row["perplexity"],
                      "perplexity_torch": torch_ppl, "seconds": time.perf_counter() - started,
                      "load": os.getloadavg()[0], "threads": args.threads,
                      "cpu": torch.backends.cpu.get_cpu_capability()}
            rows.append(result)
            print(f"{'':{len(target)}}  {label:<38} {decode:9.2f} {ratio:8.3f} {prefill_ratio:9.3f} "
                  f"{result['resident_mb']:11.1f} {result['disk_mb']:8.1f} {row['perplexity']:11.3f} {torch_ppl:9.3f}",
                  flush=True)
            del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
