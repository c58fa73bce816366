"""How long each evaluator takes on the built-in model, so later work can budget trial time.

    .venv/bin/python bench/evaluate_cost.py [--threads N] [--tokens 6144]

Prints seconds per 1k scored tokens for two perplexity protocols, the wall time of the default latency
protocol with its figures, and the time of the memory evaluator. Figures, not assertions: the machines
here are shared and noisy, so the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.latency import LatencyProtocol, measure_latency  # noqa: E402
from evaluators.memory import measure_memory  # noqa: E402
from evaluators.perplexity import PerplexityProtocol, measure_perplexity  # noqa: E402
from planner.quiet import quiet_libraries  # noqa: E402
from planner.sources import DataSource, ModelSource, load_corpus, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--data", default="builtin:shakespeare")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=6144,
                        help="held-out tokens per perplexity run, spread over the held-out works")
    args = parser.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, tokenizer = load_model(ModelSource.parse(args.model), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse(args.data))
    print(f"model {args.model} loaded in {time.perf_counter() - started:.1f} s; "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")

    print("\nperplexity")
    for context, stride in ((512, 512), (512, 256), (1024, 512)):
        result = measure_perplexity(model, tokenizer, corpus.eval, PerplexityProtocol(context, stride, args.tokens))
        per_k = result.seconds / result.tokens_scored * 1000
        print(f"  window {context:>4} stride {stride:>4}: {result.tokens_scored} tokens in {result.seconds:6.1f} s "
              f"= {per_k:5.2f} s per 1k tokens scored (ppl {result.perplexity:.2f})")

    print("\nlatency (default protocol)")
    lat = measure_latency(model, LatencyProtocol())
    p = lat.protocol
    print(f"  {p.warmup} warm-up + {p.repeats} repeats of a {p.prompt_tokens}-token prefill and {p.new_tokens} decode steps: "
          f"wall {lat.wall_seconds:.1f} s")
    print(f"  prefill p50 {lat.prefill.p50_ms:.1f} ms (min {lat.prefill.min_ms:.1f}, p90 {lat.prefill.p90_ms:.1f}); "
          f"decode p50 {lat.decode.p50_ms:.2f} ms/token (min {lat.decode.min_ms:.2f}, p90 {lat.decode.p90_ms:.2f}); "
          f"load {lat.load_average_before[0]:.2f} -> {lat.load_average_after[0]:.2f}")

    print("\nmemory")
    started = time.perf_counter()
    mem = measure_memory(model)
    print(f"  weights {mem.weights.total_bytes / 1e6:.1f} MB, forward peak {mem.peak.peak_bytes / 1e6:.0f} MB "
          f"({mem.peak.method}) in {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
