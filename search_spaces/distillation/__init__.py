"""Distillation as a search space: a smaller student derived from the teacher, trained to imitate it.

The student's shape uses the same keep ratios as structured pruning (`depth_keep`, `mlp_keep`,
`heads_keep`) and starts from the teacher's own weights chosen by importance (`student`); it is
then trained on the training split with the knowledge-distillation loss (`train`). Trained
students are cached on disk under `context.cache_dir` (`cache`, `runs`), keyed by teacher, spec, data
and seed, so sampling the same student again costs a load, not a training run.

Distillation is the costliest stage, so its steps are a fidelity the planner raises rung by rung
(`DistillSpace.steps`, `base.Rungs`): every student is screened with a short run, and a promising one
continues its cached run (weights and optimizer state) to the next rung, paying only the extra steps.
Every result carries its cost: `apply` returns the student with a `DistillReport` as its
`distillation_report` attribute (see `report_of`). `apply` never modifies the teacher it is given.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from torch import nn

from search_spaces.base import BuildContext, Params, Rungs, register
from search_spaces.specs import DictSpec, SpecError
from search_spaces.distillation.runs import DistillReport, lineage_material, trained
from search_spaces.distillation.student import derive_student
from search_spaces.distillation.train import TrainSettings
from search_spaces.structure.anatomy import UnsupportedArchitecture
from search_spaces.specs import (check_bool, check_choices, check_float, check_fraction, check_int, check_member,
                                 check_positive, check_rungs)
from search_spaces.structure.shape import RATIO_FIELDS, Structure, check_ratio, ratio_labels, reduced_shapes
from search_spaces.structure.technique import StructuredTechnique

REPORT_ATTRIBUTE = "distillation_report"
INITS = ("teacher", "random")
check_alpha = check_float(0.0, 1.0)

# Spec fields searched as lists of choices in DistillSpace (the rest are fixed settings of the space; `steps`
# is the rung list: the planner decides how far a student trains, see `base.Rungs`).
SEARCHED = RATIO_FIELDS + ("init", "batch_size", "seq_len", "lr", "temperature", "alpha")


CHECKS = {
    **{name: check_ratio for name in RATIO_FIELDS},
    "init": check_member(INITS), "steps": check_int(1), "batch_size": check_int(1), "seq_len": check_int(2),
    "lr": check_positive, "temperature": check_positive, "alpha": check_alpha, "grad_clip": check_positive,
    "importance_samples": check_int(1), "importance_seq_len": check_int(2),
}


@dataclass(frozen=True)
class DistillSpec(DictSpec):
    depth_keep: float = 0.8  # student shape, as fractions of the teacher's (see pruning)
    mlp_keep: float = 1.0
    heads_keep: float = 1.0
    init: Literal["teacher", "random"] = "teacher"
    steps: int = 50
    batch_size: int = 2
    seq_len: int = 256
    lr: float = 1e-4
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha goes to next-token cross-entropy
    grad_clip: float = 1.0
    importance_samples: int = 16  # calibration windows that rank the teacher's layers, heads and neurons
    importance_seq_len: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            CHECKS[f.name](f"DistillSpec.{f.name}", getattr(self, f.name))
        if self.structure.is_identity and self.init == "teacher":
            raise SpecError("DistillSpec.depth_keep: the student would be the teacher itself "
                            "(every keep ratio is 1.0); make it smaller or use init='random'")

    @property
    def structure(self) -> Structure:
        return Structure(self.depth_keep, self.mlp_keep, self.heads_keep)

    def summary(self) -> str:
        """A short label such as 'distill(depth 0.8, 50 steps)' for tables and logs."""
        init = ", random init" if self.init == "random" else ""
        return f"distill({', '.join(ratio_labels(self.structure) + [f'{self.steps} steps'])}{init})"

    @property
    def training(self) -> TrainSettings:
        return TrainSettings(self.steps, self.batch_size, self.lr, self.temperature, self.alpha, self.grad_clip)


@dataclass(frozen=True)
class DistillSpace(DictSpec):
    enabled: tuple[bool, ...] = (False, True)
    depth_keep: tuple[float, ...] = (0.9, 0.8, 0.7)
    mlp_keep: tuple[float, ...] = (1.0, 0.75)
    heads_keep: tuple[float, ...] = (1.0,)
    init: tuple[str, ...] = ("teacher",)
    # The rungs: every student is screened with the first step count, and only those ranking in the best
    # `promote_top` fraction of their rung train on (continuing the cached run) to the next. Sized for a
    # CPU: a step of 2 x 128 tokens on the built-in model takes about 2 s on two cores; widen it on a GPU.
    steps: tuple[int, ...] = (16, 48, 144)
    promote_top: float = 0.5
    batch_size: tuple[int, ...] = (2,)
    seq_len: tuple[int, ...] = (128,)
    lr: tuple[float, ...] = (1e-4,)
    temperature: tuple[float, ...] = (2.0,)
    alpha: tuple[float, ...] = (0.5,)
    grad_clip: float = 1.0
    importance_samples: int = 16
    importance_seq_len: int = 256

    def __post_init__(self) -> None:
        check_choices("DistillSpace.enabled", self.enabled, check_bool)
        check_rungs("DistillSpace.steps", self.steps)
        check_fraction("DistillSpace.promote_top", self.promote_top)
        for f in fields(self):
            if f.name in SEARCHED:
                check_choices(f"DistillSpace.{f.name}", getattr(self, f.name), CHECKS[f.name])
            elif f.name not in ("enabled", "steps", "promote_top"):
                CHECKS[f.name](f"DistillSpace.{f.name}", getattr(self, f.name))


def key_material(teacher: nn.Module, spec: DistillSpec, context: BuildContext) -> dict[str, Any]:
    """What a trained student depends on besides its length (see `runs.lineage_material`)."""
    return lineage_material("student", teacher, spec, "steps", context)


def distill(teacher: nn.Module, spec: DistillSpec, context: BuildContext) -> tuple[nn.Module, DistillReport]:
    """The trained student for `spec` and its report: from the cache when there, else continued from a shorter
    cached run of it, else derived from the teacher and trained; stored for the next caller."""
    def start():
        try:
            student, kept = derive_student(teacher, spec.structure, spec.init, context, spec.importance_samples,
                                           spec.importance_seq_len)
        except UnsupportedArchitecture as exc:
            raise exc.spec_error("DistillSpec") from None
        return student, kept.to_dict() if kept else None

    return trained(teacher, key_material(teacher, spec, context), spec.training, spec.seq_len, context, start)


def apply(teacher: nn.Module, spec: DistillSpec, context: BuildContext) -> nn.Module:
    """The trained student (a new model; the teacher is untouched) with its report as `distillation_report`."""
    student, report = distill(teacher, spec, context)
    setattr(student, REPORT_ATTRIBUTE, report)
    return student


class Distillation(StructuredTechnique):
    name, order, spec_type, space_type = "distillation", 10, DistillSpec, DistillSpace
    report_attribute = REPORT_ATTRIBUTE

    fidelity_field = "steps"

    def suggest_when_on(self, trial, space: DistillSpace) -> DistillSpec | None:
        """A distillation spec from `space` at the first rung, or None when the sampled student is the teacher."""
        values = {name: self.choose(trial, name, getattr(space, name)) for name in SEARCHED}
        if Structure(**{n: values[n] for n in RATIO_FIELDS}).is_identity and values["init"] == "teacher":
            return None
        return DistillSpec(**values, steps=space.steps[0], grad_clip=space.grad_clip,
                           importance_samples=space.importance_samples, importance_seq_len=space.importance_seq_len)

    def apply(self, teacher: nn.Module, spec: DistillSpec, context: BuildContext) -> nn.Module:
        return apply(teacher, spec, context)

    def keeps_weights(self, spec: DistillSpec) -> bool:
        return True  # the student is a new model (derive_student copies the teacher); the teacher only runs

    def shapes(self, space: DistillSpace) -> list[Params]:
        """The student shapes as warm starts, each with the storage stages' shape presets (screened at the first
        rung: a seed costs one short training run)."""
        return reduced_shapes(space)

    def rungs(self, space: DistillSpace) -> Rungs:
        return Rungs(space.steps, space.promote_top)

    def training_report(self, model: nn.Module) -> DistillReport | None:
        return self.report_of(model)


# No student is a hand-picked preset on its own: students enter the seeds through `shapes` (reduced shapes).
TECHNIQUE = register(Distillation())
suggest, estimate, report_of = TECHNIQUE.suggest, TECHNIQUE.estimate, TECHNIQUE.report_of
student_config = TECHNIQUE.derive_config  # the student's config, without building it
