"""A training run against a teacher, cached and continued: what distillation and healing share.

`trained` returns the model after `settings.steps` steps of knowledge distillation from `teacher`,
starting from the model `start()` makes. With a cache directory it is, in order of cost: the cached
entry for exactly those steps (a load); the longest shorter run of the same lineage continued from its
weights and optimizer state (only the missing steps are trained: a multi-fidelity rung); or a new run
from `start()`. Continuing gives the weights a run of the full length gives (the schedule and the
training windows do not depend on the run's length; see `train` and `calibration.training_windows`).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from torch import nn

from evaluators.runtime import model_device, model_dtype
from search_spaces.calibration import training_windows
from search_spaces.distillation.cache import StudentCache, data_identity, key_of, student_key, weights_identity
from search_spaces.distillation.teacher import TeacherStates
from search_spaces.distillation.train import TrainSettings, train_student


@dataclass(frozen=True)
class DistillReport:
    cache_key: str | None  # lineage/steps; None when no cache_dir was given
    cache_hit: bool  # True: loaded from the cache, nothing trained by this call
    steps: int  # steps the model has been trained in all
    resumed_from: int  # steps of the cached run this call continued (0: trained from the start)
    trained_steps: int  # steps this call trained (0 on a hit)
    seconds_per_step: float  # of the training that produced the model (also on a cache hit)
    train_seconds: float  # this call's training
    first_loss: float
    final_loss: float
    seconds: float  # wall time of this call: derive + train + store, or just the load on a hit
    structure: dict | None  # what was kept (structure.surgery.StructureReport.to_dict), None when nothing was cut
    # training windows whose teacher states this call read from the study's cache (teacher.TeacherStates): its
    # steps ran only the teacher's head for them, so its seconds per step are lower than a first run's
    teacher_windows_read: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


Start = Callable[[], tuple[nn.Module, dict | None]]  # the untrained model and what it kept


def lineage_material(kind: str, teacher: nn.Module, spec, steps_field: str, context, **more) -> dict[str, Any]:
    """What a run depends on besides its length: the teacher, the spec without its step count, the training
    split and the seed (and `more`). Runs that differ only in steps share it, so a longer one continues the
    cached shorter one."""
    return {
        "kind": kind,
        "teacher": context.model_id or f"weights:{weights_identity(teacher)}",
        "teacher_dtype": str(model_dtype(teacher)),
        "spec": {k: v for k, v in spec.to_dict().items() if k != steps_field},
        "data": data_identity(context.calibration),
        "seed": context.seed,
        **more,
    }


def trained(teacher: nn.Module, material: dict[str, Any], settings: TrainSettings, seq_len: int, context,
            start: Start) -> tuple[nn.Module, DistillReport]:
    """The model `start()` makes, distilled from `teacher` for `settings.steps` steps (see the module doc).
    `material` is what the run depends on besides its length (its lineage's key material)."""
    started = time.perf_counter()
    cache = StudentCache(context.cache_dir) if context.cache_dir is not None else None
    lineage = student_key(material) if cache else None
    steps, where = settings.steps, (type(teacher), model_dtype(teacher), model_device(teacher))
    if cache:
        hit = cache.load(lineage, steps, *where)
        if hit is not None:
            model, stored = hit
            return model, replace(DistillReport(**stored), cache_key=key_of(lineage, steps), cache_hit=True,
                                  resumed_from=0, trained_steps=0, train_seconds=0.0,
                                  seconds=time.perf_counter() - started)
    model, structure, base, optimizer = _continuable(cache, lineage, steps, where)
    if model is None:
        model, structure = start()
    windows = training_windows(context.tokenizer, context.calibration, base * settings.batch_size,
                               (steps - base) * settings.batch_size, seq_len, context.seed)
    states = TeacherStates.of_run(context.cache_dir, material, settings.batch_size, seq_len)
    stats, optimizer = train_student(model, teacher, windows, settings, context.seed, context.progress, base,
                                     optimizer, states)
    report = DistillReport(cache_key=key_of(lineage, steps) if cache else None, cache_hit=False, steps=steps,
                           resumed_from=base, trained_steps=stats.steps, seconds_per_step=stats.seconds_per_step,
                           train_seconds=stats.seconds, first_loss=stats.first_loss, final_loss=stats.final_loss,
                           seconds=0.0, structure=structure, teacher_windows_read=states.read if states else 0)
    if cache:
        try:
            cache.store(lineage, steps, model, material, report.to_dict(), optimizer)
        except OSError as exc:  # a full or read-only disk costs a later retrain, not this trial
            warnings.warn(f"could not cache the trained model in {context.cache_dir}: {exc}", RuntimeWarning,
                          stacklevel=2)
    return model, replace(report, seconds=time.perf_counter() - started)


def _continuable(cache: StudentCache | None, lineage: str | None, steps: int, where: tuple):
    """(model, structure, its steps, optimizer state) of the longest cached shorter run, or (None, None, 0, None)."""
    base = cache.resumable(lineage, steps) if cache else None
    if base is None:
        return None, None, 0, None
    optimizer = cache.optimizer_state(lineage, base)
    loaded = cache.load(lineage, base, *where) if optimizer is not None else None
    if loaded is None:
        return None, None, 0, None
    model, stored = loaded
    return model, stored.get("structure"), base, optimizer
