"""Every figure a trial reports, defined once: name, unit, how it prints, which evaluator measures it; and the
objectives among them (all minimised), selectable per study, with what stands in for an unmeasured value.

A trial's metrics row (`planner.trial.metrics_row`) is keyed by these names; tables, JSON, the HTML report,
the study's objective values and the budgets all read them from here. Adding an objective: one `Objective`
line in `OBJECTIVES` (and, if a new evaluator measures it, that evaluator in `planner.trial.measure`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from planner.errors import PlannerError


@dataclass(frozen=True)
class Metric:
    name: str  # key in a trial's metrics row
    label: str  # column heading
    unit: str
    format: str  # how a value prints in a table, e.g. "{:.2f}"
    evaluator: str  # what measures it: "perplexity", "kl", "latency" or "memory"

    def shown(self, value) -> str:
        return "n/a" if value is None else self.format.format(value)


@dataclass(frozen=True)
class Objective(Metric):
    direction: str = "minimize"
    # The value a trial reports when the figure was not measured (a candidate rejected from its spec, or
    # skipped as hopeless): bad enough that the sampler learns the region is bad, without a fake measurement.
    unmeasured: Callable[[dict], float] = lambda baseline: float("inf")
    budget: str | None = None  # the budget kind that limits this figure (planner.budgets), if any
    budget_scale: float = 1.0  # this figure's unit per unit of that budget's limit (weight MB per byte)


# Reported beside the objectives, never optimised.
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("bits_per_byte", "bits/byte", "bits", "{:.3f}", "perplexity"),
    Metric("prefill_ms_p50", "prefill ms", "ms", "{:.1f}", "latency"),
    # Same-run A/B ratio of decode time to the target's reference (the uncompressed model in its runtime).
    Metric("decode_ratio", "decode x", "ratio", "{:.2f}", "latency"),
    Metric("top1_agreement", "top-1 agree", "fraction", "{:.3f}", "kl"),
    Metric("weight_bytes", "weight bytes", "bytes", "{:d}", "memory"),
)}

UNMEASURED_PERPLEXITY_FACTOR = 100.0  # a multiple of the baseline's perplexity
UNMEASURED_KL = 10.0  # nats: about the KL of a uniform guess over a 50k vocabulary from a confident model

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("perplexity", "perplexity", "", "{:.2f}", "perplexity",
              unmeasured=lambda baseline: UNMEASURED_PERPLEXITY_FACTOR * baseline["perplexity"]),
    Objective("kl", "KL nats", "nats", "{:.4f}", "kl", unmeasured=lambda baseline: UNMEASURED_KL),
    Objective("decode_ms_p50", "decode ms", "ms", "{:.1f}", "latency",
              unmeasured=lambda baseline: baseline["decode_ms_p50"], budget="latency"),
    Objective("weight_mb", "weight MB", "MB", "{:.1f}", "memory",
              unmeasured=lambda baseline: baseline["weight_mb"], budget="memory", budget_scale=1e-6),
)}
ALIASES = {"decode_ms": "decode_ms_p50", "latency": "decode_ms_p50", "memory": "weight_mb", "weight": "weight_mb"}
DEFAULT = ("perplexity", "decode_ms_p50", "weight_mb")
# Column order of every table: objectives first as registered, then the reported figures.
COLUMN_ORDER = ("perplexity", "bits_per_byte", "kl", "top1_agreement", "decode_ms_p50", "decode_ratio", "prefill_ms_p50",
                "weight_mb")


def metric(name: str) -> Metric:
    return OBJECTIVES.get(name) or METRICS[name]


def parse_objectives(value) -> tuple[str, ...]:
    """Objective names from a flag ("perplexity,kl,weight_mb") or a study-file list, checked; aliases resolved."""
    if value is None:
        return DEFAULT
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise PlannerError(f"objectives must be a comma-separated list of names, got {value!r}")
    resolved = []
    for name in names:
        canonical = ALIASES.get(name, name)
        if canonical not in OBJECTIVES:
            raise PlannerError(f"unknown objective '{name}' (known: {', '.join(OBJECTIVES)})")
        if canonical in resolved:
            raise PlannerError(f"objective '{name}' is listed twice")
        resolved.append(canonical)
    if len(resolved) < 2:
        raise PlannerError(f"a study needs at least two objectives to trade off, got {', '.join(resolved)}")
    if OBJECTIVES[resolved[0]].evaluator not in ("perplexity", "kl"):
        raise PlannerError(f"the first objective is the accuracy the recommendation optimises: perplexity or kl, "
                           f"got {resolved[0]}")
    return tuple(resolved)


def evaluators_for(objectives: tuple[str, ...]) -> set[str]:
    """The evaluators a study runs: memory always (exact and cheap, and every recipe records it), perplexity
    always (the held-out accuracy every table shows), and whatever measures each objective."""
    return {"memory", "perplexity"} | {OBJECTIVES[name].evaluator for name in objectives}


def values(objectives: tuple[str, ...], row: dict, baseline: dict) -> tuple[float, ...]:
    """A trial's objective values from its metrics row; unmeasured ones take their stand-in."""
    return tuple(row[name] if name in row else OBJECTIVES[name].unmeasured(baseline) for name in objectives)
