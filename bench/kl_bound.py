"""How far below the exact KL the stored-reference KL of evaluators/kl.py lies, for each top-k: the table its
docstring quotes.

    nice -n 10 .venv/bin/python bench/kl_bound.py [--ks 32,64,128,256,512,1024] [--bits 8,4,3] [--tokens 2048]

On the built-in model and corpus at the search protocol (context 512, stride 512), each candidate is built
by the planner (`planner.candidates.build`: RTN, symmetric, groups of 64 along the input, every linear layer
of the decoder blocks, head and embeddings left alone). "exact" is the full-vocabulary KL(base || candidate)
in float64 over the scored positions; the bound at k is evaluators/kl.py's KL over the base's top-k tokens
plus one tail bin (`_top_k_and_tail` for the reference, `coarse_kl` for the KL), from the same logits. At the
planner's default k, the figure is also measured through the planner's own path (`ReferenceDistributions
.compute`, then `measure_kl`) and must agree. Output: printed, and written to bench/results/kl_bound.txt.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evaluators.kl import (  # noqa: E402
    DEFAULT_TOP_K, ReferenceDistributions, _top_k_and_tail, coarse_kl, measure_kl,
)
from evaluators.perplexity import PerplexityProtocol, check_protocol, scored_windows  # noqa: E402
from evaluators.runtime import inference_eval, model_device  # noqa: E402
from planner.candidates import build  # noqa: E402
from planner.quiet import quiet_libraries  # noqa: E402
from planner.recipes import Stage  # noqa: E402
from planner.sources import DataSource, ModelSource, load_corpus, load_model  # noqa: E402
from search_spaces import BuildContext  # noqa: E402
from search_spaces.quantization import QuantSpec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kl_bound.txt"
GROUP_SIZE = 64


def window_logits(model, tokenizer, documents, protocol) -> list[torch.Tensor]:
    """Float32 logits (positions, vocabulary) of every scored window, in scoring order."""
    encoded = check_protocol(model, tokenizer, documents, protocol)
    device = model_device(model)
    with inference_eval(model):
        return [logits.float().cpu() for ids, _ in encoded
                for logits, _ in scored_windows(model, ids, protocol.context_length, protocol.stride, device)]


def exact_kl(base: list[torch.Tensor], candidate: list[torch.Tensor]) -> torch.Tensor:
    """KL(base || candidate) per scored position over the whole vocabulary, in float64."""
    parts = []
    for p_logits, q_logits in zip(base, candidate):
        p = torch.log_softmax(p_logits.double(), dim=-1)
        q = torch.log_softmax(q_logits.double(), dim=-1)
        parts.append((p.exp() * (p - q)).sum(dim=-1).clamp_min(0.0))
    return torch.cat(parts)


def bound_kl(base: list[torch.Tensor], candidate: list[torch.Tensor], k: int) -> torch.Tensor:
    """evaluators/kl.py's KL per scored position: the base's top-k + tail reference, the candidate binned alike."""
    parts = []
    for p_logits, q_logits in zip(base, candidate):
        top_ids, top_logp, tail = _top_k_and_tail(p_logits, k)
        parts.append(coarse_kl(top_logp, tail, torch.log_softmax(q_logits, dim=-1), top_ids))
    return torch.cat(parts).double()


def tail_mass(base: list[torch.Tensor], k: int) -> float:
    """The base's mean probability mass outside its own top-k tokens."""
    return torch.cat([_top_k_and_tail(logits, k)[2].exp() for logits in base]).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--data", default="builtin:shakespeare")
    parser.add_argument("--ks", default="32,64,128,256,512,1024")
    parser.add_argument("--bits", default="8,4,3", help="RTN bit widths of the candidates")
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored (max_tokens)")
    args = parser.parse_args()
    quiet_libraries()
    ks = [int(k) for k in args.ks.split(",")]
    bits = [int(b) for b in args.bits.split(",")]
    started = time.perf_counter()

    model, tokenizer = load_model(ModelSource.parse(args.model), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse(args.data))
    protocol = PerplexityProtocol(context_length=512, stride=512, max_tokens=args.tokens)
    context = BuildContext(tokenizer, corpus.train, seed=0, progress=False)
    base = window_logits(model, tokenizer, corpus.eval, protocol)
    positions, vocabulary = sum(w.shape[0] for w in base), base[0].shape[-1]
    reference = ReferenceDistributions.compute(model, tokenizer, corpus.eval, protocol, top_k=DEFAULT_TOP_K)
    lines = [f"{args.model} (vocabulary {vocabulary}) on {args.data}, context 512, stride 512, max_tokens "
             f"{args.tokens}: {positions} scored positions; torch threads {torch.get_num_threads()}, "
             f"load {os.getloadavg()[0]:.2f}",
             "base mass outside its top k: " + ", ".join(f"k={k} {100 * tail_mass(base, k):.1f} %" for k in ks)]

    columns = []
    for b in bits:
        spec = QuantSpec(method="rtn", bits={"attn": b, "mlp": b}, group_size=GROUP_SIZE, symmetric=True)
        candidate = build(model, [Stage("quantization", spec)], context).model
        logits = window_logits(candidate, tokenizer, corpus.eval, protocol)
        exact = exact_kl(base, logits).mean().item()
        bounds = {k: bound_kl(base, logits, k).mean().item() for k in ks}
        planner_kl = measure_kl(candidate, tokenizer, corpus.eval, protocol, reference).kl_mean
        here = bound_kl(base, logits, DEFAULT_TOP_K).mean().item()
        if abs(planner_kl - here) > 1e-4 * here:
            raise SystemExit(f"{b}-bit: measure_kl gives {planner_kl}, this script's k={DEFAULT_TOP_K} bound {here}")
        del candidate, logits
        columns.append((f"{b}-bit RTN g{GROUP_SIZE}", exact, bounds))
        lines.append(f"{b}-bit RTN g{GROUP_SIZE}: exact {exact:.6f} nats; at k={DEFAULT_TOP_K} measure_kl "
                     f"{planner_kl:.6f}, this script {here:.6f}")

    lines += ["", "    k      " + "".join(f"{name + ': KL, rel. error':<30}" for name, _, _ in columns)
              + "reference bytes",
              "           " + "".join(f"{f'(exact {_nats(exact)} nats)':<30}" for _, exact, _ in columns)]
    for k in ks:
        cells = "".join(f"{_nats(bounds[k], like=exact):<8} {100 * (bounds[k] / exact - 1):+5.1f} %{'':<14}"
                        for _, exact, bounds in columns)
        lines.append(f"    {k:<6} {cells}{positions * (8 * k + 8):,}")
    lines.append(f"\n{time.perf_counter() - started:.0f} s")
    text = "\n".join(line.rstrip() for line in lines) + "\n"
    print(text, end="")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


def _nats(value: float, like: float | None = None) -> str:
    """Four significant figures, as the docstring's table writes them."""
    return f"{value:.{max(4, 3 - math.floor(math.log10(like if like is not None else value)))}f}"


if __name__ == "__main__":
    main()
