"""What a study decided, from its stored trials alone: the Pareto front of the measured candidates that meet
the budget, the recommended one (best first objective: the accuracy), the closest candidates when none meets
the budget, the best trial per objective, and which trial `export` writes by default."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import optuna

from planner.budgets import MEETS, RATIOS, Budget, timed_ratio
from planner.errors import PlannerError
from planner.objectives import DEFAULT, OBJECTIVES, minimised
from planner.workers import NOT_STARTED

COMPLETE = optuna.trial.TrialState.COMPLETE
CLOSEST_SHOWN = 3


@dataclass
class Compared:
    """A stock setting the study compared against (its `compare`), measured as every candidate, and which of the
    study's measured candidates dominate it."""

    name: str
    label: str
    row: dict  # its metrics ({} when it could not be made)
    failure: str | None
    meets_budget: bool
    # trial numbers (budget-meeting first): no worse in every objective beyond its interval (a timed ratio's
    # whole interval at or under the setting's), better beyond it in one
    dominated_by: list[int]
    # trial numbers: as dominated_by, but with a timed objective level within the intervals (they overlap)
    level_with: list[int] = field(default_factory=list)


@dataclass
class Outcome:
    study: optuna.Study
    budgets: list[Budget]
    baseline: dict
    front: list[optuna.trial.FrozenTrial]
    recommended: optuna.trial.FrozenTrial | None
    closest: list[optuna.trial.FrozenTrial]
    objectives: tuple[str, ...] = DEFAULT
    compared: list[Compared] = field(default_factory=list)
    doubtful: set[int] = field(default_factory=set)  # trials not clearly within their latency budgets


def measured(trial: optuna.trial.FrozenTrial) -> bool:
    """A complete trial whose candidate was built and measured in full (not rejected, not skipped)."""
    return trial.state == COMPLETE and "perplexity" in trial.user_attrs.get("metrics", {})


CONFIRMATIONS = "confirmations"  # study attribute: trial number -> its re-timing (planner.confirm)


def confirmation(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict | None:
    """The trial's re-timing by the confirmation stage (planner.confirm), if it had one."""
    return study.user_attrs.get(CONFIRMATIONS, {}).get(str(trial.number))


def doubtful(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Not clearly within its latency budgets: re-timed and not clearly meeting them, or (never re-timed) its
    interval straddles one (planner.budgets.Budget.verdict). A re-timing that clearly meets them clears it."""
    confirmed = confirmation(study, trial)
    if confirmed and not confirmed.get("failure"):
        return any(v != MEETS for v in confirmed["verdicts"].values())
    return bool(trial.user_attrs.get("undecided"))


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is no worse than b in every objective (as minimised quantities) and better in at least one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(trials: list, values=lambda t: t.values) -> list:
    """The members of `trials` that no other member dominates, in the given order."""
    return [t for t in trials if not any(dominates(values(o), values(t)) for o in trials)]


def total_excess(trial: optuna.trial.FrozenTrial) -> float:
    """How far over its budgets a trial is, summed over the budgets (0 when it meets them all)."""
    return sum(max(v, 0.0) for v in trial.constraints.values())


def study_objectives(study: optuna.Study) -> tuple[str, ...]:
    return tuple(study.metric_names or DEFAULT)


def decide(study: optuna.Study, budgets: list[Budget], baseline: dict) -> Outcome:
    trials = study.get_trials(deepcopy=False)
    objectives = study_objectives(study)
    good = [t for t in trials if measured(t) and feasible(t) and "duplicate_of" not in t.user_attrs]  # twins once
    score = lambda t: minimised(objectives, t.values)  # noqa: E731
    # A candidate whose latency interval straddles its budget is never recommended over one that clearly
    # meets it: the front is that of the clear candidates, with the undecided ones that would sit on it beside.
    unclear = {t.number for t in good if doubtful(study, t)}
    front_clear = pareto_front([t for t in good if t.number not in unclear], score)
    front = sorted(front_clear + [t for t in pareto_front(good, score) if t.number in unclear],
                   key=lambda t: (score(t)[0], t.number))
    ranked = sorted(front_clear, key=lambda t: (score(t)[0], t.number)) or front
    recommended = ranked[0] if ranked else None
    closest = []
    if recommended is None:
        # From every trial with figures, measured in full or not (a latency miss skips perplexity); a twin is
        # the same candidate as an earlier trial, shown once here too.
        sized = [t for t in trials if t.state == COMPLETE and "metrics" in t.user_attrs
                 and "duplicate_of" not in t.user_attrs]
        closest = sorted(sized, key=lambda t: (total_excess(t), t.number))[:CLOSEST_SHOWN]
    return Outcome(study, budgets, baseline, front, recommended, closest, objectives,
                   compare_stock(study, budgets, baseline, objectives), unclear)


def comparable(objectives: tuple[str, ...], row: dict, baseline: dict) -> tuple[float, ...]:
    """A row's objective values as minimised quantities for comparing rows measured at different times: a
    latency is taken from its same-run ratio to the reference times the baseline's figure where the row has
    one (the ms of two runs on a shared machine differ by more than the candidates do)."""
    return tuple(point for _, point, _ in comparable_bounds(objectives, row, baseline))


def comparable_bounds(objectives: tuple[str, ...], row: dict, baseline: dict) -> list[tuple[float, float, float]]:
    """(low, value, high) per objective as minimised quantities (`comparable`): a timed ratio's confidence
    interval times the baseline's figure, a point (low = value = high) for every figure measured exactly."""
    bounds = []
    for name in objectives:
        objective = OBJECTIVES[name]
        ratio = RATIOS.get(objective.budget or "")
        timed = timed_ratio(row, ratio) if ratio and name in baseline else None
        if timed is not None:
            bounds.append(tuple(objective.minimised(v * baseline[name]) for v in timed))
        else:
            value = objective.minimised(row[name] if name in row else objective.unmeasured(baseline))
            bounds.append((value, value, value))
    return [(min(low, high), value, max(low, high)) for value, low, high in bounds]


def beyond_intervals(a: list[tuple[float, float, float]], b: list[tuple[float, float, float]]) -> str | None:
    """How `a` stands to `b` (comparable_bounds): "dominates" (no worse in every objective beyond the intervals,
    a's high at or under b's low, and better beyond them in one), "level" (the same, except that in some timed
    objective the intervals overlap: level within the noise there), else None."""
    better = any(ah < bl for (_, _, ah), (bl, _, _) in zip(a, b))
    clear = [ah <= bl for (_, _, ah), (bl, _, _) in zip(a, b)]
    overlap = [al <= bh for (al, _, _), (_, _, bh) in zip(a, b)]
    if not better or not all(c or o for c, o in zip(clear, overlap)):
        return None
    return "dominates" if all(clear) else "level"


def compare_stock(study: optuna.Study, budgets: list[Budget], baseline: dict,
                  objectives: tuple[str, ...]) -> list[Compared]:
    """Each stock setting the study measured (`compare`) against its measured candidates (twins once)."""
    candidates = [t for t in study.get_trials(deepcopy=False) if measured(t) and "duplicate_of" not in t.user_attrs]
    candidates.sort(key=lambda t: (not feasible(t), t.number))
    out = []
    for name, entry in study.user_attrs.get("stock", {}).items():
        row = entry.get("metrics") or {}
        if not row:
            out.append(Compared(name, entry.get("label", name), {}, entry.get("failure", "not measured"), False, []))
            continue
        own = comparable_bounds(objectives, row, baseline)
        stand = {t.number: beyond_intervals(comparable_bounds(objectives, t.user_attrs["metrics"], baseline), own)
                 for t in candidates}
        out.append(Compared(name, entry.get("label", name), row, None, all(b.violation(row) <= 0 for b in budgets),
                            [n for n, s in stand.items() if s == "dominates"],
                            [n for n, s in stand.items() if s == "level"]))
    return out


def stored_outcome(study: optuna.Study) -> Outcome:
    """The outcome of a stored study, with the budgets it resolved against its baseline."""
    budgets = [Budget(**b) for b in study.user_attrs.get("budgets", [])]
    return decide(study, budgets, study.user_attrs.get("baseline", {}))


def best_trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """For each objective, the measured trial best in it (feasible or not: the user sees both)."""
    trials = [t for t in study.get_trials(deepcopy=False) if measured(t)]
    if not trials:
        return {}
    objectives = study_objectives(study)
    return {name: min(trials, key=lambda t, i=i: (minimised(objectives, t.values)[i], t.number))
            for i, name in enumerate(objectives)}


def trial_to_export(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The trial whose recipe `export` writes: the recommended one by default, else a measured trial by number."""
    if number is None:
        trial = stored_outcome(study).recommended
        if trial is None:
            raise PlannerError(f"study '{study.study_name}' has no candidate that meets its budget; pass --trial N")
        return trial
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise PlannerError(f"trial {number} is out of range (study '{study.study_name}' has trials "
                           f"0-{len(trials) - 1})")
    trial = trials[number]
    if not measured(trial):
        rejected = trial.user_attrs.get("rejected") or trial.user_attrs.get(NOT_STARTED)
        raise PlannerError(f"trial {number} has no measured candidate ({trial.state.name.lower()}"
                           f"{': ' + rejected if rejected else ''})")
    return trial
