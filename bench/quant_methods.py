"""The quantization table the planner chooses from: every method and bit-width on the built-in model.

    .venv/bin/python bench/quant_methods.py [--tokens 4096] [--only rtn,gptq] [--threads N] [--skip-perplexity]

For each candidate: held-out perplexity (512-token windows), stored weight MB (exact: packed integers,
scales and zero points included) and CPU decode ms per token (p50 over a short greedy decode through the
KV cache), plus build time. rtn/gptq rows store the LM head and embedding at 16 bits (head: 16).
Figures, not assertions: the machines here are shared and noisy (the load average is printed).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.latency import LatencyProtocol, measure_latency  # noqa: E402
from evaluators.memory import weight_bytes  # noqa: E402
from evaluators.perplexity import PerplexityProtocol, measure_perplexity  # noqa: E402
from planner.quiet import quiet_libraries  # noqa: E402
from planner.sources import DataSource, ModelSource, load_corpus, load_model  # noqa: E402
from search_spaces.base import BuildContext  # noqa: E402
from search_spaces.quantization import QuantSpec, apply, estimate_weight_bytes  # noqa: E402


def _weight_only(method: str, bits: int, head: int = 16) -> tuple[str, QuantSpec]:
    spec = QuantSpec(method=method, bits={"attn": bits, "mlp": bits, "head": head}, group_size=128)
    return f"{method} {bits}-bit g128" + ("" if head == 16 else f", head {head}-bit"), spec


CANDIDATES = [
    ("float32 baseline", None),
    _weight_only("rtn", 16),
    _weight_only("rtn", 8),
    _weight_only("rtn", 4),
    _weight_only("rtn", 4, head=4),
    _weight_only("rtn", 3),
    _weight_only("rtn", 2),
    _weight_only("gptq", 4),
    _weight_only("gptq", 3),
    ("bnb int8 (LLM.int8)", QuantSpec(method="bnb", bits={"attn": 8, "mlp": 8})),
    ("bnb nf4", QuantSpec(method="bnb", bits={"attn": 4, "mlp": 4}, bnb_4bit_type="nf4")),
    ("bnb fp4", QuantSpec(method="bnb", bits={"attn": 4, "mlp": 4}, bnb_4bit_type="fp4")),
    ("dynamic-int8", QuantSpec(method="dynamic-int8", bits={"attn": 8, "mlp": 8})),
    ("dynamic-int8, attention only", QuantSpec(method="dynamic-int8", bits={"attn": 8, "mlp": 16})),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--data", default="builtin:shakespeare")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored per candidate")
    parser.add_argument("--only", default="", help="comma-separated methods to run (rtn, gptq, bnb, dynamic-int8)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-perplexity", action="store_true", help="memory and latency only (a quick rerun)")
    args = parser.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = {m.strip() for m in args.only.split(",") if m.strip()}

    base, tokenizer = load_model(ModelSource.parse(args.model), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse(args.data))
    context = BuildContext(tokenizer, corpus.train, seed=0, progress=False)
    ppl_protocol = PerplexityProtocol(context_length=512, stride=512, max_tokens=args.tokens)
    latency_protocol = LatencyProtocol(prompt_tokens=64, new_tokens=16, warmup=1, repeats=5)
    print(f"{args.model} on {args.data}: perplexity over {args.tokens} held-out tokens (window 512), "
          f"decode p50 after a 64-token prompt; torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print(f"{'candidate':<28} {'perplexity':>10} {'weight MB':>10} {'decode ms/tok':>14} {'build s':>8}")
    for name, spec in CANDIDATES:
        if wanted and (spec is None or spec.method not in wanted):
            continue
        model = copy.deepcopy(base)
        started = time.perf_counter()
        if spec is not None:
            estimate = estimate_weight_bytes(model, spec)
            model = apply(model, spec, context)
            assert weight_bytes(model).total_bytes == estimate, name
        built = time.perf_counter() - started
        ppl = math.nan if args.skip_perplexity else measure_perplexity(model, tokenizer, corpus.eval,
                                                                        ppl_protocol).perplexity
        decode = measure_latency(model, latency_protocol).decode.p50_ms
        print(f"{name:<28} {ppl:>10.2f} {weight_bytes(model).total_bytes / 1e6:>10.1f} {decode:>14.1f} {built:>8.1f}",
              flush=True)
        del model
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
