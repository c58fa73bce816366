"""A same-run latency ratio with its uncertainty, from independent rounds of a candidate timed against a reference.

A round is a triplet of runs, R C R or C R C (targets/llamacpp/runtime.py: round_figures), its middle run set
against the geometric mean of its two neighbours; its figure is the median over steps (the same position in
the KV cache) of the log of the candidate's time over the reference's (`round_log_ratio`). A linear drift of
the machine across a triplet cancels, and rounds share no run (each in fresh loads of both files), so they
are independent draws of the machine's noise. The ratio is exp(mean of the rounds' log ratios) and its interval a
Student t interval on those rounds (n - 1 degrees of freedom): its coverage is its nominal level at any number
of rounds >= 2 when the rounds' log ratios are roughly normal, which a cluster bootstrap's is not (at 3
rounds a bootstrap's interval is at most the range of the 3 rounds, which misses the true ratio whenever all
3 fall on one side: about 1 time in 4). docs/benchmarks.md section 11 measures the coverage (A/A timings on
this machine, quiet and beside the test suite, and a simulation).

Timing on while a verdict is unclear is sequential testing: looking after every round and stopping when the
interval clears a budget would make a wrong verdict likelier than the level says. A timing that may go on
looks at a fixed schedule (`looks`: the first rounds, then doubling, up to a cap) and each look's interval has
confidence 1 - alpha / (number of looks) (Bonferroni): the chance that any look's interval misses the truth,
and so of any wrong verdict, stays within alpha whatever the stopping.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
MIN_ROUNDS = 2  # a t interval needs two rounds


@dataclass(frozen=True)
class PairedRatio:
    ratio: float  # exp(mean over rounds of the round's log ratio): a geometric mean of the rounds' ratios
    low: float  # its confidence interval
    high: float
    rounds: int
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict:
        return asdict(self)

    def verdict(self, limit: float) -> str:
        """Against a ratio budget: "meets" (the whole interval within it), "over" (the whole interval past it)
        or "undecided" (the interval straddles it)."""
        if straddles(self.low, self.high, limit):
            return UNDECIDED
        return MEETS if self.high <= limit else OVER


MEETS, OVER, UNDECIDED = "meets", "over", "undecided"


def straddles(low: float, high: float, limit: float) -> bool:
    """An interval with the limit inside it: the side of the limit a figure lies on is not clear."""
    return low <= limit < high


def shown(ratio: float, low: float, high: float, confidence: float = CONFIDENCE) -> str:
    """A ratio with its interval as the planner prints it ("0.390x (95% interval 0.373-0.416)")."""
    if low == high:
        return f"{ratio:.3f}x"
    return f"{ratio:.3f}x ({level(confidence)} interval {low:.3f}-{high:.3f})"


def level(confidence: float) -> str:
    """A confidence as the planner prints it: "95%", "98.3%"."""
    return f"{confidence:.0%}" if round(confidence * 100, 6).is_integer() else f"{confidence:.1%}"


def round_log_ratio(candidate: Sequence[float], reference: Sequence[float]) -> float:
    """One round's figure: the median over paired samples (step i of each run) of log(candidate / reference)."""
    cand, ref = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if cand.shape != ref.shape or cand.ndim != 1 or cand.size == 0:
        raise ValueError(f"paired samples need two equal, non-empty lists, got {cand.shape} and {ref.shape}")
    if not (np.all(cand > 0) and np.all(ref > 0)):
        raise ValueError("paired samples must be positive times")
    return float(np.median(np.log(cand / ref)))


def rounds_ratio(log_ratios: Sequence[float], confidence: float = CONFIDENCE) -> PairedRatio:
    """The ratio of independent rounds (their log ratios, `round_log_ratio`) and its t interval."""
    from scipy.stats import t

    values = np.asarray(log_ratios, dtype=float)
    if values.ndim != 1 or values.size < MIN_ROUNDS:
        raise ValueError(f"a ratio's interval needs at least {MIN_ROUNDS} rounds, got {values.size}")
    mean = float(values.mean())
    half = float(t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))
    return PairedRatio(float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half)),
                       int(values.size), confidence)


def looks(first: int, most: int) -> list[int]:
    """The rounds after which a timing that may go on looks at its interval: `first`, then doubling, and `most`
    (a fixed schedule: the number of looks is known before any timing, so each can be given its share of alpha)."""
    first = max(MIN_ROUNDS, first)
    schedule = [first]
    while schedule[-1] < most:
        schedule.append(min(2 * schedule[-1], most))
    return schedule


def look_confidence(schedule: Sequence[int], confidence: float = CONFIDENCE) -> float:
    """Each look's confidence so that all of them together keep `confidence` (Bonferroni)."""
    return 1 - (1 - confidence) / len(schedule)
