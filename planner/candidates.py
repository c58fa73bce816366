"""Candidates: an ordered list of stages, built for real from the source model, sized exactly before that.

Sizing composes the techniques' exact estimators: every shape-changing stage maps the config to the
config of what it builds, an empty model of that config is made on the meta device (no memory, no
weights), and the stage that decides how weights are stored sizes it. No stage is run.
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from optuna.distributions import CategoricalDistribution
from tqdm import tqdm

from evaluators.memory import weight_bytes
from planner.recipes import Stage, plain_stages
from search_spaces import TECHNIQUES, BuildContext, ordered
from search_spaces.structure.surgery import copy_modules


@dataclass
class BuiltCandidate:
    model: torch.nn.Module
    stage_seconds: dict[str, float]
    training: dict[str, dict] = field(default_factory=dict)  # technique -> what its training did (steps, resumed from, seconds), if it trained


def suggest_stages(trial, spaces: dict) -> list[Stage]:
    """One spec per enabled technique, in composition order (the only place the study samples a candidate)."""
    stages = []
    for technique in ordered():
        space = spaces.get(technique.name)
        if space is None:
            continue
        spec = technique.suggest(trial, space)
        if spec is not None:
            stages.append(Stage(technique.name, spec))
    return stages


def _enabled(spaces: dict):
    """(technique, space) of each enabled technique, in composition order."""
    return [(t, spaces[t.name]) for t in ordered() if spaces.get(t.name) is not None]


def hand_picked(spaces: dict) -> list[dict]:
    """Trial parameters of the baseline (every stage off) and of each technique's presets on their own."""
    off = {k: v for t, space in _enabled(spaces) for k, v in t.qualified(t.off(space)).items()}
    presets = [t.qualified(p) for t, space in _enabled(spaces) for p in t.presets(space)]
    return [off] + [{**off, **preset} for preset in presets]


def on_shapes(spaces: dict, smallest: bool = False) -> list[dict]:
    """Trial parameters of the shape presets (e.g. GPTQ 4-bit, dynamic int8) on each reduced shape (e.g.
    pruned depth or MLP width), every other stage off; with `smallest`, the storage stages' smallest candidates
    instead (e.g. 4-bit with the tied head left shared: what fits a tight memory budget)."""
    return [seed for group in _shape_groups(spaces, smallest) for seed in group]


def _shape_groups(spaces: dict, smallest: bool = False) -> list[list[dict]]:
    off = hand_picked(spaces)[0]
    shapes = [t.qualified(p) for t, space in _enabled(spaces) for p in t.shapes(space)]
    storage = [(t, space) for t, space in _enabled(spaces) if t.shape_presets(space)]
    presets = [t.qualified(p) for t, space in storage for p in (t.smallest(space) if smallest else t.shape_presets(space))]
    return [[{**off, **shape, **preset} for preset in presets] for shape in shapes]


def starting_points(base_model: torch.nn.Module, spaces: dict, memory_limit: float | None, trials: int,
                    say: Callable[[str], None] = tqdm.write, beyond: Callable = None) -> list[dict]:
    """What a study is seeded with: the hand-picked candidates, then the shape presets (on a shape where none
    fits the memory budget, the storage stages' smallest candidates), leaving out those
    whose spec alone is over the memory budget (each would spend a trial being rejected), and the shape
    presets only up to three quarters of the study's trials (the sampler gets the rest). In the
    search-quality benchmark (docs/benchmarks.md) these seeds carry a 20-trial study from 81% to 96% of
    the exhaustive front's hypervolume; the sampler's share adds little at that length.

    A seed that gives a parameter a value outside the choices the spaces offer it (Optuna would fail its
    trial) is left out too, with one line through `say`."""
    said = set()

    def admitted(candidates: list[dict]) -> list[dict]:
        kept = []
        for params in candidates:
            try:
                stages = suggest_stages(SeedTrial(params), spaces)
            except OutsideSpace as exc:
                if str(exc) not in said:  # a shape outside the space is named once
                    said.add(str(exc))
                    say(f"planner: a seed left out: {exc}")
                continue
            if memory_limit is None or estimate_weight_bytes(
                    base_model, aim(base_model, stages, memory_limit, beyond=beyond), beyond=beyond) <= memory_limit:
                kept.append(params)
        return kept

    chosen = admitted(hand_picked(spaces))
    room = max(0, trials * 3 // 4 - len(chosen))
    shaped = []
    # a shape none of whose presets fits the memory budget is tried with the storage stages' smallest instead
    for presets, smallest in zip(_shape_groups(spaces), _shape_groups(spaces, smallest=True)):
        shaped += admitted(presets) or (admitted(smallest) if memory_limit is not None else [])
    return chosen + shaped[:room]


class CornerTrial:
    """Stands in for an Optuna trial when a candidate is named by its parameters: a named parameter takes
    its given value, any other its first choice."""

    def __init__(self, params: dict):
        self.params = params

    def suggest_categorical(self, name: str, choices):
        return self.params.get(name, list(choices)[0])


class OutsideSpace(ValueError):
    """A candidate named by its parameters gives one of them a value its choices do not hold."""


class SeedTrial(CornerTrial):
    """A CornerTrial that refuses a given value outside the choices `suggest` offers its parameter, as a trial
    enqueued with it would when it runs (the same check: Optuna's categorical distribution of those choices)."""

    def suggest_categorical(self, name: str, choices):
        choices = list(choices)
        if name in self.params:
            try:
                CategoricalDistribution(choices).to_internal_repr(self.params[name])
            except ValueError:
                raise OutsideSpace(f"{name} = {self.params[name]!r} is not among its choices "
                                   f"({', '.join(map(repr, choices))})") from None
        return super().suggest_categorical(name, choices)


def smallest_candidate(base_model: torch.nn.Module, spaces: dict, memory_limit: float | None = None,
                       beyond: Callable = None) -> tuple[int, list[Stage]]:
    """The fewest bytes any candidate of the spaces stores, and that candidate: the combinations of each
    technique's smallest settings, sized from their specs (aimed at `memory_limit` where a stage aims at it)."""
    corner_lists = [[t.qualified(p) for p in t.smallest(space)] for t, space in _enabled(spaces)]
    best = None
    for combination in itertools.product(*corner_lists):
        stages = suggest_stages(CornerTrial({k: v for params in combination for k, v in params.items()}), spaces)
        stages = aim(base_model, stages, memory_limit, beyond=beyond)
        size = estimate_weight_bytes(base_model, stages, beyond=beyond)
        if best is None or size < best[0]:
            best = (size, stages)
    return best


def shaped_model(base_model: torch.nn.Module, stages: list[Stage]) -> torch.nn.Module:
    """A model of the candidate's shapes without building it: every stage maps the config to the config of
    what it builds, and an empty model of that config is made on the meta device (the base model itself when
    no stage changes a shape)."""
    config = base_model.config
    for stage in stages:
        config = TECHNIQUES[stage.technique].derive_config(config, stage.spec)
    if config is base_model.config:
        return base_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=next(base_model.parameters()).dtype)


def aim(base_model: torch.nn.Module, stages: list[Stage], memory_limit: float | None, shaped=None,
        beyond: Callable = None) -> list[Stage]:
    """The stages with what they aim at resolved on the candidate's shapes (`Technique.aim`): e.g. an allocation
    spending a share of the memory budget gets the bits per weight that spend it: the budget less what the target
    stores beyond the held tensors (`beyond`: `Target.stored_beyond`). Without a budget, unchanged."""
    if memory_limit is None or not stages:
        return stages
    shaped = shaped if shaped is not None else shaped_model(base_model, stages)
    room = memory_limit - (beyond(shaped) if beyond else 0)
    return [replace(stage, spec=TECHNIQUES[stage.technique].aim(stage.spec, shaped, room)) for stage in stages]


def estimate_weight_bytes(base_model: torch.nn.Module, stages: list[Stage], shaped=None,
                          beyond: Callable = None) -> int:
    """Exact stored bytes of the candidate, without building it: the last stage (storage stages come last in
    composition order) sizes the candidate's shapes (`shaped_model`); `beyond` (`Target.stored_beyond`) adds
    what the target's artifact stores beyond the held tensors (e.g. llama.cpp's norms in F32)."""
    if not stages:
        shaped, size = base_model, weight_bytes(base_model).total_bytes
    else:
        shaped = shaped if shaped is not None else shaped_model(base_model, stages)
        size = TECHNIQUES[stages[-1].technique].weight_bytes(shaped, stages[-1].spec)
    return size + (beyond(shaped) if beyond else 0)


def storage_notes(base_model: torch.nn.Module, stages: list[Stage], shaped=None) -> dict:
    """What the stages store differently from what their specs say, on this model's shapes (e.g. layers whose
    width a requested group size does not divide, with the grid they use instead); empty when nothing."""
    if not stages:
        return {}
    shaped = shaped if shaped is not None else shaped_model(base_model, stages)
    notes = {}
    for stage in stages:
        notes.update(TECHNIQUES[stage.technique].storage_notes(shaped, stage.spec))
    return notes


class Screened(Exception):
    """A candidate given up before its last stage: what the stages before made is already far worse than the
    best measured candidate (the reason, and the float figure, are the trial's `screened`)."""

    def __init__(self, reason: str, figures: dict, seconds: dict, training: dict):
        super().__init__(reason)
        self.reason, self.figures, self.seconds, self.training = reason, figures, seconds, training


def own_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A whole copy, tensors included."""
    return copy.deepcopy(model)


def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _shares_tensors(model: torch.nn.Module, base: torch.nn.Module) -> bool:
    held = {t.untyped_storage().data_ptr() for t in _tensors(base)}
    return any(t.untyped_storage().data_ptr() in held for t in _tensors(model))


def build(base_model: torch.nn.Module, stages: list[Stage], context: BuildContext,
          screen: Callable[[torch.nn.Module], tuple[str, dict] | None] | None = None) -> BuiltCandidate:
    """Apply the stages in order to a copy of the base model; the base model is never changed (it is each
    stage's `context.teacher`, and the stages before one are its `context.upstream`). With `screen`, the model
    the stages before the last one made is judged first (a reason and its figures: `Screened` is raised, the
    last stage, its artifact and its timing are never paid for).

    The copy is of the modules only, sharing the base model's tensors, for as long as the stages leave tensors as
    they find them (`keeps_weights`: llama-quant's plan, a student made as a new model); a stage that writes into
    tensors gets a whole copy first, unless the model it is given already holds tensors of its own (a student):
    at 1.24 B parameters each whole copy not made is 5 GB (float32) off a trial's peak."""
    model = copy_modules(base_model)
    seconds, training, plain = {}, {}, plain_stages(stages)
    for index, stage in enumerate(stages):
        if screen is not None and index == len(stages) - 1 and index > 0:
            started = time.perf_counter()
            verdict = screen(model.eval())
            seconds["screen"] = time.perf_counter() - started
            if verdict is not None:
                raise Screened(verdict[0], verdict[1], seconds, training)
        technique = TECHNIQUES[stage.technique]
        started = time.perf_counter()
        if not technique.keeps_weights(stage.spec) and _shares_tensors(model, base_model):
            model = own_copy(model)
        model = technique.apply(model, stage.spec, replace(context, teacher=base_model, upstream=tuple(plain[:index])))
        seconds[stage.technique] = time.perf_counter() - started
        report = technique.training_report(model)
        if report is not None:
            training[stage.technique] = report.to_dict()
    return BuiltCandidate(model.eval(), seconds, training)


def shipped_stages(stages: list[Stage]) -> list[Stage]:
    """The stages a shipped artifact is built from: all, less a last stage applied again at load time (dynamic
    int8 on transformers ships the model before it, with its spec beside it)."""
    if stages and TECHNIQUES[stages[-1].technique].applied_at_load(stages[-1].spec):
        return stages[:-1]
    return stages


def describe(stages: list[Stage], notes: dict | None = None) -> str:
    """A short label such as 'prune(mlp 0.75) + quant(gptq 4/4 g128*)' for tables and logs; with the stages'
    storage notes, what the label would hide is marked (see `Technique.describe`)."""
    if not stages:
        return "baseline"
    return " + ".join(TECHNIQUES[stage.technique].describe(stage.spec, notes or {}) for stage in stages)
