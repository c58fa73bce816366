"""Multi-fidelity rungs: how many steps a trial's student (or healed cut) trains, from what the study measured."""
from __future__ import annotations

import optuna
import pytest
import torch

from evaluators.corpus import Document
from planner import rungs
from planner.recipes import Stage
from search_spaces.calibration import training_windows
from search_spaces.distillation import DistillSpace, DistillSpec
from search_spaces.pruning import PruneSpace, PruneSpec
from tests.conftest import SAMPLE_TEXT, make_tiny_tokenizer

SPACES = {"distillation": DistillSpace(steps=(4, 8, 16)), "pruning": PruneSpace(heal_steps=(3, 6))}


def student(depth: float, steps: int = 4) -> Stage:
    return Stage("distillation", DistillSpec(depth_keep=depth, steps=steps))


def stored(stages: list[Stage]) -> list[dict]:
    return [{"technique": s.technique, "spec": s.spec.to_dict()} for s in stages]


def study_with(*measured: tuple[list[Stage], float, bool]) -> optuna.Study:
    """A study holding measured trials: (stages, first objective value, feasible)."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    for stages, score, ok in measured:
        study.add_trial(optuna.trial.create_trial(
            values=[score, 1.0], constraints={"latency": -0.1 if ok else 0.2},
            user_attrs={"stages": stored(stages), "metrics": {"perplexity": score}}))
    return study


def steps_of(study, stages) -> list[int]:
    return [s.spec.steps if s.technique == "distillation" else s.spec.heal_steps
            for s in rungs.assign(study, stages, SPACES)]


def test_a_new_student_is_screened_at_the_first_rung_whatever_the_sampler_said():
    assert steps_of(study_with(), [student(0.5, steps=16)]) == [4]


def test_a_lone_student_is_not_promoted_until_it_beats_another():
    study = study_with(([student(0.5)], 30.0, True))
    assert steps_of(study, [student(0.5)]) == [4]  # its cached 4-step run, reused


def test_the_better_half_of_a_rung_moves_up_and_the_rest_stay():
    study = study_with(([student(0.5)], 30.0, True), ([student(0.7)], 20.0, True), ([student(0.8)], 25.0, True),
                       ([student(0.6)], 40.0, True))
    assert steps_of(study, [student(0.7)]) == [8]
    assert steps_of(study, [student(0.8)]) == [8]  # 2 of 4: the best half
    assert steps_of(study, [student(0.5)]) == [4]
    assert steps_of(study, [student(0.6)]) == [4]


def test_a_student_keeps_the_highest_rung_it_reached_and_climbs_from_there():
    study = study_with(([student(0.5)], 30.0, True), ([student(0.7)], 20.0, True),
                       ([student(0.7, 8)], 15.0, True), ([student(0.8, 8)], 18.0, True),
                       ([student(0.8)], 19.0, True))
    assert steps_of(study, [student(0.7)]) == [16]  # best at 8 steps of two lineages there
    assert steps_of(study, [student(0.8)]) == [8]  # reached 8; second of two at 8: stays
    last = study_with(([student(0.7, 16)], 10.0, True), ([student(0.5, 16)], 12.0, True))
    assert steps_of(last, [student(0.7)]) == [16]  # the last rung is as far as it goes


def test_only_feasible_scores_rank_a_student():
    study = study_with(([student(0.5)], 10.0, False), ([student(0.7)], 20.0, True), ([student(0.8)], 30.0, True))
    assert steps_of(study, [student(0.5)]) == [4]  # best perplexity, but over the budget in every trial
    assert steps_of(study, [student(0.7)]) == [8]


def test_a_healed_cut_is_its_own_lineage_under_the_stages_before_it():
    cut = Stage("pruning", PruneSpec(mlp_keep=0.5, heal_steps=3))
    other = Stage("pruning", PruneSpec(mlp_keep=0.75, heal_steps=3))
    study = study_with(([cut], 10.0, True), ([other], 20.0, True))
    assert steps_of(study, [cut]) == [6]
    assert steps_of(study, [student(0.5), cut]) == [4, 3]  # after a student, a new lineage: screened
    assert steps_of(study, [Stage("pruning", PruneSpec(mlp_keep=0.5))]) == [0]  # no healing: nothing to raise
    assert rungs.rung_counts(study) == {"pruning": {3: 2}}


def test_training_windows_do_not_depend_on_how_many_are_asked_for():
    tokenizer, docs = make_tiny_tokenizer(), [Document("a", SAMPLE_TEXT * 10), Document("b", SAMPLE_TEXT * 3)]
    ten = training_windows(tokenizer, docs, 0, 10, 16, seed=3)
    assert ten.shape == (10, 16)
    assert torch.equal(ten[:4], training_windows(tokenizer, docs, 0, 4, 16, seed=3))
    assert torch.equal(ten[4:], training_windows(tokenizer, docs, 4, 6, 16, seed=3))
    assert not torch.equal(ten, training_windows(tokenizer, docs, 0, 10, 16, seed=4))
    with pytest.raises(ValueError, match="no document"):
        training_windows(tokenizer, [Document("s", "Shall I")], 0, 1, 64)
