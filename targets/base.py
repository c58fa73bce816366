"""The deployment-target contract and its registry.

A target is where a candidate ships: a runtime, the artifact it loads, and the figures it gives. It owns
which candidates it can deploy (`fit_spaces`: the search spaces reduced to what it serves, including the
storage grid the quantizers round onto), turning a built candidate into its artifact (`ship`), and measuring
that artifact in its own runtime (`measure`): latency, resident memory, perplexity and KL from the runtime's
logits. Techniques stay target-agnostic apart from the grid they round onto (`QuantSpace.grid`).

Adding a target: one module with a registered subclass and its import in targets/__init__.py, or from a package
of your own an entry point in the `planner.targets` group (see the checklist in search_spaces/README.md).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, Sequence

from evaluators.latency import LatencyProtocol
from evaluators.perplexity import PerplexityProtocol
from evaluators.scoring import ScorerFactory
from search_spaces.base import Registry


# What targets.figures.metrics_row writes from a measurement of bytes and latency.
ROW_FIGURES = frozenset({"weight_bytes", "weight_mb", "disk_bytes", "decode_ms_p50", "prefill_ms_p50"})
# details["runtime"]: seconds of the candidate's build that a candidate derived from its model (a cut, a student)
# would not spend: work it carries from this one's (llama-quant's costly tables); planner/deadline.py's predictions
CARRIABLE_SECONDS = "carriable_seconds"
# What a llama-quant trial spent on its shape's sensitivity tables (computed, or read back from the cache): a repeat on
# the same model reads them, so the deadline (planner/deadline.py) predicts a repeat without them.
TABLES_SECONDS = "tables_seconds"


@dataclass
class Request:
    """What a target is asked to measure and how: its own small protocol, so no target reads the planner.

    `scorers` make the accuracy figures (perplexity, kl, ...) from the runtime's logits of the held-out
    windows (`evaluators.scoring`); `hopeless(row)` is the caller's rule for skipping them once latency is
    known (a reason, or None)."""

    model: object  # the uncompressed source model: the latency reference, the tokenization of the held-out text
    tokenizer: object
    held_out: Sequence  # evaluators.corpus.Document of the evaluation split
    perplexity: PerplexityProtocol
    latency: LatencyProtocol
    evaluators: frozenset  # which to run: "latency", "memory", and the scorers' names
    scorers: tuple[ScorerFactory, ...] = ()
    device: object = "cpu"
    hopeless: Callable[[dict], str | None] = field(default=lambda row: None)
    # The caller's rule for timing longer: given a same-run ratio's intervals ({"decode_ratio": PairedRatio,
    # ...}), whether a verdict is still open (e.g. an interval straddles a budget). Targets that time A/B use it.
    unclear: Callable[[dict], bool] = field(default=lambda intervals: False)
    # Called by a target that no longer needs the built candidate (its artifact is written): the caller drops
    # its reference, so the float candidate is freed before the runtime loads the artifact and the reference.
    release: Callable[[], None] = field(default=lambda: None)

    def latency_only(self, times: int = 1) -> "Request":
        """The same request timing latency alone (no scorers: no runtime opened for logits), with `times` the
        rounds (a re-timing wants more than a trial's)."""
        protocol = replace(self.latency, repeats=self.latency.repeats * times,
                           max_repeats=self.latency.most_repeats * times)
        return replace(self, latency=protocol, evaluators=frozenset({"latency"}), scorers=())


@dataclass
class Measured:
    """A candidate's figures: the metrics row, each evaluator's full result, and why scoring was skipped."""

    row: dict
    details: dict
    skipped: str | None = None


class Target(abc.ABC):
    name: ClassVar[str]
    runtime: ClassVar[str]  # what serves the artifact, e.g. "llama.cpp"
    artifact: ClassVar[str]  # what `apply` ships, in words
    # The row keys `measure` writes besides the request's scorers' figures (every target runs those over its
    # runtime's logits): a study whose objective is neither is refused before it is created.
    figures: ClassVar[frozenset[str]] = ROW_FIGURES
    # The artifact formats `ship` writes quantized layers in; a storage grid declares which formats hold it.
    artifacts: ClassVar[frozenset[str]] = frozenset()

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

    def cannot_store(self, grid: str) -> str | None:
        """Why this target's artifact cannot hold layers on the storage grid `grid` (None: it can)."""
        from search_spaces.quantization.schemes import scheme_named

        holds = scheme_named(grid).artifacts
        if holds & self.artifacts:
            return None
        return (f"the {grid} grid is held by {', '.join(sorted(holds)) or 'no artifact format'}; the {self.name} "
                f"target ships {', '.join(sorted(self.artifacts)) or 'no quantized format'}")

    def fit_spaces(self, spaces: dict, model) -> dict:
        """The search spaces (technique name -> space or None) reduced to what the target deploys."""
        return spaces

    def methods_unfit(self, model) -> dict[str, str]:
        """{method: why} for the methods `fit_spaces` leaves out for this model itself (not for the artifact's
        format): what the study says in their one line. Default: none."""
        return {}

    def stored_beyond(self, model) -> int:
        """Bytes the artifact stores for `model` beyond what its tensors hold in memory, where no stage re-encodes
        them (llama.cpp: norms and biases in F32 whatever the model's precision). A candidate's estimate adds it
        and a budget-filling stage aims at the budget less it, so what ships is within the budget. Default: 0."""
        return 0

    def prepare(self, request: Request) -> None:
        """Before the first measurement of `request.model` (write its latency reference, warm kernels up)."""

    @abc.abstractmethod
    def measure(self, request: Request, model, label: str) -> Measured:
        """The figures of a built candidate as the target serves it."""

    @abc.abstractmethod
    def ship(self, model, tokenizer, stages: list, out: Path, runtime: dict | None = None) -> Path:
        """Write the deployable artifact of a built candidate into the folder `out`; returns its path.
        `runtime`: what the recipe recorded of how its candidate was written and served (its `metrics.runtime`);
        a target that can write an artifact more than one way writes it the recorded way, so `apply` ships the
        very file that was measured."""

    @abc.abstractmethod
    def measure_shipped(self, request: Request, artifact: Path) -> Measured:
        """The figures of a shipped artifact, loaded fresh from disk in the target's runtime."""

    def stock(self) -> dict[str, str]:
        """The field's own tool for this runtime as named settings a study can measure beside its candidates
        (a study's `compare`, e.g. llama-quantize's presets): name -> what it is. Empty: none."""
        return {}

    def measure_stock(self, request: Request, name: str, context) -> Measured:
        """The figures of the stock tool's setting `name` applied to `request.model` (with the study's build
        context, e.g. its calibration text), measured as every candidate is."""
        raise NotImplementedError(f"{self.name} has no stock tool to compare against")

    def how_to_load(self, artifact: Path, latency: LatencyProtocol) -> str:
        """One line telling a user how to serve the shipped artifact (with the settings `latency` timed it with,
        where the runtime takes them when it loads)."""
        return f"load {artifact} with {self.runtime}"


# A plug-in package's targets are this entry-point group's (the project's own: an import in targets/__init__.py).
TARGETS: Registry = Registry("deployment target", plugins="planner.targets")
register_target = TARGETS.add
AUTO = "auto"
