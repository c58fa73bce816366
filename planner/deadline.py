"""A deadline (`search --timeout`, a study's own from `planner create --timeout`) as an end, not only the last
moment a trial may start: a candidate the study's own finished trials predict to take longer than the time left
is not started. It is noted `not_started` (not counted, as a spec over the memory budget is; never the twin a
later draw copies) and the sampler draws again, so cheap candidates (a repeat on a cached student, a cut screened
in float) still use the last minutes.

The prediction, from the trials of the same *kind* (each stage's technique and method, in order):
- training: each training stage's steps still to train (its rung less the longest run its lineage already
  reached, which is continued) x the median seconds per step the study's runs of that technique trained at;
- the rest (building without the training, measuring): on the same stages before the last (a student or cut
  already built: cached), the latest such trial's; else the median over the first trial of each of those
  (each computed its shape's tables, trained, measured) that was not screened. A kind not seen yet, or seen only
  screened, takes the
  rest from the trials whose last stage is its last stage's (the quantizing and measuring it will need).
  A repeat (the same stages before the last) takes none of the seconds that trial spent on its model's
  llama-quant tables (`tables_seconds`: the repeat reads them from the cache) or on its screen (the float figure
  of the same model is on that trial: planner.trial.UPSTREAM_FIGURES).
  A derived candidate (stages before the last) takes none of the seconds a trial of the source model spent on
  what derived candidates carry (its `carriable_seconds`, targets.base: llama-quant's costly tables on a model of
  at least 400 M parameters; a smaller cut of a model just above that computes them and is predicted short).
No such trial, or no training measured yet (one technique's pace stands in for another's): no prediction, the
candidate runs (the first of a kind is how the study learns its cost)."""
from __future__ import annotations

import json
import statistics

import optuna

from planner import rungs, workers
from search_spaces import TECHNIQUES
from targets.base import CARRIABLE_SECONDS, TABLES_SECONDS


def kind(stages: list[dict]) -> tuple:
    """What a candidate's minutes depend on besides its shapes and steps: each stage's technique and method."""
    return tuple((stage["technique"], stage["spec"].get("method")) for stage in stages)


def _timed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials that built something: their seconds are a candidate's (no twin or spec rejection)."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("stages") and "seconds" in t.user_attrs
            and not {"duplicate_of", "rejected", workers.NOT_STARTED} & t.user_attrs.keys()]


def _trained_seconds(trial: optuna.trial.FrozenTrial) -> float:
    return sum(report.get("train_seconds", 0.0) for report in (trial.user_attrs.get("training") or {}).values())


def _training_stages(stages: list[dict]) -> list[tuple[str, int]]:
    """(lineage, steps) of each stage of `stages` that trains."""
    out = []
    for index, stage in enumerate(stages):
        key = rungs.lineage(stages, index)
        if key is not None:
            out.append((key, stage["spec"][TECHNIQUES[stage["technique"]].fidelity_field]))
    return out


def _training_seconds(timed: list, stages: list[dict]) -> float | None:
    """Seconds the training stages of `stages` still have to train, None where a technique's pace is unknown."""
    paces: dict[str, list[float]] = {}
    for trial in timed:
        for technique, report in (trial.user_attrs.get("training") or {}).items():
            if report.get("trained_steps"):
                paces.setdefault(technique, []).append(report["seconds_per_step"])
    reached: dict[str, set[int]] = {}  # lineage -> the step counts its cached runs reached
    for trial in timed:
        for key, steps in _training_stages(trial.user_attrs["stages"]):
            reached.setdefault(key, set()).add(steps)
    seconds = 0.0
    for key, steps in _training_stages(stages):
        left = steps - max((s for s in reached.get(key, ()) if s <= steps), default=0)
        if left > 0:
            technique = json.loads(key)[1]
            # healing and distillation train through the same runs layer against the same teacher: one's pace
            # stands in for the other's until it has its own
            pace = paces.get(technique) or [p for measured in paces.values() for p in measured]
            if not pace:
                return None
            seconds += left * statistics.median(pace)
    return seconds


def _unscreened_firsts(trials: list) -> list:
    """The first trial on each upstream (it computed that model's tables), where it was not screened."""
    firsts = {}
    for trial in trials:  # trial-number order
        firsts.setdefault(str(trial.user_attrs["stages"][:-1]), trial)
    return [t for t in firsts.values() if "screened" not in t.user_attrs]


def predicted_seconds(study: optuna.Study, stages: list[dict]) -> tuple[float, str] | None:
    """(seconds, what they are predicted from) for the candidate of stored `stages`, None when unknown."""
    timed = _timed(study)
    same_kind = [t for t in timed if kind(t.user_attrs["stages"]) == kind(stages)]
    same_last = [t for t in timed if kind(t.user_attrs["stages"])[-1:] == kind(stages)[-1:]]
    ending = "of its kind"
    if not same_kind:  # a new kind: its training at the measured pace, then what its last stage costs elsewhere
        same_kind, ending = same_last, "ending in its last stage"
    training = _training_seconds(timed, stages)
    if not same_kind or training is None:
        return None
    upstream = stages[:-1]
    repeats = [t for t in same_kind if t.user_attrs["stages"][:-1] == upstream]
    if repeats:
        pool, source = repeats[-1:], f"trial {repeats[-1].number}, on the same stages before the last"
    else:
        pool = _unscreened_firsts(same_kind)
        if not pool and ending == "of its kind":  # a kind seen only screened: as a new kind (its last stage's cost)
            ending = "ending in its last stage"
            pool = _unscreened_firsts(same_last)
        if not pool:
            return None
        source = f"trial{'s' if len(pool) > 1 else ''} {', '.join(str(t.number) for t in pool)} {ending}"
    # A repeat reads the tables its model's earlier trial computed (cached); a derived candidate of a new model
    # computes its own but not what it carries from the source model's: neither is predicted to spend those.
    left_out = TABLES_SECONDS if repeats else CARRIABLE_SECONDS if upstream else None
    rest = statistics.median(t.user_attrs["seconds"]["total"] - _trained_seconds(t)
                             - ((workers.measured(t, "runtime", left_out) or 0.0) if left_out else 0.0)
                             - (t.user_attrs["seconds"].get("screen", 0.0) if repeats else 0.0)
                             for t in pool)
    return training + rest, source


def too_late(study: optuna.Study, stages: list[dict], left: float) -> str | None:
    """Why the candidate is not started with `left` seconds before the deadline (None: it is started)."""
    predicted = predicted_seconds(study, stages)
    if predicted is None or predicted[0] <= left:
        return None
    return (f"predicted {predicted[0] / 60:.1f} min (from {predicted[1]}), {max(left, 0) / 60:.1f} min left "
            "before the deadline: not started")
