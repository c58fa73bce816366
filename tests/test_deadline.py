"""A deadline is an end: a candidate the study's finished trials predict to run past it is not started
(planner/deadline.py), and what is not started is not counted, not a twin, and said."""
from __future__ import annotations

import optuna
import pytest

from planner import deadline, workers

DISTIL = {"technique": "distillation", "spec": {"depth_keep": 0.8, "steps": 16}}
QUANT = {"technique": "quantization", "spec": {"method": "llama-quant", "allocation": {"fill": 1.0}}}


def _student(depth: float, steps: int) -> dict:
    return {"technique": "distillation", "spec": {"depth_keep": depth, "steps": steps}}


def _add(study, stages, total, trained=0, pace=38.0, **attrs):
    training = {"distillation": {"trained_steps": trained, "seconds_per_step": pace,
                                 "train_seconds": trained * pace}} if trained else None
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, values=[1.0],
        user_attrs={"stages": stages, "seconds": {"total": total}, "metrics": {"weight_bytes": 1},
                    **({"training": training} if training else {}), **attrs}))


@pytest.fixture
def study():
    made = optuna.create_study()
    _add(made, [DISTIL, QUANT], 1600.0, trained=16)  # 608 s of training, 992 s the rest (tables, rounding, measure)
    return made


def test_a_new_student_is_predicted_from_the_first_of_its_kind(study):
    seconds, source = deadline.predicted_seconds(study, [_student(0.7, 16), QUANT])
    assert seconds == pytest.approx(16 * 38.0 + 992.0) and source == "trial 0 of its kind"


def test_a_promoted_rung_trains_only_the_steps_its_lineage_has_not(study):
    seconds, _ = deadline.predicted_seconds(study, [_student(0.8, 48), QUANT])
    assert seconds == pytest.approx(32 * 38.0 + 992.0)  # continued from the cached 16-step run


def test_a_repeat_on_the_same_stages_before_the_last_trains_nothing(study):
    _add(study, [DISTIL, QUANT], 420.0)  # a second quantization of the cached student: cheaper
    other = {**QUANT, "spec": {**QUANT["spec"], "allocation": {"fill": 0.8}}}
    seconds, source = deadline.predicted_seconds(study, [DISTIL, other])
    assert seconds == pytest.approx(420.0) and source == "trial 1, on the same stages before the last"


def test_a_repeat_is_predicted_without_the_tables_its_models_first_trial_computed(study):
    """The 1B study of docs/benchmarks.md section 21: repeats on a cached student were predicted at their first
    trial's 12.3 minutes, tables included, which a repeat reads from the cache."""
    study = optuna.create_study()
    # its screen's 35 s are in its total: a repeat judges by the float figure that trial scored
    _add(study, [DISTIL, QUANT], 1600.0, trained=16, measurements={"runtime": {"tables_seconds": 500.0}},
         seconds={"total": 1600.0, "screen": 35.0})
    other = {**QUANT, "spec": {**QUANT["spec"], "allocation": {"fill": 0.8}}}
    seconds, source = deadline.predicted_seconds(study, [DISTIL, other])
    assert seconds == pytest.approx(1600.0 - 608.0 - 500.0 - 35.0)
    assert source == "trial 0, on the same stages before the last"
    _add(study, [QUANT], 1200.0, measurements={"runtime": {"tables_seconds": 870.0, "carriable_seconds": 700.0}})
    assert deadline.predicted_seconds(study, [other])[0] == pytest.approx(330.0)  # the full model again
    # a student not seen yet computes its own tables: predicted from the first trials, less what it carries only
    seconds, _ = deadline.predicted_seconds(study, [_student(0.7, 16), QUANT])
    assert seconds == pytest.approx(16 * 38.0 + 992.0)


def test_a_new_kind_trains_at_the_measured_pace_then_costs_what_its_last_stage_did(study):
    _add(study, [QUANT], 1200.0)  # the full model quantized
    cut = {"technique": "pruning", "spec": {"mlp_keep": 0.75, "heal_steps": 0}}
    seconds, source = deadline.predicted_seconds(study, [_student(0.7, 48), cut, QUANT])
    assert seconds == pytest.approx(48 * 38.0 + (992.0 + 1200.0) / 2)
    assert source == "trials 0, 1 ending in its last stage"


def test_a_technique_not_trained_yet_trains_at_another_ones_pace(study):
    healed = {"technique": "pruning", "spec": {"depth_keep": 0.9, "heal_steps": 16}}
    seconds, _ = deadline.predicted_seconds(study, [DISTIL, healed, QUANT])
    assert seconds == pytest.approx(16 * 38.0 + 992.0)  # the student cached; the healing at distillation's pace


def test_no_prediction_without_a_trial_of_its_kind_or_a_pace(study):
    rtn = {"technique": "quantization", "spec": {"method": "rtn"}}
    assert deadline.predicted_seconds(study, [rtn]) is None  # no trial ends in it: the first of a kind runs
    assert deadline.predicted_seconds(optuna.create_study(), [DISTIL, QUANT]) is None
    screened = optuna.create_study()
    _add(screened, [DISTIL, QUANT], 90.0, trained=16, screened={"reason": "far worse"})
    # a screened student says nothing of a new one's quantization and measuring
    assert deadline.predicted_seconds(screened, [_student(0.7, 16), QUANT]) is None
    for attr in ("rejected", "duplicate_of", workers.NOT_STARTED):  # draws that built nothing teach nothing
        drawn = optuna.create_study()
        _add(drawn, [DISTIL, QUANT], 0.1, trained=16, **{attr: "x"})
        assert deadline.predicted_seconds(drawn, [_student(0.7, 16), QUANT]) is None


def test_too_late_says_what_it_predicted_and_what_was_left(study):
    assert deadline.too_late(study, [_student(0.7, 16), QUANT], 1601.0) is None
    assert deadline.too_late(study, [_student(0.7, 16), QUANT], 600.0) == (
        "predicted 26.7 min (from trial 0 of its kind), 10.0 min left before the deadline: not started")
    assert deadline.too_late(study, [{"technique": "quantization", "spec": {"method": "rtn"}}], 0.0) is None


def test_a_derived_candidate_is_not_predicted_to_spend_what_it_carries_from_the_source_models_trial(study):
    """The full model's llama-quant trial spent 700 of its 1200 s on tables a large cut carries: a cut of a kind
    not seen yet is predicted from it without them; the full model quantized again is not."""
    _add(study, [QUANT], 1200.0, measurements={"runtime": {"carriable_seconds": 700.0}})
    cut = {"technique": "pruning", "spec": {"mlp_keep": 0.75, "heal_steps": 0}}
    seconds, source = deadline.predicted_seconds(study, [cut, QUANT])
    assert seconds == pytest.approx((992.0 + 500.0) / 2) and source == "trials 0, 1 ending in its last stage"
    other = {**QUANT, "spec": {**QUANT["spec"], "allocation": {"fill": 0.8}}}
    assert deadline.predicted_seconds(study, [other])[0] == pytest.approx(1200.0)


def test_a_kind_seen_only_screened_is_predicted_as_a_new_kind(study):
    """The 1B study's trial 57 (section 24): a healed cut whose kind's only trials were screened in float started
    unpredicted a minute before the deadline and ran past it; it is predicted from what its last stage costs."""
    healed = {"technique": "pruning", "spec": {"depth_keep": 0.9, "heal_steps": 16}}
    _add(study, [{"technique": "pruning", "spec": {"depth_keep": 0.8}}, QUANT], 110.0, screened={"reason": "far worse"})
    seconds, source = deadline.predicted_seconds(study, [healed, QUANT])
    assert source == "trial 0 ending in its last stage" and seconds >= 992.0
