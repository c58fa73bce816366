"""Accuracy figures scored from the held-out windows' logits of any runtime, one scorer per figure family.

A runtime (torch, llama.cpp, ...) yields, window by window, the float32 logits of the scored positions and
the ids they predict (`perplexity.scored_windows` for a torch model); `score_windows` feeds every scorer from
that one pass, so adding an accuracy figure is one `WindowScorer` subclass (and one objective line in the
planner's registry), never another pass over the text or another branch in a target.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Sequence

if TYPE_CHECKING:  # annotations only: perplexity.py defines its scorer on this base
    import torch

    from evaluators.perplexity import PerplexityProtocol


@dataclass(frozen=True)
class ScoringSetup:
    """What a scorer may compare against: the base model's stored distributions (kl), and the device."""

    reference: object | None = None  # evaluators.kl.ReferenceDistributions
    device: str = "cpu"


class WindowScorer(abc.ABC):
    """Accumulates one figure family over every scored window; hooks other than `add` and `result` are optional."""

    name: ClassVar[str]  # the evaluator's name: its key in a trial's measurements

    def begin(self, encoded: Sequence[tuple[list[int], int]], protocol: PerplexityProtocol) -> None:
        """Before the first window (`encoded`: check_protocol's tokenized documents)."""

    def begin_document(self) -> None:
        """Before the first window of each document."""

    @abc.abstractmethod
    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One window: (scored, vocab) float32 logits and the (scored,) ids they predict."""

    def end_document(self) -> None:
        """After the last window of each document."""

    @abc.abstractmethod
    def result(self, protocol: PerplexityProtocol, encoded, device: str, dtype: str, start: float):
        """The finished figures: an object with `to_dict()` (the measurement stored on the trial) and
        `figures()` (the metrics-row entries, keyed by the planner's metric names)."""


ScorerFactory = Callable[[], WindowScorer]


def score_windows(windows, encoded, protocol: PerplexityProtocol, scorers: Iterable[WindowScorer],
                  device: str, dtype: str, start: float) -> list:
    """Every scorer's result from one pass: `windows(ids)` yields (logits, targets) for each window over one
    document of `encoded`. Documents and windows run in `encoded`'s order, so sums are reproducible."""
    scorers = list(scorers)
    for scorer in scorers:
        scorer.begin(encoded, protocol)
    for ids, _ in encoded:
        for scorer in scorers:
            scorer.begin_document()
        for logits, targets in windows(ids):
            for scorer in scorers:
                scorer.add(logits, targets)
        for scorer in scorers:
            scorer.end_document()
    return [scorer.result(protocol, encoded, device, dtype, start) for scorer in scorers]
