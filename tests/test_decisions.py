"""The planner's decision logic, pinned by tables: which trials make the front, which one is recommended, the
closest ones when none meets the budget, the best per objective, what `export` writes, the reuse of a measured
twin, the latency skip, budgets as constraints, spec-only rejection, objective values and their stand-ins,
budgets and objectives as parsed.

Studies are built from hand-made trials (in memory, no model). `planner.trial.objective` runs for real on an
in-memory study with the build and the evaluators replaced by look-ups in a small table (as bench/_grid.py's
Replay does), so a test sees exactly what was built and measured. Fast: no model, no corpus, no storage file.
These tests are also the test command of the mutation run (`[tool.mutmut]` in pyproject.toml).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import optuna
import pytest

from planner.budgets import Budget, of_kind, parse_budget
from planner.errors import PlannerError
from planner.objectives import (ACCURACY, DEFAULT, METRICS, OBJECTIVES, UNMEASURED_KL,
                                UNMEASURED_PERPLEXITY_FACTOR, evaluators_for, metric, parse_objectives, values)
from planner.outcome import (CLOSEST_SHOWN, best_trials, decide, dominates, feasible, measured, pareto_front,
                             stored_outcome, study_objectives, total_excess, trial_to_export)
from planner.recipes import Stage
from planner.settings import StudySettings
from planner.trial import (LATENCY_SKIP_FACTOR, TWIN_ATTRS, CandidateSteps, Workbench, constrain, hopeless,
                           measure, measure_baseline, measured_twin, objective, over_memory_budget)
from targets.base import CARRIABLE_SECONDS, Measured, Target
from targets.figures import metrics_row

optuna.logging.set_verbosity(optuna.logging.WARNING)

COMPLETE, FAIL, RUNNING, PRUNED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                    optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.PRUNED)
BASELINE = {"perplexity": 20.0, "decode_ms_p50": 10.0, "prefill_ms_p50": 40.0, "weight_bytes": 500_000_000,
            "weight_mb": 500.0}


# ---------------------------------------------------------------------------------------------------
# Hand-made trials. A spec is a tuple: (kind, values, excess, extra user attrs)
#   "ok":       measured in full (metrics hold perplexity); excess is the single budget's constraint value
#   "rejected": rejected from its spec (metrics without perplexity, stand-in values)
#   "skipped":  latency hopeless, perplexity skipped (metrics without perplexity)
#   "bare":     complete, with values but no metrics at all
#   "fail", "running", "pruned": not complete (no values; metrics that hold perplexity all the same)
# ---------------------------------------------------------------------------------------------------


def made(kind: str, vals=(10.0, 10.0, 100.0), excess: float = -0.5, **attrs) -> optuna.trial.FrozenTrial:
    if kind in ("fail", "running", "pruned"):
        state = {"fail": FAIL, "running": RUNNING, "pruned": PRUNED}[kind]
        return optuna.trial.create_trial(state=state, user_attrs={"metrics": {"perplexity": 1.0}, **attrs})
    metrics = dict(zip(("decode_ms_p50", "weight_mb"), vals[1:]))
    if kind == "ok":
        metrics["perplexity"] = vals[0]
    elif kind == "rejected":
        attrs.setdefault("rejected", "weights 999.0 MB from the spec alone; over the budget")
    elif kind == "skipped":
        attrs.setdefault("skipped_perplexity", "latency 99.00 ms is over 1.5x the budget")
    user_attrs = {} if kind == "bare" else {"metrics": metrics}
    return optuna.trial.create_trial(values=list(vals), constraints={"latency": excess},
                                     user_attrs={**user_attrs, **attrs})


def study_of(*specs, names=("perplexity", "decode_ms_p50", "weight_mb"), name="decisions", user_attrs=None):
    study = optuna.create_study(study_name=name, directions=["minimize"] * len(names))
    study.set_metric_names(list(names))
    for key, value in (user_attrs or {}).items():
        study.set_user_attr(key, value)
    for spec in specs:
        study.add_trial(made(*spec[:3], **(spec[3] if len(spec) > 3 else {})))
    return study


def numbers(trials) -> list[int]:
    return [t.number for t in trials]


# ---------------------------------------------------------------------------------------------------
# The small rules
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, expected", [
    ((1, 1), (1, 1), False),  # equal: neither dominates
    ((1, 1), (1, 2), True),  # no worse in all, better in one
    ((1, 2), (1, 1), False),
    ((0, 3), (1, 2), False),  # better in one, worse in another
    ((0, 1), (1, 2), True),  # better in all
    ((2, 2, 2), (2, 2, 3), True),  # the last objective counts
    ((2, 2, 3), (2, 2, 2), False),
])
def test_dominates(a, b, expected):
    assert dominates(a, b) is expected


@pytest.mark.parametrize("points, front", [
    ([(1, 5), (2, 4), (3, 3)], [0, 1, 2]),  # a trade-off: all kept, in the given order
    ([(3, 3), (1, 1), (2, 2)], [1]),  # one dominates the rest
    ([(1, 1), (1, 1), (2, 2)], [0, 1]),  # ties are both kept
    ([(2, 1), (1, 2), (1, 3)], [0, 1]),  # (1, 3) dominated by (1, 2) alone
    ([], []),
])
def test_pareto_front_keeps_the_non_dominated_in_order(points, front):
    assert pareto_front(list(range(len(points))), values=lambda i: points[i]) == front


@pytest.mark.parametrize("constraints, is_feasible, excess", [
    ({}, True, 0.0),
    ({"latency": -0.25}, True, 0.0),
    ({"latency": 0.0}, True, 0.0),  # exactly at the budget meets it
    ({"latency": 1e-9}, False, 1e-9),
    ({"latency": -0.5, "memory": 0.25}, False, 0.25),  # one violated budget is enough
    ({"latency": 0.5, "memory": 0.25}, False, 0.75),  # the excesses add up
    ({"latency": 0.5, "prefill": -2.0}, False, 0.5),  # a met budget never offsets an excess
])
def test_feasible_and_total_excess(constraints, is_feasible, excess):
    trial = optuna.trial.create_trial(values=[1.0, 1.0], constraints=constraints)
    assert feasible(trial) is is_feasible
    assert total_excess(trial) == pytest.approx(excess)


@pytest.mark.parametrize("spec, is_measured", [
    (("ok",), True),
    (("rejected",), False),
    (("skipped",), False),
    (("bare",), False),
    (("fail",), False),  # metrics hold perplexity, but the trial failed
    (("running",), False),
    (("pruned",), False),
])
def test_measured(spec, is_measured):
    assert measured(made(*spec)) is is_measured


# ---------------------------------------------------------------------------------------------------
# decide: front, recommended, closest
# ---------------------------------------------------------------------------------------------------

FRONT_CASES = {
    "dominated out": ([("ok", (10, 10, 100)), ("ok", (11, 10, 100)), ("ok", (10, 10, 99))], [2]),
    "trade-off ordered by perplexity": ([("ok", (12, 5, 100)), ("ok", (10, 10, 100)), ("ok", (11, 8, 100))],
                                        [1, 2, 0]),
    "infeasible out and dominates nothing": ([("ok", (10, 10, 100)), ("ok", (5, 5, 50), 0.1)], [0]),
    "at the budget is feasible": ([("ok", (10, 10, 100), 0.0)], [0]),
    "twin shown once": ([("ok", (10, 10, 100)), ("ok", (10, 10, 100), -0.5, {"duplicate_of": 0})], [0]),
    "twin of an infeasible one stays out": ([("ok", (10, 10, 100)), ("ok", (5, 5, 50), 0.2),
                                             ("ok", (5, 5, 50), 0.2, {"duplicate_of": 1})], [0]),
    "rejected out": ([("ok", (10, 10, 100)), ("rejected", (2000, 10, 60))], [0]),
    "skipped out": ([("ok", (10, 10, 100)), ("skipped", (2000, 1, 100))], [0]),
    "no metrics out": ([("ok", (10, 10, 100)), ("bare", (1, 1, 1))], [0]),
    "failed, running, pruned out": ([("fail",), ("ok", (10, 10, 100)), ("running",), ("pruned",)], [1]),
    "ties both kept, by number": ([("ok", (10, 10, 100)), ("ok", (10, 10, 100))], [0, 1]),
    "tie on perplexity, by number": ([("ok", (10, 8, 100)), ("ok", (9, 9, 100)), ("ok", (10, 7, 110))],
                                     [1, 0, 2]),
}


@pytest.mark.parametrize("specs, front", FRONT_CASES.values(), ids=FRONT_CASES.keys())
def test_front_and_recommendation(specs, front):
    outcome = decide(study_of(*specs), [], BASELINE)
    assert numbers(outcome.front) == front
    assert outcome.recommended.number == front[0]  # the best first objective among the front
    assert outcome.closest == []  # only when nothing meets the budget


def test_recommended_is_the_best_first_objective_even_when_another_is_far_better_elsewhere():
    outcome = decide(study_of(("ok", (10.0, 1.0, 10.0)), ("ok", (9.9, 50.0, 900.0))), [], BASELINE)
    assert outcome.recommended.number == 1


CLOSEST_CASES = {
    "by total excess, at most three": ([("ok", (10, 10, 100), 0.4), ("ok", (10, 10, 100), 0.1),
                                        ("ok", (10, 10, 100), 0.3), ("ok", (10, 10, 100), 0.2)], [1, 3, 2]),
    "rejected and skipped count": ([("ok", (10, 10, 100), 0.9), ("rejected", (2000, 10, 60), 0.05),
                                    ("skipped", (2000, 30, 100), 0.6)], [1, 2, 0]),
    "twins shown once": ([("ok", (10, 10, 100), 0.3), ("ok", (10, 10, 100), 0.3, {"duplicate_of": 0}),
                          ("rejected", (2000, 10, 60), 0.4), ("rejected", (2000, 10, 60), 0.4, {"duplicate_of": 2}),
                          ("ok", (9, 9, 90), 0.5)], [0, 2, 4]),
    "only complete trials with metrics": ([("fail",), ("bare", (1, 1, 1), 0.01), ("running",),
                                           ("ok", (10, 10, 100), 0.7), ("pruned",)], [3]),
    "ties by number": ([("ok", (10, 10, 100), 0.2), ("ok", (9, 9, 90), 0.2), ("ok", (8, 8, 80), 0.1)],
                       [2, 0, 1]),
    "nothing at all": ([], []),
}


@pytest.mark.parametrize("specs, closest", CLOSEST_CASES.values(), ids=CLOSEST_CASES.keys())
def test_closest_when_nothing_meets_the_budget(specs, closest):
    outcome = decide(study_of(*specs), [], BASELINE)
    assert outcome.front == [] and outcome.recommended is None
    assert numbers(outcome.closest) == closest


def test_closest_shows_three():
    assert CLOSEST_SHOWN == 3
    outcome = decide(study_of(*[("ok", (10, 10, 100), 0.1 * (i + 1)) for i in range(5)]), [], BASELINE)
    assert numbers(outcome.closest) == [0, 1, 2]


def test_outcome_carries_the_budgets_baseline_and_objectives():
    budgets = [parse_budget("latency", "20ms")]
    study = study_of(("ok", (10, 10)), names=("kl", "decode_ms_p50"))
    outcome = decide(study, budgets, BASELINE)
    assert outcome.study is study and outcome.budgets is budgets and outcome.baseline is BASELINE
    assert outcome.objectives == ("kl", "decode_ms_p50")


@pytest.mark.parametrize("names, expected", [
    (("perplexity", "weight_mb"), ("perplexity", "weight_mb")),
    (None, DEFAULT),  # a study made before objectives were named
])
def test_study_objectives(names, expected):
    study = study_of(names=names) if names else optuna.create_study(directions=["minimize"] * 3)
    assert study_objectives(study) == expected
    assert decide(study, [], {}).objectives == expected


def test_stored_outcome_uses_the_stored_budgets_and_baseline():
    budget = parse_budget("memory", "0.5x").resolve(BASELINE)
    study = study_of(("ok", (10, 10, 100), 0.2),
                     user_attrs={"budgets": [budget.to_dict()], "baseline": BASELINE})
    outcome = stored_outcome(study)
    assert outcome.budgets == [budget] and outcome.baseline == BASELINE
    assert outcome.recommended is None and numbers(outcome.closest) == [0]
    bare = stored_outcome(study_of(("ok", (10, 10, 100))))
    assert bare.budgets == [] and bare.baseline == {} and bare.recommended.number == 0


# ---------------------------------------------------------------------------------------------------
# best per objective, and the trial `export` writes
# ---------------------------------------------------------------------------------------------------

BEST_CASES = {
    "feasible or not": ([("ok", (10, 10, 100)), ("ok", (8, 20, 100), 0.5), ("ok", (12, 5, 100), 0.2),
                         ("ok", (11, 11, 90))], {"perplexity": 1, "decode_ms_p50": 2, "weight_mb": 3}),
    "measured only": ([("rejected", (2000, 10, 10)), ("skipped", (2000, 1, 100)), ("fail",),
                       ("ok", (10, 10, 100)), ("bare", (1, 1, 1))],
                      {"perplexity": 3, "decode_ms_p50": 3, "weight_mb": 3}),
    "ties by number": ([("ok", (10, 10, 100)), ("ok", (10, 9, 100)), ("ok", (9, 9, 100))],
                       {"perplexity": 2, "decode_ms_p50": 1, "weight_mb": 0}),
    "nothing measured": ([("rejected", (2000, 10, 10)), ("fail",)], {}),
}


@pytest.mark.parametrize("specs, best", BEST_CASES.values(), ids=BEST_CASES.keys())
def test_best_trials(specs, best):
    found = best_trials(study_of(*specs))
    assert {name: t.number for name, t in found.items()} == best


def test_best_trials_name_the_study_objectives():
    study = study_of(("ok", (3, 1)), ("ok", (1, 3)), names=("kl", "weight_mb"))
    assert {name: t.number for name, t in best_trials(study).items()} == {"kl": 1, "weight_mb": 0}


EXPORT_STUDY = [("ok", (10, 10, 100), 0.3), ("ok", (9, 9, 90), -0.1), ("ok", (8, 20, 100), -0.1),
                ("rejected", (2000, 10, 60), 0.5), ("skipped", (2000, 40, 100), 2.0), ("fail",)]


@pytest.mark.parametrize("number, chosen", [
    (None, 2),  # the recommended one
    (0, 0),  # a measured trial over the budget, by number
    (1, 1),
    (2, 2),
])
def test_trial_to_export(number, chosen):
    assert trial_to_export(study_of(*EXPORT_STUDY, name="s"), number).number == chosen


@pytest.mark.parametrize("specs, number, message", [
    ([("ok", (10, 10, 100), 0.3)], None,
     "study 's' has no candidate that meets its budget; pass --trial N"),
    ([], None, "study 's' has no candidate that meets its budget; pass --trial N"),
    (EXPORT_STUDY, 6, r"trial 6 is out of range \(study 's' has trials 0-5\)"),
    (EXPORT_STUDY, -1, r"trial -1 is out of range \(study 's' has trials 0-5\)"),
    (EXPORT_STUDY, 3, r"trial 3 has no measured candidate \(complete: weights 999.0 MB from the spec alone; "
                      r"over the budget\)$"),
    (EXPORT_STUDY, 4, r"trial 4 has no measured candidate \(complete\)$"),
    (EXPORT_STUDY, 5, r"trial 5 has no measured candidate \(fail\)$"),
])
def test_trial_to_export_refuses(specs, number, message):
    with pytest.raises(PlannerError, match=f"^{message}"):
        trial_to_export(study_of(*specs, name="s"), number)


# ---------------------------------------------------------------------------------------------------
# Budgets: parsed, resolved against a baseline, turned into constraint values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, text, limit, figure, sign", [
    ("latency", "20ms", 20.0, 20.0, 0),  # at the limit: met (violation 0)
    ("latency", "20ms", 20.0, 19.0, -1),
    ("latency", "20ms", 20.0, 21.0, +1),
    ("latency", "0.5x", 5.0, 5.0, 0),  # half the baseline's 10 ms
    ("latency", "0.5x", 5.0, 4.0, -1),
    ("latency", "0.5x", 5.0, 6.0, +1),
    ("prefill", "1.5x", 60.0, 60.0, 0),
    ("prefill", "1.5x", 60.0, 61.0, +1),
    ("prefill", "50ms", 50.0, 49.0, -1),
    ("memory", "300MB", 300e6, 300e6, 0),
    ("memory", "300MB", 300e6, 300e6 + 1, +1),
    ("memory", "0.4x", 200e6, 199e6, -1),
    ("memory", "0.4x", 200e6, 200e6, 0),
])
def test_budget_resolves_and_its_violation_has_the_right_sign(kind, text, limit, figure, sign):
    budget = parse_budget(kind, text).resolve(BASELINE)
    assert budget.limit == pytest.approx(limit) and budget.text == text and budget.kind == kind
    violation = budget.violation({budget.metric: figure})
    assert violation == pytest.approx(figure / limit - 1.0)
    assert (violation > 1e-12) - (violation < -1e-12) == sign


def test_relative_budget_keeps_its_factor_and_absolute_needs_no_baseline():
    relative = parse_budget("prefill", "0.5x").resolve(BASELINE)
    assert relative == Budget("prefill", 20.0, 0.5, "0.5x")
    absolute = parse_budget("prefill", "30ms")
    assert absolute.resolve({}) is absolute  # nothing to look up
    with pytest.raises(PlannerError, match=r"^prefill budget 0.5x is relative, but the baseline has no "
                                           r"prefill_ms_p50 \(not measured, or timed too noisily to keep on a busy "
                                           r"machine: rerun on a quieter one, or give the budget in ms\)$"):
        parse_budget("prefill", "0.5x").resolve({"decode_ms_p50": 10.0})
    with pytest.raises(ValueError, match=r"^memory budget 0.5x must be resolved against the baseline first$"):
        parse_budget("memory", "0.5x").violation({"weight_bytes": 1})


@pytest.mark.parametrize("kind, metric", [("latency", "decode_ms_p50"), ("prefill", "prefill_ms_p50"),
                                          ("memory", "weight_bytes")])
def test_budget_metric(kind, metric):
    assert Budget(kind, 1.0).metric == metric


@pytest.mark.parametrize("text, kind, value, relative", [
    ("0.5X", "latency", None, 0.5),
    (" 0.25 x ", "memory", None, 0.25),
    ("1e-3s", "latency", 1.0, None),
    ("+2ms", "prefill", 2.0, None),
    (".5GB", "memory", 5e8, None),
    ("2kb", "memory", 2000, None),
    ("1mib", "memory", 2**20, None),
])
def test_parse_budget_forms(text, kind, value, relative):
    budget = parse_budget(kind, text)
    assert budget.kind == kind and budget.text == text
    assert budget.relative == relative
    assert (budget.limit is None) if value is None else budget.limit == pytest.approx(value)


@pytest.mark.parametrize("kind, text, message", [
    ("latency", "0x", r"^latency budget '0x' must be positive$"),
    ("memory", "-1x", r"^memory budget '-1x' must be positive$"),
    ("latency", "fast", r"^latency budget 'fast' is not a number with a unit \(e.g. 25ms or 0.7x\)$"),
    ("memory", "lots", r"^memory budget 'lots' is not a number with a unit \(e.g. 300MB or 0.5x\)$"),
    ("latency", "5 m", r"^latency budget '5 m' has unknown unit 'm' \(use us, ms, s or x for a multiple of "
                       r"the baseline\)$"),
    ("memory", "5", r"^memory budget '5' has unknown unit '\(none\)' \(use b, kb, mb, gb, kib, mib, gib or x "
                    r"for a multiple of the baseline\)$"),
    ("speed", "1x", r"^unknown budget kind 'speed' \(known: latency, prefill, memory\)$"),
])
def test_parse_budget_messages(kind, text, message):
    with pytest.raises(PlannerError, match=message):
        parse_budget(kind, text)


@pytest.mark.parametrize("budget, shown", [
    (Budget("memory", relative=0.5), "memory <= 0.5x baseline"),
    (Budget("latency", 12.5), "latency <= 12.50 ms"),
    (Budget("latency", 5.0, 0.5),
     "latency <= 0.5x baseline (same-run ratio where timed A/B; 5.00 ms at the baseline's figure)"),
    (Budget("memory", 269_030_016, 0.5), "memory <= 269.0 MB (0.5x baseline)"),
    (Budget("memory", 300e6), "memory <= 300.0 MB"),
    (Budget("prefill", 1.5), "prefill <= 1.50 ms"),
])
def test_budget_describe(budget, shown):
    assert budget.describe() == shown


def test_budget_to_dict_and_of_kind():
    budgets = [parse_budget("latency", "20ms"), parse_budget("memory", "0.5x")]
    assert budgets[1].to_dict() == {"kind": "memory", "limit": None, "relative": 0.5, "text": "0.5x"}
    assert of_kind(budgets, "memory") is budgets[1] and of_kind(budgets, "latency") is budgets[0]
    assert of_kind(budgets, "prefill") is None and of_kind([], "memory") is None


# ---------------------------------------------------------------------------------------------------
# Objectives: parsed, their values with stand-ins for what was not measured
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given, expected", [
    (None, DEFAULT),
    ("perplexity,kl", ("perplexity", "kl")),
    (" kl , weight_mb ", ("kl", "weight_mb")),
    (["perplexity", "decode_ms_p50"], ("perplexity", "decode_ms_p50")),
    (("kl", "perplexity", "memory"), ("kl", "perplexity", "weight_mb")),
    ("perplexity,decode_ms", ("perplexity", "decode_ms_p50")),  # aliases
    ("perplexity,latency", ("perplexity", "decode_ms_p50")),
    ("perplexity,memory", ("perplexity", "weight_mb")),
    ("perplexity,weight", ("perplexity", "weight_mb")),
    ("perplexity,kl,decode_ms_p50,weight_mb", ("perplexity", "kl", "decode_ms_p50", "weight_mb")),
])
def test_parse_objectives(given, expected):
    assert parse_objectives(given) == expected


@pytest.mark.parametrize("given, message", [
    # {known}: every registered objective; {accuracy}: the accuracy ones (perplexity, kl, and a plug-in's)
    ("perplexity,speed", r"^unknown objective 'speed' \(known: {known}\)$"),
    ("perplexity,weight_mb,weight_mb", r"^objective 'weight_mb' is listed twice$"),
    ("perplexity,weight_mb,memory", r"^objective 'memory' is listed twice$"),  # an alias of one listed
    ("perplexity", r"^a study needs at least two objectives to trade off, got perplexity$"),
    (["kl"], r"^a study needs at least two objectives to trade off, got kl$"),
    ("decode_ms_p50,perplexity", r"^the first objective is the accuracy the recommendation optimises: "
                                 r"{accuracy}, got decode_ms_p50$"),
    ("memory,kl", r"^the first objective is .* got weight_mb$"),
    ("", r"^objectives must be a comma-separated list of names, got ''$"),
    ("perplexity,,kl", r"^objectives must be a comma-separated list of names, got 'perplexity,,kl'$"),
    ([], r"^objectives must be a comma-separated list of names, got \[\]$"),
    (["perplexity", 3], r"^objectives must be a comma-separated list of names, got \['perplexity', 3\]$"),
])
def test_parse_objectives_refuses(given, message):
    known, accuracy = list(OBJECTIVES), [n for n, o in OBJECTIVES.items() if o.kind == ACCURACY]
    assert {"perplexity", "kl", "decode_ms_p50", "weight_mb"} <= set(known) and {"perplexity", "kl"} <= set(accuracy)
    with pytest.raises(PlannerError, match=message.replace("{known}", re.escape(", ".join(known)))
                       .replace("{accuracy}", re.escape(" or ".join(accuracy)))):
        parse_objectives(given)


@pytest.mark.parametrize("objectives, row, expected", [
    (DEFAULT, {"perplexity": 21.0, "decode_ms_p50": 8.0, "weight_mb": 250.0}, (21.0, 8.0, 250.0)),
    # rejected from its spec: only the size is known
    (DEFAULT, {"weight_mb": 250.0}, (UNMEASURED_PERPLEXITY_FACTOR * 20.0, 10.0, 250.0)),
    # latency skipped the perplexity run
    (DEFAULT, {"decode_ms_p50": 31.0, "weight_mb": 250.0}, (2000.0, 31.0, 250.0)),
    (("kl", "weight_mb"), {"weight_mb": 99.0}, (UNMEASURED_KL, 99.0)),
    (("kl", "perplexity"), {"kl": 0.25, "perplexity": 22.0}, (0.25, 22.0)),
    (("perplexity", "weight_mb"), {"perplexity": 30.0}, (30.0, 500.0)),  # the baseline's size
    (("weight_mb", "decode_ms_p50", "perplexity"), {}, (500.0, 10.0, 2000.0)),  # in the order asked
])
def test_values_with_stand_ins(objectives, row, expected):
    assert values(objectives, row, BASELINE) == pytest.approx(expected)
    assert UNMEASURED_PERPLEXITY_FACTOR == 100.0 and UNMEASURED_KL == 10.0


@pytest.mark.parametrize("objectives, evaluators", [
    (DEFAULT, {"memory", "perplexity", "latency"}),
    (("perplexity", "weight_mb"), {"memory", "perplexity"}),
    (("kl", "weight_mb"), {"memory", "perplexity", "kl"}),
    (("kl", "decode_ms_p50"), {"memory", "perplexity", "kl", "latency"}),
])
def test_evaluators_for(objectives, evaluators):
    assert evaluators_for(objectives) == evaluators


def test_metric_lookup_and_shown():
    assert metric("kl") is OBJECTIVES["kl"] and metric("bits_per_byte") is METRICS["bits_per_byte"]
    assert metric("perplexity").shown(None) == "n/a" and metric("perplexity").shown(12.5) == "12.50"
    assert metric("weight_bytes").shown(12) == "12"
    assert OBJECTIVES["decode_ms_p50"].budget == "latency" and OBJECTIVES["weight_mb"].budget == "memory"
    assert OBJECTIVES["perplexity"].budget is None and OBJECTIVES["kl"].direction == "minimize"
    with pytest.raises(KeyError):
        metric("speed")


@pytest.mark.parametrize("stored, asked, refused", [
    (("perplexity", "decode_ms_p50", "weight_mb"), DEFAULT, False),
    (("perplexity", "decode_ms_p50", "weight_mb"), ("perplexity", "kl"), True),
    (("perplexity", "kl"), ("kl", "perplexity"), True),  # the order matters: values are positional
    (None, ("perplexity", "kl"), False),  # a study without names yet takes any
])
def test_check_objectives(stored, asked, refused):
    from planner.study import check_objectives

    study = optuna.create_study(study_name="s", directions=["minimize"] * len(stored or asked))
    if stored:
        study.set_metric_names(list(stored))
    if refused:
        with pytest.raises(PlannerError, match=rf"^study 's' optimises {', '.join(stored)}, not "
                                               rf"{', '.join(asked)} \(use another --study name"):
            check_objectives(study, asked)
    else:
        check_objectives(study, asked)


@pytest.mark.parametrize("stored, asked, baseline, refused", [
    ([], [], {"weight_bytes": 1000}, False),
    ([("memory", "0.5x")], [("memory", "0.5x")], {"weight_bytes": 1000}, False),
    ([("memory", "0.5x")], [("memory", "500B")], {"weight_bytes": 1000}, True),  # same limit, another budget
    ([("memory", "0.5x")], [("memory", "0.6x")], {"weight_bytes": 1000}, True),
    ([("memory", "0.5x")], [], {"weight_bytes": 1000}, True),
    ([], [("latency", "20ms")], {"weight_bytes": 1000}, True),
    (None, [("latency", "20ms")], {"weight_bytes": 1000}, False),  # a new study takes any budget
    ([("memory", "0.5x")], [("memory", "0.6x")], {}, False),  # no baseline yet: nothing was judged
])
def test_check_budgets(stored, asked, baseline, refused):
    from planner.study import check_budgets

    study = optuna.create_study(study_name="s")
    if stored is not None:
        study.set_user_attr("budgets", [parse_budget(k, t).resolve(baseline or {"weight_bytes": 1000}).to_dict()
                                        for k, t in stored])
    asked_budgets = [parse_budget(k, t) for k, t in asked]
    if refused:
        with pytest.raises(PlannerError, match=r"^study 's' was made with .*, not .* \(use another --study name"):
            check_budgets(study, asked_budgets, baseline)
    else:
        check_budgets(study, asked_budgets, baseline)


# ---------------------------------------------------------------------------------------------------
# Trial-time rules: latency skip, constraints, spec-only rejection, twins
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budgets, row, skipped_by", [
    (["latency:20ms"], {"decode_ms_p50": 30.0}, None),  # exactly 1.5x: measured
    (["latency:20ms"], {"decode_ms_p50": 30.0001}, "latency"),  # just above
    (["latency:20ms"], {"decode_ms_p50": 29.0}, None),
    (["prefill:40ms"], {"prefill_ms_p50": 60.0}, None),
    (["prefill:40ms"], {"prefill_ms_p50": 60.0001}, "prefill"),
    (["latency:0.5x"], {"decode_ms_p50": 1000.0}, None),  # unresolved relative budget: no limit, no skip
    (["memory:1MB"], {"weight_bytes": 10**9}, None),  # memory never skips
    (["latency:20ms"], {"weight_bytes": 10**9}, None),  # latency not measured
    (["latency:20ms", "prefill:40ms"], {"decode_ms_p50": 10.0, "prefill_ms_p50": 100.0}, "prefill"),
    (["latency:20ms", "prefill:40ms"], {"decode_ms_p50": 50.0, "prefill_ms_p50": 100.0}, "latency"),  # first
    (["prefill:40ms", "latency:20ms"], {"decode_ms_p50": 50.0, "prefill_ms_p50": 100.0}, "prefill"),
    ([], {"decode_ms_p50": 1e9}, None),
])
def test_hopeless_latency(budgets, row, skipped_by):
    parsed = [parse_budget(*b.split(":")) for b in budgets]
    found = hopeless(parsed, row)
    assert (found and found.split()[0]) == skipped_by
    assert LATENCY_SKIP_FACTOR == 1.5


@pytest.mark.parametrize("row, skipped", [
    ({"decode_ms_p50": 1.0, "decode_ratio": 0.75}, False),  # exactly 1.5x the 0.5x budget
    ({"decode_ms_p50": 1.0, "decode_ratio": 0.7501}, True),  # the ratio decides, not the fast absolute figure
    ({"decode_ms_p50": 100.0, "decode_ratio": 0.2}, False),
    ({"decode_ms_p50": 15.1}, True),  # no ratio: 1.5 x the resolved 10 ms
])
def test_hopeless_latency_on_same_run_ratios(row, skipped):
    budget = parse_budget("latency", "0.5x").resolve({"decode_ms_p50": 20.0})
    assert (hopeless([budget], row) is not None) is skipped


class RecordingTrial:
    """What `constrain` and `measure` use of an Optuna trial."""

    def __init__(self):
        self.constraints, self.user_attrs = {}, {}

    def set_constraint(self, key, value):
        self.constraints[key] = value

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value


@pytest.mark.parametrize("budgets, row, constraints, met", [
    (["latency:20ms"], {"decode_ms_p50": 20.0}, {"latency": 0.0}, True),
    (["latency:20ms"], {"decode_ms_p50": 10.0}, {"latency": -0.5}, True),
    (["latency:20ms"], {"decode_ms_p50": 30.0}, {"latency": 0.5}, False),
    (["latency:20ms"], {"weight_bytes": 1}, {"latency": 1.0}, False),  # not measured: violated
    (["memory:100B", "prefill:10ms"], {"weight_bytes": 50}, {"memory": -0.5, "prefill": 1.0}, False),
    (["memory:100B", "latency:10ms"], {"weight_bytes": 200, "decode_ms_p50": 5.0},
     {"memory": 1.0, "latency": -0.5}, False),
    (["latency:10ms", "memory:100B"], {"weight_bytes": 100, "decode_ms_p50": 5.0},
     {"latency": -0.5, "memory": 0.0}, True),
    ([], {"weight_bytes": 1}, {}, True),
])
def test_constrain(budgets, row, constraints, met):
    trial = RecordingTrial()
    assert constrain(trial, [parse_budget(*b.split(":")) for b in budgets], row) is met
    assert trial.constraints == pytest.approx(constraints)


@pytest.mark.parametrize("budgets, estimate, over", [
    (["memory:100B"], 100, False),  # at the budget: built
    (["memory:100B"], 101, True),
    (["memory:100B"], 99, False),
    (["latency:1ms", "prefill:1ms"], 10**12, False),  # no memory budget
    (["latency:1ms", "memory:100B"], 101, True),
    ([], 10**12, False),
])
def test_over_memory_budget(budgets, estimate, over):
    assert over_memory_budget([parse_budget(*b.split(":")) for b in budgets], estimate) is over


STAGES_A = [{"technique": "fake", "spec": {"name": "a"}}]
STAGES_B = [{"technique": "fake", "spec": {"name": "b"}}]


@pytest.mark.parametrize("others, twin", [
    ([optuna.trial.create_trial(values=[1, 1], user_attrs={"stages": STAGES_A, "metrics": {}})], 0),
    ([optuna.trial.create_trial(values=[1, 1], user_attrs={"stages": STAGES_B, "metrics": {}})], None),
    ([optuna.trial.create_trial(values=[1, 1], user_attrs={"stages": STAGES_A})], None),  # no figures
    ([optuna.trial.create_trial(state=FAIL, user_attrs={"stages": STAGES_A, "metrics": {}})], None),
    ([optuna.trial.create_trial(state=RUNNING, user_attrs={"stages": STAGES_A, "metrics": {}})], None),
    ([optuna.trial.create_trial(values=[1, 1], user_attrs={"stages": STAGES_B, "metrics": {}}),
      optuna.trial.create_trial(values=[1, 1], user_attrs={"stages": STAGES_A, "metrics": {}}),
      optuna.trial.create_trial(values=[1, 1], user_attrs={"stages": STAGES_A, "metrics": {}})], 1),  # first
])
def test_measured_twin(others, twin):
    study = optuna.create_study(directions=["minimize"] * 2)
    for other in others:
        study.add_trial(other)
    found = measured_twin(study, STAGES_A)
    assert (found and found.number) == twin


# ---------------------------------------------------------------------------------------------------
# The trial function, with the build and the evaluators replaced by a table
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeSpec:
    name: str

    def to_dict(self) -> dict:
        return {"name": self.name}


# name -> figures of the built candidate, and its spec-only size estimate
CANDIDATES = {
    "a": dict(weight=200_000_000, decode=8.0, prefill=30.0, perplexity=22.0, kl=0.5),
    "b": dict(weight=150_000_000, decode=12.0, prefill=35.0, perplexity=25.0, kl=0.7),
    "slow": dict(weight=150_000_000, decode=40.0, prefill=35.0, perplexity=21.0, kl=0.4),
    "big": dict(weight=450_000_000, decode=5.0, prefill=20.0, perplexity=20.5, kl=0.1),
    "nan": dict(weight=150_000_000, decode=8.0, prefill=30.0, perplexity=float("nan"), kl=0.5),
    "nan-kl": dict(weight=150_000_000, decode=8.0, prefill=30.0, perplexity=22.0, kl=float("nan")),
    "nan-decode": dict(weight=150_000_000, decode=float("nan"), prefill=30.0, perplexity=22.0, kl=0.5),
    "huge": dict(weight=100_000_000_000, decode=8.0, prefill=30.0, perplexity=22.0, kl=0.5),
    "broken": dict(weight=150_000_000, decode=8.0, prefill=30.0, perplexity=22.0, kl=0.5),
    "noted": dict(weight=150_000_000, decode=8.0, prefill=30.0, perplexity=22.0, kl=0.5),
}
# What the study's evaluators are given: its protocols (not the defaults), its tokenizer and held-out text.
SETTINGS = StudySettings(evaluation={"perplexity": {"context_length": 64, "stride": 32, "max_tokens": 256},
                                     "latency": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1, "warmup": 0}})
TOKENIZER, HELD_OUT, CONTEXT, SPACES = object(), ["held-out text"], SimpleNamespace(device="cpu"), {"fake": "space"}


class LabTarget(Target):
    """A deployment target answering from the table, as a target must: latency only when the request needs it,
    nothing scored once the request's own rule calls the candidate hopeless, and one figure family per scorer
    the request makes (a scorer is known by its name)."""

    name, runtime, artifact = "lab", "the table", "nothing"

    def __init__(self, lab):
        self.lab = lab

    def prepare(self, request) -> None:
        if "latency" in request.evaluators:  # a warm-up pass, as a runtime's first timing is slow
            self.lab.latency(request.model, request.latency)

    def measure(self, request, model, label: str) -> Measured:
        lab = self.lab
        figures = BASELINE_FIGURES if model.name == "base" else CANDIDATES[model.name]
        details = {"memory": dict(MEMORY_A, total_bytes=figures["weight"], disk_bytes=figures["weight"],
                                  resident_bytes=figures["weight"])}
        timed = {}
        if "latency" in request.evaluators:
            lab.latency(model, request.latency)
            timed = dict(decode_ms_p50=figures["decode"], prefill_ms_p50=figures["prefill"])
            details["latency"] = {"decode_p50_ms": figures["decode"]}
            if "from_disk" in figures:  # what llama.cpp's target says of a timing that read its files from disk
                details["latency"]["from_disk"] = figures["from_disk"]
        if "carriable" in figures:  # what llama-quant's source model trial spent on tables its cuts carry
            details["runtime"] = {CARRIABLE_SECONDS: figures["carriable"]}
        row = metrics_row(label, figures["weight"], disk_bytes=figures["weight"], **timed)
        skipped = request.hopeless(row)
        if skipped:
            return Measured(row, details, skipped)
        for make in request.scorers:
            scorer = make()
            if scorer.name == "perplexity":
                lab.calls["perplexity"].append(model.name)
                lab.args.add(("perplexity", id(request.tokenizer), id(request.held_out), request.perplexity))
                row.update(perplexity=figures["perplexity"], bits_per_byte=figures["perplexity"] / 10)
                details["perplexity"] = {"perplexity": figures["perplexity"]}
            else:
                lab.calls["kl"].append((model.name, scorer.accumulator.reference))
                row.update(kl=figures["kl"], top1_agreement=0.9)
                details["kl"] = {"kl_mean": figures["kl"]}
        return Measured(row, details)

    def ship(self, model, tokenizer, stages, out, runtime=None):
        raise NotImplementedError

    def measure_shipped(self, request, artifact):
        raise NotImplementedError


class Lab:
    """Stand-ins for the build steps and the target, injected through the workbench, counting what ran."""

    def __init__(self):
        self.calls = {"build": [], "latency": [], "perplexity": [], "kl": [], "estimate": []}
        self.args = set()  # (what, the arguments it was given besides the model and stages)
        self.steps = CandidateSteps(suggest_stages=self.suggest_stages, describe=self.describe, build=self.build,
                                    shaped_model=lambda base_model, stages: base_model, storage_notes=self.notes,
                                    estimate_weight_bytes=self.estimate, aim=self.aim)
        self.target = LabTarget(self)

    def aim(self, base_model, stages, memory_limit, shaped=None, beyond=None):
        self.args.add(("aim", beyond == self.target.stored_beyond))  # the target's extra bytes are left room for
        return stages  # the fake stages aim at nothing

    def suggest_stages(self, trial, spaces):
        self.args.add(("suggest", id(spaces)))
        return [Stage("fake", FakeSpec(trial.suggest_categorical("candidate", list(CANDIDATES))))]

    @staticmethod
    def describe(stages, notes=None):
        return " + ".join(f"fake({s.spec.name}{'*' if notes else ''})" for s in stages) or "baseline"

    @staticmethod
    def notes(base_model, stages, shaped=None):
        return {"fallbacks": {"layer": 32}} if stages and stages[0].spec.name == "noted" else {}

    def build(self, base_model, stages, context, screen=None):  # single-stage fakes: nothing to screen
        from planner.candidates import BuiltCandidate

        self.calls["build"].append(stages[0].spec.name)
        self.args.add(("build", base_model.name, id(context)))
        if stages[0].spec.name == "broken":
            raise RuntimeError("x" * 600 + "\nsecond line")
        return BuiltCandidate(SimpleNamespace(name=stages[0].spec.name), {"fake": 0.25})

    def estimate(self, base_model, stages, shaped=None, beyond=None):
        self.calls["estimate"].append(stages[0].spec.name)
        self.args.add(("estimate", base_model.name, beyond == self.target.stored_beyond))
        return CANDIDATES[stages[0].spec.name]["weight"]

    def latency(self, model, protocol):
        self.calls["latency"].append(model.name)
        self.args.add(("latency", protocol))

    def bench(self, budgets=(), objectives=DEFAULT, baseline=BASELINE) -> Workbench:
        parsed = [parse_budget(*b.split(":")).resolve(BASELINE) for b in budgets]
        return Workbench(SETTINGS, SimpleNamespace(name="base"), TOKENIZER, SimpleNamespace(eval=HELD_OUT), CONTEXT,
                         SPACES, parsed, dict(baseline), reference="reference", objectives=objectives,
                         target=self.target, steps=self.steps)

    def run(self, bench, *names, study=None):
        study = study or optuna.create_study(directions=["minimize"] * len(bench.objectives))
        for name in names:
            study.enqueue_trial({"candidate": name})
        study.optimize(objective(bench), n_trials=len(names), catch=(FloatingPointError, KeyError, RuntimeError))
        return study


BASELINE_FIGURES = dict(weight=500_000_000, decode=10.0, prefill=40.0, perplexity=20.0, kl=0.0)


@pytest.fixture
def lab():
    return Lab()


MEMORY_A = {"total_bytes": 200_000_000, "disk_bytes": 200_000_000, "resident_bytes": 200_000_000, "decompressed_on_load": False}


def test_a_measured_trial_stores_its_figures(lab):
    study = lab.run(lab.bench(["latency:20ms", "memory:0.5x"]), "a")
    trial = study.trials[0]
    assert trial.state == COMPLETE and lab.calls["build"] == ["a"]
    assert trial.values == pytest.approx([22.0, 8.0, 200.0])
    assert trial.constraints == pytest.approx({"latency": -0.6, "memory": -0.2})
    attrs = trial.user_attrs
    assert attrs["stages"] == STAGES_A and attrs["label"] == "fake(a)" and attrs["estimated_weight_bytes"] == 200e6
    assert attrs["metrics"] == {"weight_bytes": 200_000_000, "weight_mb": 200.0, "stages": "fake(a)",
                                "decode_ms_p50": 8.0, "prefill_ms_p50": 30.0, "perplexity": 22.0,
                                "bits_per_byte": 2.2, "disk_bytes": 200_000_000}
    assert attrs["measurements"] == {"memory": MEMORY_A, "latency": {"decode_p50_ms": 8.0},
                                     "perplexity": {"perplexity": 22.0}}
    assert set(attrs["seconds"]) == {"fake", "measure", "total"} and attrs["seconds"]["fake"] == 0.25
    assert 0 <= attrs["seconds"]["measure"] <= attrs["seconds"]["total"] < 60
    assert not {"rejected", "skipped_perplexity", "duplicate_of", "failure"} & set(attrs)


def test_a_timing_from_disk_is_said_on_the_trial_its_line_and_its_twin(lab, monkeypatch):
    """The target's word that a timing read its files from disk (targets/llamacpp/runtime.from_disk_reason) is kept
    on the trial and said on its line, and a twin of it carries it as it carries the figures."""
    from planner import workers
    from planner.report import trial_line

    said = "timed from disk: 900 MB read from storage while timed, the files timed being 600 MB"
    monkeypatch.setitem(CANDIDATES, "disk", dict(CANDIDATES["a"], from_disk=said))
    study = lab.run(lab.bench(), "disk", "a", "disk")
    disk, plain, twin = study.trials
    assert workers.timed_from_disk(disk) == said == disk.user_attrs["measurements"]["latency"]["from_disk"]
    assert trial_line(disk, 3).endswith(f"fake(disk)  ({said})")
    assert workers.timed_from_disk(plain) is None and trial_line(plain, 3).endswith("fake(a)")
    assert twin.user_attrs["duplicate_of"] == 0 and workers.timed_from_disk(twin) == said
    assert f"(same candidate as trial 0; {said}; not counted in the trials)" in trial_line(twin, 3)


def test_what_derived_candidates_will_not_spend_is_kept_on_the_trial(lab, monkeypatch):
    monkeypatch.setitem(CANDIDATES, "source", dict(CANDIDATES["a"], carriable=700.0))
    study = lab.run(lab.bench(), "source", "a")
    from planner.workers import measured

    source, plain = study.trials
    assert measured(source, "runtime", CARRIABLE_SECONDS) == 700.0 and measured(plain, "runtime", CARRIABLE_SECONDS) is None


def test_a_storage_note_is_stated_on_the_label_the_trial_and_its_metrics(lab):
    study = lab.run(lab.bench(), "noted", "a")
    noted, plain = study.trials
    assert noted.user_attrs["label"] == "fake(noted*)" and noted.user_attrs["metrics"]["stages"] == "fake(noted*)"
    assert noted.user_attrs["storage_notes"] == {"fallbacks": {"layer": 32}}
    assert plain.user_attrs["label"] == "fake(a)" and "storage_notes" not in plain.user_attrs


def test_a_twin_is_not_measured_again(lab):
    study = lab.run(lab.bench(["latency:20ms", "memory:0.5x"]), "a", "b", "a")
    first, twin = study.trials[0], study.trials[2]
    assert lab.calls["build"] == ["a", "b"] and lab.calls["perplexity"] == ["a", "b"]
    assert lab.calls["latency"] == ["a", "b"] and lab.calls["estimate"] == ["a", "b"]
    assert twin.state == COMPLETE and twin.user_attrs["duplicate_of"] == 0
    assert twin.values == first.values and twin.constraints == first.constraints
    for key in ("metrics", "measurements", "estimated_weight_bytes", "stages", "label"):
        assert twin.user_attrs[key] == first.user_attrs[key]
    assert set(twin.user_attrs["seconds"]) == {"total"}  # nothing was built
    assert numbers(decide(study, [], BASELINE).front) == [0, 1]  # shown once


def test_a_twin_takes_this_study_budgets(lab):
    """The twin copies figures, not verdicts: its constraints are computed against the budgets of this run."""
    study = lab.run(lab.bench(["latency:20ms"]), "a")
    lab.run(lab.bench(["latency:7ms"]), "a", study=study)
    assert lab.calls["build"] == ["a"]
    assert study.trials[1].constraints == pytest.approx({"latency": 8.0 / 7.0 - 1.0})


def test_a_twin_of_a_rejected_or_skipped_candidate_copies_why(lab):
    bench = lab.bench(["latency:20ms", "memory:300MB"])
    study = lab.run(bench, "big", "slow", "big", "slow")
    assert lab.calls["build"] == ["slow"] and lab.calls["perplexity"] == []
    big, slow, big_twin, slow_twin = study.trials
    assert big_twin.user_attrs["rejected"] == big.user_attrs["rejected"] and big_twin.user_attrs["duplicate_of"] == 0
    assert slow_twin.user_attrs["skipped_perplexity"] == slow.user_attrs["skipped_perplexity"]
    assert slow_twin.user_attrs["duplicate_of"] == 1
    assert big_twin.values == big.values and slow_twin.values == slow.values
    assert big_twin.constraints == big.constraints and slow_twin.constraints == slow.constraints
    assert set(TWIN_ATTRS) == {"metrics", "measurements", "estimated_weight_bytes", "rejected", "skipped_perplexity",
                               "screened"}


def test_a_failed_trial_of_the_same_candidate_is_no_twin(lab):
    study = optuna.create_study(directions=["minimize"] * 3)
    study.add_trial(optuna.trial.create_trial(state=FAIL, user_attrs={"stages": STAGES_A, "metrics": {"x": 1}}))
    lab.run(lab.bench(), "a", study=study)
    assert lab.calls["build"] == ["a"] and "duplicate_of" not in study.trials[1].user_attrs


def test_spec_only_rejection_builds_nothing(lab):
    study = lab.run(lab.bench(["memory:300MB", "latency:20ms"]), "big")
    trial = study.trials[0]
    assert lab.calls["build"] == [] and lab.calls["latency"] == [] and lab.calls["perplexity"] == []
    assert trial.state == COMPLETE
    assert trial.user_attrs["rejected"] == "weights 450.0 MB from the spec alone; over the budget"
    assert trial.user_attrs["estimated_weight_bytes"] == 450_000_000
    assert trial.user_attrs["metrics"] == {"weight_bytes": 450_000_000, "weight_mb": 450.0, "stages": "fake(big)"}
    # stand-ins: 100x the baseline's perplexity, the baseline's decode time; the size is known
    assert trial.values == pytest.approx([2000.0, 10.0, 450.0])
    assert trial.constraints == pytest.approx({"memory": 0.5, "latency": 1.0})
    assert "measurements" not in trial.user_attrs and set(trial.user_attrs["seconds"]) == {"total"}
    assert decide(study, [], BASELINE).front == []


def test_at_the_memory_budget_is_built(lab):
    study = lab.run(lab.bench(["memory:200MB"]), "a")
    assert lab.calls["build"] == ["a"] and "rejected" not in study.trials[0].user_attrs
    assert study.trials[0].constraints == pytest.approx({"memory": 0.0})


def test_a_hopeless_latency_skips_perplexity_in_a_trial(lab):
    study = lab.run(lab.bench(["latency:25ms"]), "slow")
    trial = study.trials[0]
    assert lab.calls["build"] == ["slow"] and lab.calls["latency"] == ["slow"] and lab.calls["perplexity"] == []
    assert trial.user_attrs["skipped_perplexity"] == "latency 40.00 ms is over 1.5x the budget"
    assert "perplexity" not in trial.user_attrs["metrics"] and not measured(trial)
    assert trial.values == pytest.approx([2000.0, 40.0, 150.0])
    assert trial.constraints == pytest.approx({"latency": 0.6})


@pytest.mark.parametrize("budget, skipped", [
    ("latency:5.34ms", False),  # 8 ms is just under 1.5x
    ("latency:5.33ms", True),  # just over
    ("prefill:20ms", False),  # 30 ms: exactly 1.5x
    ("prefill:19.99ms", True),
    ("memory:1B", False),  # never on memory
])
def test_measure_skips_perplexity_only_past_the_factor(lab, budget, skipped):
    trial = RecordingTrial()
    row, details = measure(lab.bench([budget]), SimpleNamespace(name="a"), [Stage("fake", FakeSpec("a"))], trial)
    assert ("skipped_perplexity" in trial.user_attrs) is skipped
    assert lab.calls["perplexity"] == ([] if skipped else ["a"])
    assert ("perplexity" in row) is not skipped and ("perplexity" in details) is not skipped
    assert row["decode_ms_p50"] == 8.0 and details["latency"] == {"decode_p50_ms": 8.0}


def test_measure_without_a_trial_never_skips(lab):
    row, _ = measure(lab.bench(["latency:1ms"]), SimpleNamespace(name="slow"), [])
    assert row["perplexity"] == 21.0 and lab.calls["perplexity"] == ["slow"]


def test_measure_prefill_message(lab):
    trial = RecordingTrial()
    measure(lab.bench(["prefill:10ms"]), SimpleNamespace(name="a"), [], trial)
    assert trial.user_attrs == {"skipped_perplexity": "prefill 30.00 ms is over 1.5x the budget"}


@pytest.mark.parametrize("budgets, objectives, latency, kl", [
    ([], DEFAULT, True, False),  # decode time is an objective
    ([], ("perplexity", "weight_mb"), False, False),
    (["prefill:1s"], ("perplexity", "weight_mb"), True, False),  # a latency budget needs it
    (["latency:1s"], ("perplexity", "weight_mb"), True, False),
    (["memory:1GB"], ("kl", "weight_mb"), False, True),
])
def test_measure_runs_what_is_needed(lab, budgets, objectives, latency, kl):
    bench = lab.bench(budgets, objectives)
    row, details = measure(bench, SimpleNamespace(name="a"), [])
    assert (lab.calls["latency"] == ["a"]) is latency and ("decode_ms_p50" in row) is latency
    assert ("latency" in details) is latency
    assert lab.calls["kl"] == ([("a", "reference")] if kl else [])
    assert ("kl" in row) is kl and ("kl" in details) is kl and ("top1_agreement" in row) is kl
    assert row["perplexity"] == 22.0 and lab.calls["perplexity"] == ["a"]
    assert details["memory"] == MEMORY_A and details["perplexity"] == {"perplexity": 22.0}
    assert bench.evaluators() == {"memory", "perplexity"} | ({"latency"} if latency else set()) | (
        {"kl"} if kl else set())


def test_kl_objective_values(lab):
    study = lab.run(lab.bench(objectives=("kl", "weight_mb")), "a")
    metrics = study.trials[0].user_attrs["metrics"]
    assert study.trials[0].values == pytest.approx([0.5, 200.0])
    assert metrics["kl"] == 0.5 and metrics["top1_agreement"] == 0.9 and metrics["perplexity"] == 22.0


@pytest.mark.parametrize("budgets, objectives, latency_runs", [
    ([], DEFAULT, 2),  # one untimed pass, then the timed one
    (["prefill:1s"], ("perplexity", "weight_mb"), 2),
    ([], ("perplexity", "weight_mb"), 0),
])
def test_measure_baseline(lab, budgets, objectives, latency_runs):
    row, _ = measure_baseline(lab.bench(budgets, objectives))
    assert lab.calls["latency"] == ["base"] * latency_runs and lab.calls["perplexity"] == ["base"]
    assert row["perplexity"] == 20.0 and row["stages"] == "baseline" and row["weight_bytes"] == 500_000_000


def test_a_non_finite_figure_fails_the_trial(lab):
    study = lab.run(lab.bench(), "nan")
    trial = study.trials[0]
    assert trial.state == FAIL and trial.user_attrs["failure"].startswith("FloatingPointError: non-finite metrics {")
    assert "metrics" not in trial.user_attrs and "measurements" not in trial.user_attrs


def test_a_failing_trial_says_why(lab):
    # rejected, and no baseline perplexity to stand in for its own: a KeyError
    study = lab.run(lab.bench(["memory:300MB"], baseline={"weight_mb": 500.0, "decode_ms_p50": 10.0}), "big")
    assert study.trials[0].state == FAIL and study.trials[0].user_attrs["failure"] == "KeyError: 'perplexity'"
    assert math.isfinite(study.trials[0].user_attrs["seconds"]["total"])


@pytest.mark.parametrize("candidate", ["nan-kl", "nan-decode"])
def test_every_non_finite_objective_fails_the_trial(lab, candidate):
    study = lab.run(lab.bench(objectives=("kl", "decode_ms_p50")), candidate)
    assert study.trials[0].user_attrs["failure"].startswith("FloatingPointError: non-finite metrics {")


def test_a_failure_is_one_line_of_at_most_500_characters(lab):
    study = lab.run(lab.bench(), "broken")
    assert study.trials[0].state == FAIL and study.trials[0].user_attrs["failure"] == "RuntimeError: " + "x" * 500


def test_a_trial_past_the_deadline_is_not_started_counted_or_copied(lab):
    """A deadline already passed (handed by workers.run_trials) leaves a candidate of a kind the study has timed
    unbuilt and uncounted (planner/deadline.py); the same candidate later, without one, is built, not a twin."""
    from planner import workers
    from planner.report import not_counted, trial_line

    bench = lab.bench()
    study = lab.run(bench, "a")
    study.enqueue_trial({"candidate": "b"}, user_attrs={workers.DEADLINE_ATTR: time.time() - 1})
    study.optimize(objective(bench), n_trials=1)
    late = study.trials[1]
    assert late.user_attrs[workers.NOT_STARTED].startswith("predicted ") and workers.repeat(late)
    assert lab.calls["build"] == ["a"]
    assert "before the deadline: not started; not counted in the trials" in trial_line(late, 2)
    assert not_counted(study) == "1 predicted to run past the deadline"
    lab.run(bench, "b", study=study)
    assert lab.calls["build"] == ["a", "b"] and "duplicate_of" not in study.trials[2].user_attrs


def test_a_search_timeout_counts_from_the_commands_start(lab, monkeypatch):
    """The baseline and the compared presets (measured before the trials) spend the time --timeout gives."""
    from dataclasses import replace as replaced

    from planner import study as study_module, workers

    handed, confirm_ends = [], []
    monkeypatch.setattr(workers, "run_trials",
                        lambda study, objective, target, timeout, **k: handed.append(timeout) or workers.RunResult())
    monkeypatch.setattr(study_module, "confirm", lambda study, bench, say, ends: confirm_ends.append(ends))
    bench = lab.bench()
    bench.settings = replaced(bench.settings, timeout=100.0, trials=1)
    monkeypatch.setattr(study_module, "open_study", lambda settings, verbose: (time.sleep(0.5), (study, bench))[1])
    study = optuna.create_study(directions=["minimize"] * len(bench.objectives))
    study_module.run_search(bench.settings, quiet=True)
    study_module.run_study(study, bench, quiet=True, began=time.monotonic() - 30)
    study_module.run_study(study, bench, quiet=True, began=time.monotonic() - 300)
    assert 99.0 < handed[0] <= 99.5 and 69.0 < handed[1] <= 70.0 and handed[2] == 0.0
    # the confirmation stage after the trials works to the same end (epoch seconds)
    now = time.time()
    assert [round(e - now) for e in confirm_ends] == [99, 70, 0]


def test_the_rejection_message_in_mb(lab):
    study = lab.run(lab.bench(["memory:300MB"]), "huge")
    assert study.trials[0].user_attrs["rejected"] == "weights 100000.0 MB from the spec alone; over the budget"
    assert Budget("memory", 1e11).describe() == "memory <= 100000.0 MB"


@pytest.mark.parametrize("objectives", [DEFAULT, ("kl", "decode_ms_p50")])
def test_the_study_wiring_reaches_the_build_and_the_evaluators(lab, objectives):
    bench = lab.bench(objectives=objectives)
    lab.run(bench, "a")
    measure_baseline(bench)
    assert lab.args == {("suggest", id(SPACES)), ("aim", True), ("estimate", "base", True), ("build", "base", id(CONTEXT)),
                        ("latency", replace(SETTINGS.latency_protocol(), prefills=1)),  # no prefill budget
                        ("perplexity", id(TOKENIZER), id(HELD_OUT), SETTINGS.perplexity_protocol())}
    assert SETTINGS.latency_protocol() != StudySettings().latency_protocol()
    assert SETTINGS.perplexity_protocol() != StudySettings().perplexity_protocol()


@pytest.mark.parametrize("budgets, asked, timed", [
    ([], None, 1),  # nothing judges prefill: the one prefill each run needs before its decode
    (["memory:1GB"], None, 1),
    (["prefill:1s"], None, None),  # a prefill budget: the runtime's own, more precise count
    ([], 4, 4), (["prefill:1s"], 2, 2),  # the study file's own count stands
])
def test_prefills_are_timed_where_a_prefill_budget_judges_them(lab, budgets, asked, timed):
    settings = StudySettings(evaluation={"latency": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1, "warmup": 0,
                                                     **({"prefills": asked} if asked else {})}})
    bench = lab.bench(budgets)
    bench.settings = settings
    measure(bench, SimpleNamespace(name="a"), [])
    assert {args[1].prefills for args in lab.args if args[0] == "latency"} == {timed}


def test_kl_details(lab):
    _, details = measure(lab.bench(objectives=("kl", "weight_mb")), SimpleNamespace(name="a"), [])
    assert details["kl"] == {"kl_mean": 0.5}
