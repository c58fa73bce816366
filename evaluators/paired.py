"""A same-run latency ratio with its uncertainty, from paired samples of a candidate and a reference.

Each pair is one step of the candidate and one of the reference timed back to back (A/B interleaved), so a
slow drift of a shared machine (another process starting, a frequency change) moves both and cancels in the
pair's ratio. The figure is the median of the per-pair ratios; its confidence interval is a percentile
bootstrap of that median, over the pairs or over groups of them (the rounds they were timed in; fixed seed:
the same samples give the same interval).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class PairedRatio:
    ratio: float  # median over pairs of candidate / reference
    low: float  # the confidence interval of that median
    high: float
    pairs: int
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


def shown(ratio: float, low: float, high: float) -> str:
    """A ratio with its interval as the planner prints it ("0.390x (95% interval 0.373-0.416)")."""
    return f"{ratio:.3f}x" if low == high else f"{ratio:.3f}x (95% interval {low:.3f}-{high:.3f})"


def paired_ratio(candidate: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE,
                 resamples: int = RESAMPLES, seed: int = 0, groups: Sequence[int] | None = None) -> PairedRatio:
    """The median ratio of paired samples (candidate[i] with reference[i]) and its bootstrap interval. With
    `groups` (e.g. the round each pair was timed in), whole groups are resampled (a cluster bootstrap): pairs of
    one round share that round's conditions, so the interval says how much the rounds disagree, not only the
    steps within them."""
    cand, ref = np.asarray(candidate, dtype=float), np.asarray(reference, dtype=float)
    if cand.shape != ref.shape or cand.ndim != 1 or cand.size == 0:
        raise ValueError(f"paired samples need two equal, non-empty lists, got {cand.shape} and {ref.shape}")
    if not (np.all(cand > 0) and np.all(ref > 0)):
        raise ValueError("paired samples must be positive times")
    ratios = cand / ref
    rng = np.random.default_rng(seed)
    if groups is None:
        medians = np.median(ratios[rng.integers(0, ratios.size, size=(resamples, ratios.size))], axis=1)
    else:
        labels = np.asarray(groups)
        if labels.shape != ratios.shape:
            raise ValueError(f"one group per pair: {labels.shape} groups for {ratios.shape} pairs")
        members = [ratios[labels == g] for g in np.unique(labels)]
        picks = rng.integers(0, len(members), size=(resamples, len(members)))
        medians = np.array([np.median(np.concatenate([members[i] for i in row])) for row in picks])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return PairedRatio(float(np.median(ratios)), float(low), float(high), int(ratios.size), confidence)
