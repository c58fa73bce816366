"""A maximised accuracy objective: the fraction of held-out positions whose most likely token is the next one.
A scorer over any runtime's window logits and one `Objective`, registered where its column shows."""
from __future__ import annotations

import torch

from evaluators.scoring import WindowScorer
from planner.objectives import ACCURACY, MAXIMIZE, Objective, register_figure


class TokenAccuracy(WindowScorer):
    """Fraction of scored positions whose most likely token is the one that follows: higher is better."""

    name = "token_accuracy"

    def __init__(self, setup):
        self.right = self.total = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.right += int((logits.argmax(dim=-1) == targets).sum())
        self.total += targets.numel()

    def result(self, protocol, encoded, device, dtype, start):
        return TokenAccuracyResult(self.right, self.total)


class TokenAccuracyResult:
    def __init__(self, right: int, total: int):
        self.right, self.total = right, total

    def to_dict(self) -> dict:
        return {"right": self.right, "total": self.total}

    def figures(self) -> dict:
        return {"token_accuracy": self.right / self.total}


TOKEN_ACCURACY = register_figure(
    Objective("token_accuracy", "token acc", "fraction", "{:.3f}", "token_accuracy", brief="acc", kind=ACCURACY,
              direction=MAXIMIZE, scorer=TokenAccuracy, unmeasured=lambda baseline: 0.0),
    before="decode_ms_p50")
