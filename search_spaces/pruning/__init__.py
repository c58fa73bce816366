"""Pruning as a search space: structured cuts that really shrink the model, plus optional weight sparsity.

Structured (the part that makes a model smaller and faster on any hardware), ranked by importance on
calibration text (`structure.importance`), cut for real (`structure.surgery`), config updated so the model saves
and reloads as a plain transformers model:
- `depth_keep`: fraction of decoder layers kept (dropped by least 1 - cos(block input, output));
- `mlp_keep`: fraction of MLP neurons kept in every layer (by activation x output-weight norm);
- `heads_keep`: fraction of key/value groups kept, each with its query heads, so grouped-query attention
  stays valid. Only where the model reads head_dim from its config (Llama, Qwen2, Phi-3...); not GPT-2.
Unstructured (`sparsity` per layer group, "attn" / "mlp"), by magnitude or Wanda, optionally in the 2:4
pattern: zeros stored densely gain nothing on a CPU or in a dense checkpoint (see `unstructured`),
so the default space leaves it off; a study file can open it.
Healing (`heal_steps`, the Minitron recipe: prune, then distil): the cut model is trained for a few steps
to imitate the uncompressed model (`context.teacher`), through the same cached, resumable runs as
distillation (`distillation.runs`), so its steps are rungs the planner raises for promising cuts.

`apply` prunes the model it is given in place and returns it (the planner builds each candidate from a
fresh copy); what was kept is on the returned model as `pruning_report` (see `report_of`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Literal

from torch import nn

from search_spaces.base import BuildContext, Params, Rungs, register
from search_spaces.distillation.runs import DistillReport, lineage_material, trained
from search_spaces.distillation.train import TrainSettings
from search_spaces.specs import DictSpec, SpecError
from search_spaces.calibration import calibration_batches
from search_spaces.structure.importance import input_feature_norms, structural_importance
from search_spaces.structure.anatomy import UnsupportedArchitecture
from search_spaces.specs import (check_bool, check_choices, check_float, check_fraction, check_int, check_member,
                                 check_positive, check_rungs)
from search_spaces.structure.shape import RATIO_FIELDS, Shape, Structure, check_ratio, ratio_labels, reduced_shapes
from search_spaces.structure.technique import StructuredTechnique
from search_spaces.structure.surgery import StructureReport, check_structure, needed_scores, restructure
from search_spaces.pruning.unstructured import GROUPS, METHODS, PATTERNS, SEMI_STRUCTURED_SPARSITY, \
    sparsified_modules, sparsify
from search_spaces.layers import linear_sites, weight_out_in

REPORT_ATTRIBUTE = "pruning_report"
HEAL_TEMPERATURE, HEAL_ALPHA = 2.0, 0.5  # the distillation defaults (DistillSpec)
check_sparsity = check_float(0.0, 1.0, high_open=True)


def _check_sparsity_map(where: str, sparsity: dict, check_value) -> None:
    for group, value in sparsity.items():
        check_member(GROUPS)(f"{where}.{group}", group)
        check_value(f"{where}.{group}", value)


@dataclass(frozen=True)
class PruneSpec(DictSpec):
    depth_keep: float = 1.0
    mlp_keep: float = 1.0
    heads_keep: float = 1.0
    sparsity: dict[str, float] = field(default_factory=dict)  # layer group ("attn", "mlp") -> fraction zeroed
    method: Literal["magnitude", "wanda"] = "wanda"
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    calibration_samples: int = 32  # windows of training text for importance scores and Wanda norms
    calibration_seq_len: int = 256
    heal_steps: int = 0  # distillation steps from the uncompressed model after the cuts (0: no healing)
    heal_batch_size: int = 2
    heal_seq_len: int = 128
    heal_lr: float = 1e-4

    def __post_init__(self) -> None:
        for name in RATIO_FIELDS:
            check_ratio(f"PruneSpec.{name}", getattr(self, name))
        check_int(0)("PruneSpec.heal_steps", self.heal_steps)
        check_int(1)("PruneSpec.heal_batch_size", self.heal_batch_size)
        check_int(2)("PruneSpec.heal_seq_len", self.heal_seq_len)
        check_positive("PruneSpec.heal_lr", self.heal_lr)
        check_value = check_sparsity if self.pattern != "2:4" else check_member((0.0, SEMI_STRUCTURED_SPARSITY))
        _check_sparsity_map("PruneSpec.sparsity", self.sparsity, check_value)
        check_member(METHODS)("PruneSpec.method", self.method)
        check_member(PATTERNS)("PruneSpec.pattern", self.pattern)
        check_int(1)("PruneSpec.calibration_samples", self.calibration_samples)
        check_int(2)("PruneSpec.calibration_seq_len", self.calibration_seq_len)
        if self.heal_steps and (self.structure.is_identity or self.is_sparse):
            raise SpecError("PruneSpec.heal_steps: healing trains a structurally cut model (it would regrow "
                            "zeroed weights, and an uncut model has nothing to heal)")

    @property
    def structure(self) -> Structure:
        return Structure(self.depth_keep, self.mlp_keep, self.heads_keep)

    @property
    def is_sparse(self) -> bool:
        return any(v > 0 for v in self.sparsity.values())

    @property
    def is_identity(self) -> bool:
        return self.structure.is_identity and not self.is_sparse

    @property
    def healing(self) -> TrainSettings:
        return TrainSettings(self.heal_steps, self.heal_batch_size, self.heal_lr, HEAL_TEMPERATURE, HEAL_ALPHA, 1.0)

    def summary(self) -> str:
        """A short label such as 'prune(depth 0.8, mlp 0.75, wanda mlp 0.5)' for tables and logs."""
        parts = ratio_labels(self.structure)
        if self.is_sparse:
            groups = " ".join(f"{g} {v:g}" for g, v in self.sparsity.items() if v > 0)
            parts.append(f"{self.method}{' 2:4' if self.pattern == '2:4' else ''} {groups}")
        if self.heal_steps:
            parts.append(f"healed {self.heal_steps} steps")
        return f"prune({', '.join(parts)})"


def _default_sparsity() -> dict[str, tuple[float, ...]]:
    # Off by default: dense zeros cost the same memory and time; a study file may open e.g. (0.0, 0.5).
    return {"attn": (0.0,), "mlp": (0.0,)}


@dataclass(frozen=True)
class PruneSpace(DictSpec):
    enabled: tuple[bool, ...] = (False, True)
    depth_keep: tuple[float, ...] = (1.0, 0.9, 0.8)
    mlp_keep: tuple[float, ...] = (1.0, 0.875, 0.75, 0.5)
    heads_keep: tuple[float, ...] = (1.0, 0.67)
    sparsity: dict[str, tuple[float, ...]] = field(default_factory=_default_sparsity)
    method: tuple[str, ...] = ("wanda",)
    pattern: tuple[str, ...] = ("unstructured",)  # add "2:4" to search the semi-structured pattern (GPU only)
    calibration_samples: int = 32
    calibration_seq_len: int = 256
    # Healing: whether a cut model is distilled from the uncompressed one, and the rungs of its steps (the
    # planner screens every healed cut with the first and continues promising ones, see base.Rungs).
    heal: tuple[bool, ...] = (False, True)
    heal_steps: tuple[int, ...] = (16, 48)
    promote_top: float = 0.5
    heal_batch_size: int = 2
    heal_seq_len: int = 128
    heal_lr: float = 1e-4

    def __post_init__(self) -> None:
        check_choices("PruneSpace.enabled", self.enabled, check_bool)
        check_choices("PruneSpace.heal", self.heal, check_bool)
        check_rungs("PruneSpace.heal_steps", self.heal_steps)
        check_fraction("PruneSpace.promote_top", self.promote_top)
        check_int(1)("PruneSpace.heal_batch_size", self.heal_batch_size)
        check_int(2)("PruneSpace.heal_seq_len", self.heal_seq_len)
        check_positive("PruneSpace.heal_lr", self.heal_lr)
        for name in RATIO_FIELDS:
            check_choices(f"PruneSpace.{name}", getattr(self, name), check_ratio)
        for group, choices in self.sparsity.items():
            check_member(GROUPS)(f"PruneSpace.sparsity.{group}", group)
            check_choices(f"PruneSpace.sparsity.{group}", choices, check_sparsity)
        check_choices("PruneSpace.method", self.method, check_member(METHODS))
        check_choices("PruneSpace.pattern", self.pattern, check_member(PATTERNS))
        check_int(1)("PruneSpace.calibration_samples", self.calibration_samples)
        check_int(2)("PruneSpace.calibration_seq_len", self.calibration_seq_len)


@dataclass(frozen=True)
class PruneReport:
    structure: StructureReport
    sparsity: dict[str, float]  # achieved zeros per layer group
    seconds: float
    healing: DistillReport | None = None  # the healing run (steps, resumed from, cache hit), when healed

    def to_dict(self) -> dict:
        return {"structure": self.structure.to_dict(), "sparsity": dict(self.sparsity), "seconds": self.seconds,
                "healing": self.healing.to_dict() if self.healing else None}


def heal_material(teacher: nn.Module, spec: PruneSpec, context: BuildContext) -> dict:
    """What a healed model depends on besides its steps: as a student's, plus the stages before pruning (and, where
    no teacher is given and the model was built by those stages, that the teacher is that built model: its states
    are not the source model's, distillation.teacher)."""
    derived = {"teacher_upstream": list(context.upstream)} if context.teacher is None and context.upstream else {}
    return lineage_material("healed", teacher, spec, "heal_steps", context, upstream=list(context.upstream), **derived)


def apply(model: nn.Module, spec: PruneSpec, context: BuildContext) -> nn.Module:
    """Prune `model` in place (structured cuts, then sparsity) and return it, with its `pruning_report`; with
    `heal_steps`, the healed model (a cached one is loaded instead of cutting again)."""
    if not spec.heal_steps:
        return cut(model, spec, context)
    started = time.perf_counter()
    teacher = context.teacher if context.teacher is not None else copy.deepcopy(model)

    def start():
        cut(model, spec, context)
        return model, report_of(model).structure.to_dict()

    healed, run = trained(teacher, heal_material(teacher, spec, context), spec.healing, spec.heal_seq_len, context,
                          start)
    setattr(healed, REPORT_ATTRIBUTE, PruneReport(structure_report(run.structure), {}, time.perf_counter() - started,
                                                  run))
    return healed


def structure_report(stored: dict) -> StructureReport:
    """A StructureReport from its `to_dict` (what a cached healed model's report keeps)."""
    return StructureReport(Shape(**stored["shape"]), tuple(stored["kept_layers"]),
                           {int(k): tuple(v) for k, v in stored["kept_kv_groups"].items()})


def cut(model: nn.Module, spec: PruneSpec, context: BuildContext) -> nn.Module:
    """The structured cuts, then sparsity, in place (no healing)."""
    started = time.perf_counter()
    try:
        check_structure(model, spec.structure)
    except UnsupportedArchitecture as exc:
        raise exc.spec_error("PruneSpec") from None
    needs = needed_scores(model, spec.structure)
    batches = None
    if any(needs.values()) or (spec.is_sparse and spec.method == "wanda"):
        batches = calibration_batches(context.tokenizer, context.calibration, spec.calibration_samples,
                                      spec.calibration_seq_len, context.seed)
    scores = structural_importance(model, batches, **needs) if any(needs.values()) else None
    structure = restructure(model, spec.structure, scores)
    achieved = {}
    if spec.is_sparse:
        norms = None
        if spec.method == "wanda":
            norms = input_feature_norms(model, sparsified_modules(model, spec.sparsity), batches)
        achieved = sparsify(model, spec.sparsity, spec.method, spec.pattern, norms)
    setattr(model, REPORT_ATTRIBUTE, PruneReport(structure, achieved, time.perf_counter() - started))
    return model


class Pruning(StructuredTechnique):
    name, order, spec_type, space_type = "pruning", 20, PruneSpec, PruneSpace
    report_attribute = REPORT_ATTRIBUTE

    fidelity_field = "heal_steps"

    def suggest_when_on(self, trial, space: PruneSpace) -> PruneSpec | None:
        """A pruning spec from `space`, or None when every sampled cut is a no-op; a structural cut without
        sparsity may be healed (at the first rung: the planner raises it)."""
        ratios = {name: self.choose(trial, name, getattr(space, name)) for name in RATIO_FIELDS}
        sparsity, pattern, method = {}, "unstructured", space.method[0]
        if any(v > 0 for choices in space.sparsity.values() for v in choices):
            pattern = self.choose(trial, "pattern", space.pattern)
            for group, choices in space.sparsity.items():
                if pattern == "2:4":  # the pattern fixes the fraction: a group is either 2:4 or dense
                    dense_or_half = (0.0, SEMI_STRUCTURED_SPARSITY) if any(v > 0 for v in choices) else (0.0,)
                    sparsity[group] = self.choose(trial, f"sparsity_2_4.{group}", dense_or_half)
                else:
                    sparsity[group] = self.choose(trial, f"sparsity.{group}", choices)
            if any(v > 0 for v in sparsity.values()):
                method = self.choose(trial, "method", space.method)
        heal = False
        if not Structure(**ratios).is_identity and not any(sparsity.values()):
            heal = self.choose(trial, "heal", space.heal)
        spec = PruneSpec(**ratios, sparsity=sparsity, method=method, pattern=pattern,
                         calibration_samples=space.calibration_samples,
                         calibration_seq_len=space.calibration_seq_len,
                         heal_steps=space.heal_steps[0] if heal else 0, heal_batch_size=space.heal_batch_size,
                         heal_seq_len=space.heal_seq_len, heal_lr=space.heal_lr)
        return None if spec.is_identity else spec

    def apply(self, model: nn.Module, spec: PruneSpec, context: BuildContext) -> nn.Module:
        return apply(model, spec, context)

    def fit(self, space: PruneSpace, model: nn.Module) -> tuple[PruneSpace, dict[str, str]]:
        """The fitted ratios, and no 2:4 where an input width is not a multiple of 4. (Pruning has no
        one-size preset worth enqueuing: its seeds are the stage off and its reduced shapes.)"""
        space, reasons = super().fit(space, model)
        if any(weight_out_in(s.module).shape[1] % 4 for s in linear_sites(model, include_head=False)):
            space = replace(space, pattern=tuple(p for p in space.pattern if p != "2:4") or ("unstructured",))
        return space, reasons

    def shapes(self, space: PruneSpace) -> list[Params]:
        return reduced_shapes(space)

    def off(self, space: PruneSpace) -> Params:
        """Off; a seed that turns the stage on (a reduced shape) leaves healing off, so seeds train nothing."""
        return {**super().off(space), **({"heal": False} if len(space.heal) > 1 else {})}

    def rungs(self, space: PruneSpace) -> Rungs:
        return Rungs(space.heal_steps, space.promote_top)

    def training_report(self, model: nn.Module) -> DistillReport | None:
        report = self.report_of(model)
        return report.healing if report is not None else None


TECHNIQUE = register(Pruning())
suggest, estimate, report_of = TECHNIQUE.suggest, TECHNIQUE.estimate, TECHNIQUE.report_of
# The config of the model `apply` builds (sparsity changes no shape).
pruned_config = TECHNIQUE.derive_config
