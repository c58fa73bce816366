"""Multi-fidelity for the stages that train (distillation, healing): how many steps a trial's run gets.

A run's *lineage* is its stage with the step count left out, plus the stages before it. A new lineage is
screened at its first rung. Once measured, a lineage keeps the highest rung it reached (its cached run is
loaded, not retrained) and moves up one rung when its best feasible score there (the first objective)
ranks in the best `promote_top` fraction of the lineages measured at that rung, with at least one other
lineage beaten (successive halving, asynchronously across trials as ASHA does). A promotion trains only
the extra steps: the runs layer continues the cached shorter run (`search_spaces.distillation.runs`).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import optuna

from planner.objectives import minimised
from planner.outcome import feasible, measured, study_objectives
from planner.recipes import Stage, plain_stages
from search_spaces import TECHNIQUES


def lineage(stages: list[dict], index: int) -> str | None:
    """The lineage of stage `index` of a trial's stored stages, or None when that stage trains nothing."""
    stage = stages[index]
    technique = TECHNIQUES.get(stage["technique"])
    field = technique.fidelity_field if technique else None
    if not field or not stage["spec"].get(field):
        return None
    own = {k: v for k, v in stage["spec"].items() if k != field}
    return json.dumps([stages[:index], stage["technique"], own], sort_keys=True)


def _measured_runs(study: optuna.Study) -> dict[str, dict[int, float | None]]:
    """lineage -> {steps reached: best feasible first-objective value there (None: none feasible)}."""
    runs: dict[str, dict[int, float | None]] = {}
    objectives = study_objectives(study)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if not measured(trial):
            continue
        stages = trial.user_attrs.get("stages", [])
        for index, stage in enumerate(stages):
            key = lineage(stages, index)
            if key is None:
                continue
            steps = stage["spec"][TECHNIQUES[stage["technique"]].fidelity_field]
            score = minimised(objectives, trial.values)[0] if feasible(trial) else None
            best = runs.setdefault(key, {}).get(steps)
            runs[key][steps] = score if best is None else (best if score is None else min(best, score))
    return runs


def promoted(scores: dict[str, float | None], key: str, promote_top: float) -> bool:
    """Whether lineage `key` ranks in the best `promote_top` fraction of the feasible lineages at a rung."""
    ranked = sorted(s for s in scores.values() if s is not None)
    own = scores.get(key)
    if own is None:
        return False
    return ranked.index(own) < math.floor(len(ranked) * promote_top)


def assign(study: optuna.Study, stages: list[Stage], spaces: dict) -> list[Stage]:
    """The trial's stages with each training stage's step count set by its lineage's rung (see the module doc)."""
    runs = None
    stages, plain = list(stages), plain_stages(stages)
    for index, stage in enumerate(stages):
        technique = TECHNIQUES.get(stage.technique)
        rungs = technique.rungs(spaces[stage.technique]) if technique and stage.technique in spaces else None
        if rungs is None or (key := lineage(plain, index)) is None:
            continue
        runs = _measured_runs(study) if runs is None else runs
        reached = [s for s in runs.get(key, {}) if s in rungs.steps]
        steps = max(reached, default=rungs.steps[0])
        position = rungs.steps.index(steps)
        if reached and position + 1 < len(rungs.steps):
            at_rung = {k: v[steps] for k, v in runs.items() if steps in v}
            if promoted(at_rung, key, rungs.promote_top):
                steps = rungs.steps[position + 1]
        stages[index] = Stage(stage.technique, replace(stage.spec, **{technique.fidelity_field: steps}))
        plain[index] = plain_stages([stages[index]])[0]  # the next stages' lineages hold this one's steps
    return stages


def rung_counts(study: optuna.Study) -> dict[str, dict[int, int]]:
    """technique -> {steps: lineages measured there}: how many runs reached each rung (for reports, benches)."""
    counts: dict[str, dict[int, int]] = {}
    for key, reached in _measured_runs(study).items():
        technique = json.loads(key)[1]
        for steps in reached:
            counts.setdefault(technique, {}).setdefault(steps, 0)
            counts[technique][steps] += 1
    return {t: dict(sorted(c.items())) for t, c in counts.items()}
