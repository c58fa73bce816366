"""A study's `compare`: the target's stock tool (llama-quantize presets) measured beside the candidates, and which
measured candidates dominate each setting. Decided from stored figures alone (the measuring is end to end in
tests/test_llamacpp_allocated.py)."""
from __future__ import annotations

import optuna
import pytest

from planner.budgets import parse_budget
from planner.errors import PlannerError
from planner.outcome import comparable, decide
from planner.report import format_outcome, outcome_to_dict
from planner.settings import StudySettings

OBJECTIVES = ("kl", "decode_ms_p50", "weight_mb")
BASELINE = {"kl": 0.0, "decode_ms_p50": 10.0, "weight_mb": 500.0, "weight_bytes": 500_000_000, "perplexity": 20.0}


def row(kl, ms, ratio, mb, **extra):
    return {"kl": kl, "decode_ms_p50": ms, "decode_ratio": ratio, "weight_mb": mb, "weight_bytes": int(mb * 1e6),
            "perplexity": 21.0, "stages": extra.pop("stages", "x"), **extra}


def study_with(trials: list[dict], stock: dict, budgets) -> optuna.Study:
    study = optuna.create_study(directions=["minimize"] * 3)
    study.set_metric_names(list(OBJECTIVES))
    for metrics in trials:
        values = [metrics[n] for n in OBJECTIVES]
        study.add_trial(optuna.trial.create_trial(
            values=values, constraints={b.kind: b.violation(metrics) for b in budgets},
            user_attrs={"metrics": metrics, "label": metrics["stages"], "stages": []}))
    study.set_user_attr("stock", stock)
    return study


def test_a_preset_is_dominated_only_by_candidates_no_worse_in_every_objective_latency_by_its_ratio():
    budgets = [parse_budget("memory", "110MB").resolve(BASELINE)]
    # trial 0: better KL, fewer bytes, faster ratio (its ms read slower: another run, a busier machine)
    # trial 1: better KL and bytes, slower ratio -> does not dominate
    # trial 2: better in all three -> dominates; trial 3: better KL and ratio, more bytes -> does not
    trials = [row(0.03, 4.2, 0.33, 101.0, stages="a"), row(0.02, 3.0, 0.40, 100.0, stages="b"),
              row(0.01, 3.0, 0.30, 103.0, stages="c"), row(0.01, 3.0, 0.30, 104.0, stages="d")]
    stock = {"Q4_K_M": {"label": "llama.cpp Q4_K_M + imatrix", "metrics": row(0.05, 3.4, 0.35, 103.7)},
             "Q4_0": {"label": "llama.cpp Q4_0 + imatrix", "metrics": row(0.25, 2.6, 0.27, 90.1)},
             "IQ1_S": {"label": "llama.cpp IQ1_S", "failure": "QuantizeError: no"}}
    outcome = decide(study_with(trials, stock, budgets), budgets, BASELINE)
    compared = {c.name: c for c in outcome.compared}
    assert compared["Q4_K_M"].dominated_by == [0, 2] and compared["Q4_K_M"].meets_budget
    assert compared["Q4_0"].dominated_by == [] and compared["Q4_0"].meets_budget  # the fastest: nothing beats it
    assert compared["IQ1_S"].failure == "QuantizeError: no" and not compared["IQ1_S"].meets_budget
    assert outcome.recommended.number == 2
    text = format_outcome(outcome)
    assert "llama.cpp Q4_K_M + imatrix: meets the budget; dominated by trial 0, 2*" in text
    assert "llama.cpp Q4_0 + imatrix: meets the budget; no candidate dominates it" in text
    assert "llama.cpp IQ1_S: not measured: QuantizeError: no" in text
    shown = {c["name"]: c for c in outcome_to_dict(outcome)["compared"]}
    assert shown["Q4_K_M"]["dominated_by"] == [0, 2] and shown["Q4_0"]["weight_mb"] == 90.1


def test_a_preset_over_the_budget_says_so():
    budgets = [parse_budget("memory", "95MB").resolve(BASELINE)]
    stock = {"Q4_K_M": {"label": "llama.cpp Q4_K_M + imatrix", "metrics": row(0.05, 3.4, 0.35, 103.7)}}
    outcome = decide(study_with([row(0.06, 3.0, 0.30, 90.0)], stock, budgets), budgets, BASELINE)
    assert not outcome.compared[0].meets_budget and outcome.compared[0].dominated_by == []
    assert "over the budget; no candidate dominates it" in format_outcome(outcome)


def test_latency_is_compared_on_the_same_run_ratio_where_measured_else_on_ms():
    assert comparable(OBJECTIVES, row(0.1, 4.0, 0.3, 100.0), BASELINE) == (0.1, 3.0, 100.0)
    no_ratio = {"kl": 0.1, "decode_ms_p50": 4.0, "weight_mb": 100.0}
    assert comparable(OBJECTIVES, no_ratio, BASELINE) == (0.1, 4.0, 100.0)


def test_compare_names_are_checked():
    assert StudySettings(compare="Q4_K_M, Q4_0").compare_names() == ("Q4_K_M", "Q4_0")
    assert StudySettings(compare=["Q8_0"]).compare_names() == ("Q8_0",)
    assert StudySettings().compare_names() == ()
    with pytest.raises(PlannerError, match="'Q4_0' is listed twice"):
        StudySettings(compare="Q4_0,Q4_0")
    with pytest.raises(PlannerError, match="comma-separated list"):
        StudySettings(compare="Q4_0,,Q8_0")


def test_the_html_report_draws_and_tabulates_the_stock_settings(tmp_path):
    from planner.html_report import write_html_report

    budgets = [parse_budget("memory", "110MB").resolve(BASELINE)]
    stock = {"Q4_K_M": {"label": "llama.cpp Q4_K_M + imatrix", "metrics": row(0.05, 3.4, 0.35, 103.7)}}
    outcome = decide(study_with([row(0.03, 3.0, 0.33, 101.0)], stock, budgets), budgets, BASELINE)
    page = write_html_report(outcome, tmp_path / "r.html").read_text()
    assert "stock tool (compare)" in page and "<th>stock: llama.cpp Q4_K_M + imatrix</th>" in page


def test_dominance_holds_beyond_the_timings_intervals_and_overlapping_ones_are_only_level():
    """'Dominates' means no worse in every objective beyond its interval: a candidate with better KL and bytes
    whose decode interval overlaps the preset's is level on decode, not shown faster, and is said so."""
    budgets = [parse_budget("memory", "110MB").resolve(BASELINE)]
    preset = row(0.05, 3.4, 0.504, 103.7, decode_interval=[0.495, 0.507])
    trials = [row(0.04, 3.0, 0.488, 101.0, stages="overlapping", decode_interval=[0.476, 0.500]),  # 0: level
              row(0.04, 3.0, 0.480, 101.0, stages="clear", decode_interval=[0.470, 0.495]),  # 1: high == low: dominates
              row(0.04, 3.0, 0.510, 101.0, stages="slower", decode_interval=[0.508, 0.520]),  # 2: clearly slower
              row(0.05, 3.0, 0.470, 103.7, stages="only-level", decode_interval=[0.460, 0.500])]  # 3: better nowhere clear
    outcome = decide(study_with(trials, {"Q4_K_M": {"label": "llama.cpp Q4_K_M + imatrix", "metrics": preset}},
                                budgets), budgets, BASELINE)
    [compared] = outcome.compared
    assert (compared.dominated_by, compared.level_with) == ([1], [0])
    assert ("llama.cpp Q4_K_M + imatrix: meets the budget; dominated by trial 1; better, timing level within the "
            "intervals: trial 0") in format_outcome(outcome)
    assert outcome_to_dict(outcome)["compared"][0]["level_with"] == [0]
