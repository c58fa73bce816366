"""Every figure a trial reports, defined once: name, unit, how it prints, which evaluator measures it; and the
objectives among them, selectable per study: their kind (accuracy or cost), direction, what scores them, and
what stands in for an unmeasured value.

A trial's metrics row is keyed by these names; tables, JSON, the HTML report, the study's objective values and
directions, and the budgets all read them from here. Adding an accuracy objective: a scorer
(`evaluators.scoring.WindowScorer`, scoring any runtime's held-out logits) and one `Objective` line in
`FIGURES`, at the column it shows in; a cost objective: one line naming the row key a target measures. A
plug-in package's figures: a module calling `register_figure`, named in the `planner.figures` entry-point group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from evaluators.kl import KLScorer
from evaluators.perplexity import PerplexityScorer
from evaluators.scoring import ScorerFactory, ScoringSetup, WindowScorer
from planner.errors import PlannerError
from search_spaces.base import load_plugins

ACCURACY, COST = "accuracy", "cost"
MINIMIZE, MAXIMIZE = "minimize", "maximize"


@dataclass(frozen=True)
class Metric:
    name: str  # key in a trial's metrics row
    label: str  # column heading
    unit: str
    format: str  # how a value prints in a table, e.g. "{:.2f}"
    evaluator: str  # what measures it: a scorer's name ("perplexity", "kl"), "latency" or "memory"
    brief: str | None = None  # its words in a one-line trial summary (None: not shown there)

    def shown(self, value) -> str:
        return "n/a" if value is None else self.format.format(value)


@dataclass(frozen=True)
class Objective(Metric):
    kind: str = COST  # ACCURACY: scored from held-out logits (the first objective of a study is one)
    direction: str = MINIMIZE
    # ACCURACY only: makes the scorer of its evaluator (each measurement gets a fresh one).
    scorer: Callable[[ScoringSetup], WindowScorer] | None = None
    uses_reference: bool = False  # its scorer compares against the base model's stored distributions
    # The value a trial reports when the figure was not measured (a candidate rejected from its spec, or
    # skipped as hopeless): bad enough that the sampler learns the region is bad, without a fake measurement.
    unmeasured: Callable[[dict], float] = lambda baseline: float("inf")
    budget: str | None = None  # the budget kind that limits this figure (planner.budgets), if any
    budget_scale: float = 1.0  # this figure's unit per unit of that budget's limit (weight MB per byte)

    def minimised(self, value: float) -> float:
        """The value as a minimised quantity (what rankings compare)."""
        return value if self.direction == MINIMIZE else -value


UNMEASURED_PERPLEXITY_FACTOR = 100.0  # a multiple of the baseline's perplexity
UNMEASURED_KL = 10.0  # nats: about the KL of a uniform guess over a 50k vocabulary from a confident model

# Every figure, in the column order of every table.
FIGURES: list[Metric] = [
    Objective("perplexity", "perplexity", "", "{:.2f}", "perplexity", brief="ppl", kind=ACCURACY,
              scorer=PerplexityScorer, unmeasured=lambda baseline: UNMEASURED_PERPLEXITY_FACTOR * baseline["perplexity"]),
    Metric("bits_per_byte", "bits/byte", "bits", "{:.3f}", "perplexity"),
    Objective("kl", "KL nats", "nats", "{:.4f}", "kl", brief="kl", kind=ACCURACY, scorer=KLScorer,
              uses_reference=True, unmeasured=lambda baseline: UNMEASURED_KL),
    Metric("top1_agreement", "top-1 agree", "fraction", "{:.3f}", "kl", brief="top-1"),
    Objective("decode_ms_p50", "decode ms", "ms", "{:.1f}", "latency", brief="decode ms",
              unmeasured=lambda baseline: baseline["decode_ms_p50"], budget="latency"),
    # Same-run A/B ratio of decode time to the target's reference (the uncompressed model in its runtime).
    Metric("decode_ratio", "decode x", "ratio", "{:.2f}", "latency"),
    Metric("prefill_ms_p50", "prefill ms", "ms", "{:.1f}", "latency"),
    # The same for prefill (each run prefills the prompt the protocol's `prefills` times: 1 in a study without a
    # prefill budget); left out where its interval was too wide to read (targets.llamacpp.target.PREFILL_SPREAD).
    Metric("prefill_ratio", "prefill x", "ratio", "{:.2f}", "latency"),
    Objective("weight_mb", "weight MB", "MB", "{:.1f}", "memory", brief="MB",
              unmeasured=lambda baseline: baseline["weight_mb"], budget="memory", budget_scale=1e-6),
    Metric("weight_bytes", "weight bytes", "bytes", "{:d}", "memory"),
]
OBJECTIVES: dict[str, Objective] = {}
METRICS: dict[str, Metric] = {}  # reported beside the objectives, never optimised


def _index() -> None:
    OBJECTIVES.clear()
    METRICS.clear()
    for m in FIGURES:
        (OBJECTIVES if isinstance(m, Objective) else METRICS)[m.name] = m


def register_figure(figure: Metric, before: str | None = None) -> Metric:
    """Add a figure (an objective or a reported metric) at its column: before `before`, else last. Plug-ins
    and tests use this; the project's own figures are the lines of FIGURES."""
    if figure.name in OBJECTIVES or figure.name in METRICS:
        raise ValueError(f"figure '{figure.name}' is already registered")
    names = [m.name for m in FIGURES]
    FIGURES.insert(names.index(before) if before in names else len(FIGURES), figure)
    _index()
    return figure


def unregister_figure(name: str) -> None:
    FIGURES[:] = [m for m in FIGURES if m.name != name]
    _index()


_index()
ALIASES = {"decode_ms": "decode_ms_p50", "latency": "decode_ms_p50", "memory": "weight_mb", "weight": "weight_mb"}
DEFAULT = ("perplexity", "decode_ms_p50", "weight_mb")


def column_order() -> tuple[str, ...]:
    """Every table's columns (the registry's order; weight_bytes is the row's exact figure, not a column)."""
    return tuple(m.name for m in FIGURES if m.name != "weight_bytes")


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
    if OBJECTIVES[resolved[0]].kind != ACCURACY:
        accuracy = " or ".join(n for n, o in OBJECTIVES.items() if o.kind == ACCURACY)
        raise PlannerError(f"the first objective is the accuracy the recommendation optimises: {accuracy}, "
                           f"got {resolved[0]}")
    return tuple(resolved)


def evaluators_for(objectives: tuple[str, ...]) -> set[str]:
    """The evaluators a study runs: memory always (exact and cheap, and every recipe records it), perplexity
    always (the held-out accuracy every table shows; from the same logits as any other scorer), and whatever
    measures each objective."""
    return {"memory", "perplexity"} | {OBJECTIVES[name].evaluator for name in objectives}


def values(objectives: tuple[str, ...], row: dict, baseline: dict) -> tuple[float, ...]:
    """A trial's objective values from its metrics row; unmeasured ones take their stand-in."""
    return tuple(row[name] if name in row else OBJECTIVES[name].unmeasured(baseline) for name in objectives)


def directions(objectives: tuple[str, ...]) -> list[str]:
    """Optuna's study directions of these objectives."""
    return [OBJECTIVES[name].direction for name in objectives]


def minimised(objectives: tuple[str, ...], values_: tuple[float, ...]) -> tuple[float, ...]:
    """A trial's objective values with every one turned into a quantity to minimise (rankings, dominance)."""
    return tuple(OBJECTIVES[name].minimised(v) for name, v in zip(objectives, values_))


def accuracy_objectives(objectives: tuple[str, ...]) -> list[str]:
    return [name for name in objectives if OBJECTIVES[name].kind == ACCURACY]


def scorers(evaluators: set[str], setup: ScoringSetup) -> tuple[ScorerFactory, ...]:
    """Factories of the scorers a measurement runs: every accuracy figure whose evaluator is needed."""
    return tuple((lambda o=o: o.scorer(setup)) for o in OBJECTIVES.values()
                 if o.kind == ACCURACY and o.evaluator in evaluators)


def needs_reference(evaluators: set[str]) -> bool:
    """Whether a needed scorer compares against the base model's stored distributions."""
    return any(o.uses_reference and o.evaluator in evaluators for o in OBJECTIVES.values())


# Plug-in packages' figures, registered by their modules when imported: last, as they import this module, and
# before any reader sees the registry, so what it holds never depends on what was imported first.
load_plugins("planner.figures")
