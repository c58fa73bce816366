"""The technique contract, the build context and the registry (the pattern of Optuna's `BaseSampler`).

A technique is one subpackage of `search_spaces` that registers one `Technique` instance. Its small core is
abstract: the spec type (what a recipe stores), the space type (the ranges a study file may narrow),
`suggest(trial, space)` (the only place that talks to Optuna for it) and `apply(model, spec, context)`
(builds the candidate for real). Every other hook has a default body that is right for a technique that
does not need it, so callers never test for a missing hook.

Trial parameters belong to their technique: every name starts with the technique's own prefix
(`pruning.depth_keep`, `quantization.method`). Hooks that name candidates by their parameters (`presets`,
`smallest`, `shapes`, `shape_presets`) return them *without* the prefix; `qualified` adds it.
The planner composes registered techniques in `order` (distillation, then pruning, then quantization).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

Params = dict[str, Any]  # trial parameters of one technique, named without its prefix


@dataclass(frozen=True)
class Rungs:
    """Multi-fidelity for a stage that trains: the step counts it may reach, ascending. Every new run is
    screened at the first; the planner continues one to the next when it ranks in the best `promote_top`
    fraction of the runs measured at its rung (successive halving across trials, as ASHA does)."""

    steps: tuple[int, ...]
    promote_top: float = 0.5


@dataclass(frozen=True)
class BuildContext:
    """What `apply` may use besides the model: calibration text is the training split, never held-out text."""

    tokenizer: Any
    calibration: Sequence[Any]  # evaluators.corpus.Document of the training split
    device: Any = "cpu"
    seed: int = 0
    cache_dir: Path | None = None  # where costly artefacts (distilled students) are kept
    model_id: str = ""  # identity of the source model (spec and content hash), for cache keys
    progress: bool = True
    teacher: Any = None  # the uncompressed source model, which healing distils a pruned model from
    upstream: tuple = ()  # the stages applied before this one, as plain dicts (part of a cache key)


class Technique(abc.ABC):
    name: ClassVar[str]
    order: ClassVar[int]  # composition order: lower runs first
    spec_type: ClassVar[type]
    space_type: ClassVar[type]

    # --- the abstract core -------------------------------------------------------------------------

    @abc.abstractmethod
    def suggest(self, trial, space) -> Any | None:
        """A spec sampled from `space` (names through `choose`), or None when the trial leaves the stage off."""

    @abc.abstractmethod
    def apply(self, model, spec, context: BuildContext):
        """Build the candidate for real; returns the model (the same one changed in place, or a new one)."""

    # --- parameters --------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"{self.name}."

    def param(self, name: str) -> str:
        return self.prefix + name

    def qualified(self, params: Params) -> Params:
        return {self.param(name): value for name, value in params.items()}

    def choose(self, trial, name: str, choices: Sequence[Any]) -> Any:
        """One of `choices` under this technique's parameter `name`: the value itself when there is only one
        (nothing to learn, no parameter recorded), else Optuna's categorical suggestion."""
        if len(choices) == 1:
            return choices[0]
        return trial.suggest_categorical(self.param(name), list(choices))

    # --- optional hooks, with the default of a technique that does not need them ---------------------

    # The spec field counting training steps, for a stage that trains (0 in a spec: it trains nothing).
    fidelity_field: ClassVar[str | None] = None

    def rungs(self, space) -> Rungs | None:
        """The step counts a training stage may reach (see `Rungs`); None for a stage that does not train."""
        return None

    def training_report(self, model):
        """What the training of this stage did for the model it built (a distillation `DistillReport`: steps,
        steps resumed from a cached run, seconds), or None when it trained nothing."""
        return None

    def space_defaults_for(self, given: dict) -> dict:
        """Space fields that follow from what a study file gives (e.g. a quantization grid's own bit-widths and
        group sizes): they stand between the target's defaults and the file's own fields."""
        return {}

    def fit_space(self, space, model):
        """The space narrowed to what `model` (on its device) can take: options it cannot support are left
        out up front, never found as a crash inside a trial."""
        return space

    def fit_reasons(self, space, model) -> dict[str, str]:
        """Why `fit_space` leaves options of a space field out on this model: field -> one line (the planner
        prints it beside the choices that were dropped)."""
        return {}

    def fit(self, space, model) -> tuple[Any, dict[str, str]]:
        """`fit_space` and `fit_reasons` at once, what the planner asks; a technique that finds both in one pass
        (probing the model is not free) overrides this one instead."""
        return self.fit_space(space, model), self.fit_reasons(space, model)

    def describe(self, spec, notes: dict | None = None) -> str:
        """A short label for tables and logs, such as 'prune(mlp 0.75)'; `notes` are the candidate's
        `storage_notes`, for a label that must not hide them."""
        return self.name

    def storage_notes(self, model, spec) -> dict:
        """Where the candidate built from `model` (which may live on the meta device) stores something other than
        its spec says, keyed so the label, the trial and the recipe can state it. Default: nothing."""
        return {}

    def derive_config(self, config, spec):
        """The model config of what `apply` builds from a model of `config` (shape-changing stages)."""
        return config

    def weight_bytes(self, model, spec) -> int:
        """Exact stored bytes of the candidate built from `model` (which may live on the meta device) when this
        stage is the last one. Default: the model's own weights, i.e. the stage does not change storage."""
        from evaluators.memory import weight_bytes

        return weight_bytes(model).total_bytes

    def fit_budget(self, space, memory_limit: float | None, decode_ratio: float | None = None):
        """The space for a study whose weights must fit `memory_limit` bytes and whose decode must stay within
        `decode_ratio` x the uncompressed model's (None: no such budget): a storage stage that can aim at a budget
        itself (see `aim`) samples how much of it to spend, or builds within it. Default: unchanged."""
        return space

    def aim(self, spec, model, memory_limit: float):
        """The spec with what it aims at resolved on the candidate's shapes (`model`, maybe on the meta device)
        when this stage is the last one: e.g. a byte target that is a fraction of the memory budget becomes the
        bits per weight that fill it. The resolved spec is what is built, stored and shipped. Default: the spec."""
        return spec

    def pin(self, spec, measurements: dict):
        """The spec of a measured candidate as its recipe keeps it: whatever the build chose on the study's
        machine (from caches, timings) that the artifact's `measurements` record, fixed in the spec, so a rebuild
        elsewhere makes the same artifact. Default: the spec (its build is determined by the spec alone)."""
        return spec

    def presets(self, space) -> list[Params]:
        """What a user would try by hand (e.g. 8-bit everywhere); the study starts with them."""
        return []

    def off(self, space) -> Params:
        """The parameters of a trial that leaves this stage off (empty when the space has no such choice: the
        stage then takes its first choices)."""
        return {}

    def smallest(self, space) -> list[Params]:
        """The few candidates of this stage among which its smallest is, whatever the other stages do; the
        planner sizes their combinations to tell at once when no candidate fits a memory budget. Parameters
        left out take their first choice (they must not change the size)."""
        return [{}]

    def shapes(self, space) -> list[Params]:
        """Reduced shapes worth trying (shape-changing stages); combined with the `shape_presets` of the
        storage stages as warm starts (the search-quality benchmark found the front's volume there)."""
        return []

    def shape_presets(self, space) -> list[Params]:
        """Presets worth trying on every reduced shape (storage stages)."""
        return []

    def applied_at_load(self, spec) -> bool:
        """Whether this stage is shipped as the model before it plus its spec, applied again once the checkpoint is
        loaded (its result cannot be saved, and applying it needs no calibration data)."""
        return False

    def keeps_weights(self, spec) -> bool:
        """Whether `apply` leaves every tensor of the model it is given unchanged (it may replace modules, set
        attributes): a candidate of only such stages is built on a copy sharing the base model's tensors, not a
        whole copy of its weights. False unless a technique knows: training, pruning masks and rounding in place
        all write into tensors."""
        return False

    def save(self, model, spec, folder: Path) -> None:
        """Write a built model as a checkpoint plain transformers loads (the caller saves the tokenizer)."""
        model.save_pretrained(folder)


def load_plugins(group: str) -> None:
    """Import every module the entry-point group `group` names (pyproject's [project.entry-points] of this
    project or of any installed plug-in package): each registers what it brings when imported."""
    from importlib.metadata import entry_points

    for point in entry_points(group=group):
        point.load()


class Registry(dict):
    """Named things of one kind (techniques, quantization methods, storage schemes, targets), each registered
    once by its `name`.

    `plugins`: an entry-point group (pyproject's [project.entry-points]) whose modules register more of them when
    imported, e.g. a deployment target's own quantization method, or a plug-in package's. They are imported on the
    first read of the registry, so what it holds never depends on which package happened to be imported first."""

    def __init__(self, kind: str, plugins: str | None = None):
        super().__init__()
        self.kind = kind
        self.plugins = plugins
        self._plugins_loaded = plugins is None

    def add(self, item):
        if dict.__contains__(self, item.name):
            raise ValueError(f"{self.kind} {item.name} is registered twice")
        self[item.name] = item
        return item

    def load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # first: a plugin reading the registry while it loads must not recurse
        load_plugins(self.plugins)

    def __getitem__(self, name):
        self.load_plugins()
        return super().__getitem__(name)

    def __contains__(self, name) -> bool:
        self.load_plugins()
        return super().__contains__(name)

    def __iter__(self):
        self.load_plugins()
        return super().__iter__()

    def __len__(self) -> int:
        self.load_plugins()
        return super().__len__()

    def get(self, name, default=None):
        self.load_plugins()
        return super().get(name, default)

    def keys(self):
        self.load_plugins()
        return super().keys()

    def values(self):
        self.load_plugins()
        return super().values()

    def items(self):
        self.load_plugins()
        return super().items()


TECHNIQUES: Registry = Registry("technique")
register = TECHNIQUES.add


def ordered() -> list[Technique]:
    return sorted(TECHNIQUES.values(), key=lambda t: t.order)
