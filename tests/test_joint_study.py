"""A joint study on a tiny model: every technique on, students screened at the first rung, the better one
continued to the next from its cached run, trials that count are distinct candidates."""
from __future__ import annotations

import optuna

from planner import rungs, workers
from planner.settings import make_settings, read_study_file
from planner.study import join, prepare
from planner.trial import objective

SPACE = """
[space.distillation]
enabled = [true]
depth_keep = [0.5]
mlp_keep = [1.0, 0.5]
steps = [2, 4]
batch_size = [2]
seq_len = [32]
importance_samples = 2
importance_seq_len = 32
[space.pruning]
enabled = [false]
[space.quantization]
methods = ["none", "rtn"]
"""


def test_the_better_student_of_a_rung_continues_its_cached_run_and_the_other_is_a_twin(tiny_study_file):
    text = tiny_study_file.read_text()
    tiny_study_file.write_text(text[:text.index("[space.distillation]")] + SPACE)
    bench = prepare(make_settings(read_study_file(tiny_study_file), {"trials": 3}))
    study = optuna.create_study(directions=["minimize"] * 3)
    join(bench, study)
    for mlp in (1.0, 0.5, 1.0, 0.5):  # two students, each proposed twice with the same quantization
        study.enqueue_trial({"distillation.mlp_keep": mlp, "quantization.method": "none"})
    workers.run_trials(study, objective(bench), target=3, say=lambda _: None)

    trials = study.get_trials(deepcopy=False)
    steps = [t.user_attrs["stages"][0]["spec"]["steps"] for t in trials if "stages" in t.user_attrs]
    assert steps[:2] == [2, 2]  # both students screened at the first rung
    better = 0 if trials[0].values[0] < trials[1].values[0] else 1
    promoted = trials[2 + better]
    assert promoted.user_attrs["stages"][0]["spec"]["steps"] == 4  # the better of two at the rung moves up
    run = promoted.user_attrs["training"]["distillation"]
    assert (run["resumed_from"], run["trained_steps"], run["cache_hit"]) == (2, 2, False)  # only the extra steps
    if better == 1:  # the other, proposed again, stays at its rung: the twin of its first trial, not counted
        assert trials[2].user_attrs["duplicate_of"] == 0 and not workers.answered(trials[2])
    assert sum(workers.answered(t) for t in trials) == 3
    assert rungs.rung_counts(study) == {"distillation": {2: 2, 4: 1}}
