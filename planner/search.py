"""The budget-driven multi-objective study: objectives (perplexity, decode ms, weight MB; all minimised),
budgets as Optuna constraints, cheap checks before expensive ones, and everything stored on the trials.
"""
from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass

import optuna

from evaluators.latency import measure_latency
from evaluators.memory import weight_bytes
from evaluators.perplexity import measure_perplexity
from planner.budgets import Budget, of_kind
from planner.candidates import build, describe, estimate_weight_bytes, suggest_stages
from planner.errors import PlannerError
from planner.recipes import Stage
from planner.samplers import make_sampler
from planner.settings import SearchSettings
from planner.storage import default_storage_url, open_storage
from search_spaces import TECHNIQUES, BuildContext, SpecError

OBJECTIVES = ("perplexity", "decode_ms_p50", "weight_mb")
# A candidate this far over a latency budget is not worth its perplexity run.
LATENCY_SKIP_FACTOR = 1.5
# Objective value standing in for a perplexity that was not measured (rejected or skipped candidates):
# this many times the baseline's, so the sampler learns the region is bad without a fake measurement.
UNMEASURED_PERPLEXITY_FACTOR = 100.0


@dataclass
class Workbench:
    """What every trial shares: the source model, its tokenizer and corpus, the build context, the baseline."""

    settings: SearchSettings
    model: object
    tokenizer: object
    corpus: object
    context: BuildContext
    spaces: dict
    budgets: list[Budget]
    baseline: dict
    model_hash: str = ""  # sha256 over the source model's weight files


def metrics_row(stages: list[Stage], weight: int, latency=None, perplexity=None) -> dict:
    row = {"weight_bytes": weight, "weight_mb": weight / 1e6, "stages": describe(stages)}
    if latency is not None:
        row.update(decode_ms_p50=latency.decode.p50_ms, prefill_ms_p50=latency.prefill.p50_ms)
    if perplexity is not None:
        row.update(perplexity=perplexity.perplexity, bits_per_byte=perplexity.bits_per_byte)
    return row


def measure(bench: Workbench, model, stages: list[Stage], trial=None) -> tuple[dict, dict]:
    """(metrics row, full evaluator dicts) for a built model: memory, latency, then perplexity unless hopeless."""
    weight = weight_bytes(model)
    latency = measure_latency(model, bench.settings.latency_protocol())
    details = {"memory": weight.to_dict(), "latency": latency.to_dict()}
    row = metrics_row(stages, weight.total_bytes, latency)
    hopeless = [b for b in bench.budgets if b.kind in ("latency", "prefill") and b.limit
                and row[b.metric] > LATENCY_SKIP_FACTOR * b.limit]
    if hopeless and trial is not None:
        trial.set_user_attr("skipped_perplexity", f"{hopeless[0].kind} {row[hopeless[0].metric]:.2f} ms is over "
                                                  f"{LATENCY_SKIP_FACTOR}x the budget")
        return row, details
    perplexity = measure_perplexity(model, bench.tokenizer, bench.corpus.eval, bench.settings.perplexity_protocol())
    details["perplexity"] = perplexity.to_dict()
    row.update(perplexity=perplexity.perplexity, bits_per_byte=perplexity.bits_per_byte)
    return row, details


def measure_baseline(bench: Workbench) -> tuple[dict, dict]:
    """The uncompressed model's figures. The first model timed in a fresh process decodes slowly (the
    benchmark's fidelity run found a stored baseline ~45% slow), which would loosen relative latency
    budgets: one untimed latency pass first."""
    measure_latency(bench.model, bench.settings.latency_protocol())
    return measure(bench, bench.model, [])


def _values(bench: Workbench, row: dict) -> tuple[float, float, float]:
    unmeasured = UNMEASURED_PERPLEXITY_FACTOR * bench.baseline["perplexity"]
    return (row.get("perplexity", unmeasured), row.get("decode_ms_p50", bench.baseline["decode_ms_p50"]),
            row["weight_mb"])


def _constrain(trial, bench: Workbench, row: dict) -> bool:
    feasible = True
    for budget in bench.budgets:
        value = budget.violation(row) if budget.metric in row else 1.0  # unmeasured: counts as violated
        trial.set_constraint(budget.kind, value)
        feasible = feasible and value <= 0
    return feasible


def objective(bench: Workbench):
    def run(trial: optuna.Trial) -> tuple[float, float, float]:
        try:
            return run_trial(trial)
        except Exception as exc:
            # Optuna marks the trial failed and the study goes on; the reason stays readable on the trial.
            detail = (str(exc).strip().splitlines() or [""])[0][:500]
            trial.set_user_attr("failure", f"{type(exc).__name__}: {detail}")
            # Without its traceback the exception no longer holds the frames (and a half-built model).
            failure = exc.with_traceback(None)
        release_memory()
        raise failure

    def run_trial(trial: optuna.Trial) -> tuple[float, float, float]:
        started = time.perf_counter()
        stages = suggest_stages(trial, bench.spaces)
        stored_stages = json.loads(json.dumps([{"technique": s.technique, "spec": s.spec.to_dict()} for s in stages]))
        trial.set_user_attr("stages", stored_stages)
        trial.set_user_attr("label", describe(stages))
        twin = _measured_twin(trial.study, stored_stages)
        if twin is not None:
            # Samplers do propose a point twice; its figures are already in the study.
            for key in ("metrics", "measurements", "estimated_weight_bytes", "rejected", "skipped_perplexity"):
                if key in twin.user_attrs:
                    trial.set_user_attr(key, twin.user_attrs[key])
            trial.set_user_attr("duplicate_of", twin.number)
            _constrain(trial, bench, twin.user_attrs["metrics"])
            trial.set_user_attr("seconds", {"total": time.perf_counter() - started})
            return _values(bench, twin.user_attrs["metrics"])
        estimate = estimate_weight_bytes(bench.model, stages)
        trial.set_user_attr("estimated_weight_bytes", estimate)
        memory = of_kind(bench.budgets, "memory")
        if memory is not None and estimate > memory.limit:
            row = metrics_row(stages, estimate)
            trial.set_user_attr("rejected", f"weights {estimate / 1e6:.1f} MB from the spec alone; over the budget")
            trial.set_user_attr("metrics", row)
            _constrain(trial, bench, row)
            trial.set_user_attr("seconds", {"total": time.perf_counter() - started})
            return _values(bench, row)
        built = build(bench.model, stages, bench.context)
        try:
            measure_started = time.perf_counter()
            row, details = measure(bench, built.model, stages, trial)
            seconds = {**built.stage_seconds, "measure": time.perf_counter() - measure_started}
        finally:
            del built
            gc.collect()
        if not all(math.isfinite(v) for v in (row.get("perplexity", 0.0), row.get("decode_ms_p50", 0.0))):
            raise FloatingPointError(f"non-finite metrics {row}")
        trial.set_user_attr("metrics", row)
        trial.set_user_attr("measurements", details)
        _constrain(trial, bench, row)
        trial.set_user_attr("seconds", {**seconds, "total": time.perf_counter() - started})
        return _values(bench, row)

    return run


def release_memory() -> None:
    """Return a failed trial's memory before the next trial: Python objects, then CUDA's cached blocks."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _measured_twin(study: optuna.Study, stages: list) -> optuna.trial.FrozenTrial | None:
    for other in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if other.user_attrs.get("stages") == stages and "metrics" in other.user_attrs:
            return other
    return None


def create_or_load(settings: SearchSettings) -> optuna.Study:
    sampler = make_sampler(settings.sampler, settings.seed, settings.trials)  # a bad name fails before any store
    storage = open_storage(settings.storage or default_storage_url(settings.study))
    study = optuna.create_study(storage=storage, study_name=settings.study, sampler=sampler,
                                directions=["minimize"] * len(OBJECTIVES), load_if_exists=True)
    if study.metric_names is None:
        study.set_metric_names(list(OBJECTIVES))
    return study


def resolve_spaces(settings: SearchSettings, model) -> dict:
    """Each technique's space: defaults narrowed by the study file, fitted to the model; None when off."""
    spaces = {}
    for name, technique in TECHNIQUES.items():
        given = settings.space.get(name, {})
        if given is False:
            spaces[name] = None
            continue
        if given is True:
            given = {}
        try:
            space = technique.space_type.from_dict(given, f"space.{name}")
        except SpecError as exc:
            raise PlannerError(str(exc)) from None
        spaces[name] = technique.fit_space(space, model)
    unknown = sorted(set(settings.space) - set(TECHNIQUES))
    if unknown:
        raise PlannerError(f"space.{unknown[0]}: unknown technique (known: {', '.join(sorted(TECHNIQUES))})")
    return spaces


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
