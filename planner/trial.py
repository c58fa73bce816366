"""One trial of a study: sample a candidate, judge it from its spec, build it, measure it, report its objectives
and budgets to Optuna, and store every figure on the trial. Cheap checks run before expensive ones."""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field

import optuna

from evaluators.kl import ReferenceDistributions
from evaluators.latency import measure_latency
from planner import objectives as objective_registry
from planner import rungs
from planner.budgets import Budget, of_kind
from planner.candidates import build, describe, estimate_weight_bytes, shaped_model, storage_notes, suggest_stages
from planner.errors import first_line
from planner.recipes import Stage, plain_stages
from planner.settings import StudySettings
from search_spaces import BuildContext
from targets import TRANSFORMERS, Target
from targets.figures import metrics_row

# What a trial that reuses a measured twin copies from it.
TWIN_ATTRS = ("metrics", "measurements", "estimated_weight_bytes", "rejected", "skipped_perplexity")


@dataclass
class Workbench:
    """What every trial shares: the source model, its tokenizer and corpus, the build context, the baseline."""

    settings: StudySettings
    model: object
    tokenizer: object
    corpus: object
    context: BuildContext
    spaces: dict
    budgets: list[Budget]
    baseline: dict
    model_hash: str = ""  # sha256 over the source model's weight files
    reference: ReferenceDistributions | None = None  # the base model's next-token distributions (kl)
    objectives: tuple[str, ...] = field(default=objective_registry.DEFAULT)
    target: Target = TRANSFORMERS  # where candidates ship and are measured (targets/)

    def evaluators(self) -> set[str]:
        needed = objective_registry.evaluators_for(self.objectives)
        if any(b.kind in ("latency", "prefill") for b in self.budgets):
            needed.add("latency")
        return needed


def measure(bench: Workbench, model, stages: list[Stage], trial=None, label: str | None = None) -> tuple[dict, dict]:
    """(metrics row, full evaluator dicts) of a built model as the study's target serves it (targets/)."""
    return bench.target.measure(bench, model, label or describe(stages), trial)


def measure_baseline(bench: Workbench) -> tuple[dict, dict]:
    """The uncompressed model's figures. The first model timed in a fresh process decodes slowly (the
    benchmark's fidelity run found a stored baseline ~45% slow), which would loosen relative latency
    budgets: one untimed latency pass first."""
    bench.target.open(bench)
    if "latency" in bench.evaluators() and bench.target is TRANSFORMERS:
        measure_latency(bench.model, bench.settings.latency_protocol())
    return measure(bench, bench.model, [])


def constrain(trial, budgets: list[Budget], row: dict) -> bool:
    """Report each budget to Optuna as a constraint (<= 0: met); a figure that was not measured counts as
    violated. True when every budget is met."""
    feasible = True
    for budget in budgets:
        value = budget.violation(row) if budget.metric in row else 1.0
        trial.set_constraint(budget.kind, value)
        feasible = feasible and value <= 0
    return feasible


def measured_twin(study: optuna.Study, stages: list) -> optuna.trial.FrozenTrial | None:
    """A complete trial of the very same candidate (samplers do propose a point twice)."""
    for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if other.user_attrs.get("stages") == stages and "metrics" in other.user_attrs:
            return other
    return None


def over_memory_budget(budgets: list[Budget], estimate: int) -> bool:
    memory = of_kind(budgets, "memory")
    return memory is not None and estimate > memory.limit


def objective(bench: Workbench):
    def run(trial: optuna.Trial) -> tuple[float, ...]:
        try:
            return run_trial(trial)
        except Exception as exc:
            # Optuna marks the trial failed and the study goes on; the reason stays readable on the trial.
            trial.set_user_attr("failure", f"{type(exc).__name__}: {first_line(exc, 500)}")
            # Without its traceback the exception no longer holds the frames (and a half-built model).
            failure = exc.with_traceback(None)
        release_memory()
        raise failure

    def finish(trial, started: float, row: dict, seconds: dict | None = None) -> tuple[float, ...]:
        trial.set_user_attr("metrics", row)
        constrain(trial, bench.budgets, row)
        trial.set_user_attr("seconds", {**(seconds or {}), "total": time.perf_counter() - started})
        return objective_registry.values(bench.objectives, row, bench.baseline)

    def run_trial(trial: optuna.Trial) -> tuple[float, ...]:
        started = time.perf_counter()
        stages = rungs.assign(trial.study, suggest_stages(trial, bench.spaces), bench.spaces)
        stored_stages = plain_stages(stages)
        trial.set_user_attr("stages", stored_stages)
        shaped = shaped_model(bench.model, stages)
        notes = storage_notes(bench.model, stages, shaped)
        label = describe(stages, notes)
        trial.set_user_attr("label", label)
        if notes:  # e.g. the layers a requested group size does not fit, and what they use instead
            trial.set_user_attr("storage_notes", notes)
        twin = measured_twin(trial.study, stored_stages)
        if twin is not None:
            for key in TWIN_ATTRS:
                if key in twin.user_attrs:
                    trial.set_user_attr(key, twin.user_attrs[key])
            trial.set_user_attr("duplicate_of", twin.number)
            return finish(trial, started, twin.user_attrs["metrics"])
        estimate = estimate_weight_bytes(bench.model, stages, shaped)
        trial.set_user_attr("estimated_weight_bytes", estimate)
        if over_memory_budget(bench.budgets, estimate):
            trial.set_user_attr("rejected", f"weights {estimate / 1e6:.1f} MB from the spec alone; over the budget")
            return finish(trial, started, metrics_row(label, estimate))
        built = build(bench.model, stages, bench.context)
        try:
            measure_started = time.perf_counter()
            row, details = measure(bench, built.model, stages, trial, label)
            seconds = {**built.stage_seconds, "measure": time.perf_counter() - measure_started}
            if built.training:  # steps trained, resumed from a cached run, seconds: what a rung cost
                trial.set_user_attr("training", built.training)
        finally:
            del built
            gc.collect()
        figures = [row[name] for name in ("perplexity", "kl", "decode_ms_p50") if name in row]
        if not all(math.isfinite(v) for v in figures):
            raise FloatingPointError(f"non-finite metrics {row}")
        trial.set_user_attr("measurements", details)
        return finish(trial, started, row, seconds)

    return run


def release_memory() -> None:
    """Return a failed trial's memory before the next trial: Python objects, then CUDA's cached blocks."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
