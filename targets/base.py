"""The deployment-target contract and its registry.

A target is where a candidate ships: a runtime, the artifact it loads, and the figures it gives. It owns
which candidates it can deploy (`fit_spaces`: the search spaces reduced to what it serves, including the
storage grid the quantizers round onto), turning a built candidate into its artifact (`ship`), and measuring
that artifact in its own runtime (`measure`): latency, resident memory, perplexity and KL from the runtime's
logits. Techniques stay target-agnostic apart from the grid they round onto (`QuantSpace.grid`).

Adding a target: one module with a registered subclass and its import in targets/__init__.py (see the
checklist in search_spaces/README.md).
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from search_spaces.base import Registry

if TYPE_CHECKING:
    from planner.trial import Workbench


class Target(abc.ABC):
    name: ClassVar[str]
    runtime: ClassVar[str]  # what serves the artifact, e.g. "llama.cpp"
    artifact: ClassVar[str]  # what `apply` ships, in words

    def unavailable(self, device: str) -> str | None:
        """Why the target cannot run on this machine and device (None: it can)."""
        return None

    def unsupported(self, model, tokenizer) -> str | None:
        """Why the target cannot serve this model (architecture, tokenizer...) (None: it can)."""
        return None

    def space_defaults(self) -> dict:
        """Per technique, the space fields this target sets before a study file narrows them (e.g. its storage
        grid and the bit-widths it stores), so the file is validated against what the target can store."""
        return {}

    def fit_spaces(self, spaces: dict, model) -> dict:
        """The search spaces (technique name -> space or None) reduced to what the target deploys."""
        return spaces

    def open(self, bench: "Workbench") -> object:
        """Before measuring for `bench`'s model (e.g. write its latency reference); returns what it prepared."""
        return None

    @abc.abstractmethod
    def measure(self, bench: "Workbench", model, label: str, trial=None) -> tuple[dict, dict]:
        """(metrics row, evaluator details) of a built candidate as the target serves it. `trial` (when given)
        records why perplexity was skipped (a latency far over its budget)."""

    @abc.abstractmethod
    def ship(self, model, tokenizer, stages: list, out: Path) -> Path:
        """Write the deployable artifact of a built candidate into the folder `out`; returns its path."""

    @abc.abstractmethod
    def measure_shipped(self, bench: "Workbench", artifact: Path) -> tuple[dict, dict]:
        """The figures of a shipped artifact, loaded fresh from disk in the target's runtime."""


TARGETS: Registry = Registry("deployment target")
register_target = TARGETS.add
AUTO = "auto"
