"""Hard budgets: parsed from the command line ("25ms", "300MB", "0.5x"), resolved against the baseline,
and turned into Optuna constraint values (<= 0 means the budget is met)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from evaluators.paired import CONFIDENCE, MEETS, OVER, UNDECIDED, shown, straddles  # noqa: F401 (the verdicts, re-exported)
from planner.errors import PlannerError

# What each budget limits, and the metric (stored on every trial) it is checked against.
METRICS = {
    "latency": ("decode_ms_p50", "ms"),  # decode time per token, p50
    "prefill": ("prefill_ms_p50", "ms"),
    "memory": ("weight_bytes", "bytes"),
}

# Same-run ratios to the target's reference, where it times candidates A/B (targets/llamacpp), and the row
# keys of their confidence intervals ([low, high]: evaluators.paired).
RATIOS = {"latency": "decode_ratio", "prefill": "prefill_ratio"}
INTERVALS = {"decode_ratio": "decode_interval", "prefill_ratio": "prefill_interval"}


def timed_ratio(row: dict, ratio_metric: str) -> tuple[float, float, float] | None:
    """(ratio, low, high): a row's same-run ratio and its confidence interval (a point where the target measured
    none), or None when the row holds no such ratio."""
    ratio = row.get(ratio_metric)
    if ratio is None:
        return None
    low, high = row.get(INTERVALS[ratio_metric]) or (ratio, ratio)
    return ratio, low, high


def row_confidence(row: dict) -> float:
    """The confidence of a row's timed intervals (lower than CONFIDENCE where the timing looked more than once:
    evaluators.paired.look_confidence)."""
    return float(row.get("latency_confidence", CONFIDENCE))


def shown_ratio(row: dict, ratio_metric: str) -> str:
    """A row's same-run ratio with its interval and the interval's confidence, as the planner prints it."""
    return shown(*timed_ratio(row, ratio_metric), row_confidence(row))

TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
NUMBER = r"(?P<value>[-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)"


@dataclass(frozen=True)
class Budget:
    kind: str  # "latency" | "prefill" | "memory"
    limit: float | None = None  # absolute, in the metric's unit (ms or bytes)
    relative: float | None = None  # a fraction of the baseline's figure (0.5 for "0.5x")
    text: str = ""  # as the user wrote it

    @property
    def metric(self) -> str:
        return METRICS[self.kind][0]

    @property
    def ratio_metric(self) -> str | None:
        """The row's same-run ratio to the reference for this kind (latencies timed A/B), if there is one."""
        return RATIOS.get(self.kind)

    def uses_ratio(self, metrics: dict) -> bool:
        """A relative budget is judged on the A/B ratio where the target measured one (noise of a shared
        machine cancels in it), else on the absolute figure against the resolved limit."""
        return self.relative is not None and self.ratio_metric in metrics

    def resolve(self, baseline: dict) -> "Budget":
        """The absolute budget, given the baseline's metrics (needed for relative budgets only)."""
        if self.limit is not None:
            return self
        if self.metric not in baseline:
            raise PlannerError(f"{self.kind} budget {self.text} is relative, but the baseline has no {self.metric} "
                               "(not measured, or timed too noisily to keep on a busy machine: rerun on a quieter "
                               "one, or give the budget in ms)")
        return Budget(self.kind, self.relative * baseline[self.metric], self.relative, self.text)

    def violation(self, metrics: dict) -> float:
        """Optuna's constraint value: relative excess over the limit, <= 0 when the budget is met."""
        if self.limit is None:
            raise ValueError(f"{self.kind} budget {self.text} must be resolved against the baseline first")
        if self.uses_ratio(metrics):
            return metrics[self.ratio_metric] / self.relative - 1.0
        return metrics[self.metric] / self.limit - 1.0

    def verdict(self, metrics: dict) -> str:
        """MEETS or OVER, or UNDECIDED where the budget is judged on a same-run ratio whose confidence interval
        straddles it (then neither side is clear: timing longer, or another run, could land on either)."""
        if self.uses_ratio(metrics):
            _, low, high = timed_ratio(metrics, self.ratio_metric)
            if straddles(low, high, self.relative):
                return UNDECIDED
        return MEETS if self.violation(metrics) <= 0 else OVER

    def describe(self) -> str:
        unit = METRICS[self.kind][1]
        if self.limit is None:
            return f"{self.kind} <= {self.relative:g}x baseline"
        shown = f"{self.limit / 1e6:.1f} MB" if unit == "bytes" else f"{self.limit:.2f} ms"
        if self.relative is not None and self.ratio_metric:
            # judged on the same-run ratio where the target times A/B: the ms are the baseline's, for scale
            return f"{self.kind} <= {self.relative:g}x baseline (same-run ratio where timed A/B; {shown} at the " \
                   "baseline's figure)"
        return f"{self.kind} <= {shown}" + (f" ({self.relative:g}x baseline)" if self.relative is not None else "")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "limit": self.limit, "relative": self.relative, "text": self.text}


def unclear(budgets: list[Budget]):
    """A target's rule for timing longer (targets.Request.unclear): some ratio budget's interval straddles it."""
    def rule(intervals: dict) -> bool:
        return any(b.relative is not None and b.ratio_metric in intervals
                   and intervals[b.ratio_metric].verdict(b.relative) == UNDECIDED for b in budgets)
    return rule


def with_prefills(protocol, budgets: list[Budget]):
    """The latency protocol (evaluators.latency.LatencyProtocol) with its prefills per run resolved: where no
    prefill budget judges them and the study file leaves them open, the one prefill each run needs before its
    decode (the runtime's more precise count cost 40% of a 1.24 B candidate's timing, docs/benchmarks.md
    section 20)."""
    if protocol.prefills is None and of_kind(budgets, "prefill") is None:
        return replace(protocol, prefills=1)
    return protocol


def of_kind(budgets: list[Budget], kind: str) -> Budget | None:
    """The budget of that kind among `budgets` (there is at most one of each), or None."""
    return next((b for b in budgets if b.kind == kind), None)


def parse_budget(kind: str, text: str) -> Budget:
    """'25ms', '0.02s', '300MB', '1.5GiB', '0.5x' (relative to the baseline) -> Budget."""
    if kind not in METRICS:
        raise PlannerError(f"unknown budget kind '{kind}' (known: {', '.join(METRICS)})")
    cleaned = str(text).strip().lower().replace(" ", "")
    match = re.fullmatch(NUMBER + r"(?P<unit>[a-z]*)", cleaned)
    if not match:
        raise PlannerError(f"{kind} budget '{text}' is not a number with a unit (e.g. {_example(kind)})")
    value, unit = float(match["value"]), match["unit"]
    if not math.isfinite(value):
        raise PlannerError(f"{kind} budget '{text}' must be a finite number")
    if value <= 0:
        raise PlannerError(f"{kind} budget '{text}' must be positive")
    if unit == "x":
        return Budget(kind, relative=value, text=str(text))
    units = SIZE_UNITS if METRICS[kind][1] == "bytes" else TIME_UNITS
    if unit not in units:
        raise PlannerError(f"{kind} budget '{text}' has unknown unit '{unit or '(none)'}' "
                           f"(use {', '.join(units)} or x for a multiple of the baseline)")
    return Budget(kind, limit=value * units[unit], text=str(text))


def _example(kind: str) -> str:
    return "300MB or 0.5x" if METRICS[kind][1] == "bytes" else "25ms or 0.7x"
