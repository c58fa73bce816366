"""Measure one model with all three evaluators and report the figures as a table or JSON."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

from evaluators.latency import LatencyProtocol, LatencyResult, measure_latency
from evaluators.memory import MemoryResult, measure_memory
from evaluators.perplexity import PerplexityProtocol, PerplexityResult, measure_perplexity

EVALUATORS = ("perplexity", "latency", "memory")


@dataclass(frozen=True)
class EvaluationSettings:
    perplexity: PerplexityProtocol = field(default_factory=PerplexityProtocol)
    latency: LatencyProtocol = field(default_factory=LatencyProtocol)
    memory_prompt_tokens: int = 128
    skip: tuple[str, ...] = ()


@dataclass
class EvaluationReport:
    model: str
    data: str
    device: str
    environment: dict
    corpus: dict | None = None
    perplexity: PerplexityResult | None = None
    latency: LatencyResult | None = None
    memory: MemoryResult | None = None

    def to_dict(self) -> dict:
        data = {"model": self.model, "data": self.data, "device": self.device, "environment": self.environment,
                "corpus": self.corpus}
        for name in EVALUATORS:
            result = getattr(self, name)
            data[name] = result.to_dict() if result is not None else None
        return data


def environment() -> dict:
    import torch
    import transformers

    import planner

    return {
        "planner": planner.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def evaluate(model, tokenizer, corpus, settings: EvaluationSettings, model_spec: str, device) -> EvaluationReport:
    """Memory first (cheapest), then latency, then perplexity (the slowest)."""
    report = EvaluationReport(model=model_spec, data=corpus.source if corpus else "", device=str(device),
                              environment=environment())
    if "memory" not in settings.skip:
        report.memory = measure_memory(model, prompt_tokens=settings.memory_prompt_tokens)
    if "latency" not in settings.skip:
        report.latency = measure_latency(model, settings.latency)
    if "perplexity" not in settings.skip:
        report.corpus = corpus.summary()
        report.perplexity = measure_perplexity(model, tokenizer, corpus.eval, settings.perplexity)
    return report


def format_report(report: EvaluationReport) -> str:
    rows: list[tuple[str, str, str]] = []
    ppl = report.perplexity
    if ppl is not None:
        p = ppl.protocol
        protocol = f"window {p.context_length}, stride {p.stride}, {ppl.tokens_scored} tokens of {ppl.documents} held-out works"
        rows += [
            ("perplexity", f"{ppl.perplexity:.2f}", protocol),
            ("bits per byte", f"{ppl.bits_per_byte:.4f}", f"{ppl.bytes_evaluated} bytes, {ppl.seconds:.1f} s"),
        ]
    lat = report.latency
    if lat is not None:
        p = lat.protocol
        context = f"{lat.timer}, {lat.threads} threads, load {lat.load_average_before[0]:.2f}"
        rows += [
            ("prefill ms (p50)", f"{lat.prefill.p50_ms:.1f}",
             f"{p.prompt_tokens}-token prompt; min {lat.prefill.min_ms:.1f}, p90 {lat.prefill.p90_ms:.1f}, n={lat.prefill.n}"),
            ("decode ms/token (p50)", f"{lat.decode.p50_ms:.2f}",
             f"{p.new_tokens} tokens with KV cache; min {lat.decode.min_ms:.2f}, p90 {lat.decode.p90_ms:.2f}, n={lat.decode.n}"),
            ("latency protocol", "", context),
        ]
    mem = report.memory
    if mem is not None:
        rows += [
            ("weights MB", f"{mem.weights.total_bytes / 1e6:.2f}", f"{mem.weights.total_bytes} bytes as stored, "
             + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(mem.weights.by_dtype.items()))),
            ("forward peak MB", f"{mem.peak.peak_bytes / 1e6:.1f}",
             f"{mem.peak.method}, +{mem.peak.increase_bytes / 1e6:.1f} MB over {mem.peak.before_bytes / 1e6:.1f} MB "
             f"for a {mem.peak.prompt_tokens}-token forward"),
        ]
    header = f"model {report.model}  |  data {report.data}  |  device {report.device}"
    width = max(len(r[0]) for r in rows) if rows else 0
    value_width = max(len(r[1]) for r in rows) if rows else 0
    lines = [header, "-" * len(header)]
    lines += [f"{name:<{width}}  {value:>{value_width}}  {note}" for name, value, note in rows]
    return "\n".join(lines)
