"""Cheap before expensive: a candidate whose stages before the last (a student, a pruned cut) already score far
worse in float than the best measured candidate is recorded as screened, and never quantized, written or timed."""
from __future__ import annotations

import optuna
import pytest

import cli
import planner.trial as trial_module
from planner.candidates import Screened, build
from planner.outcome import decide
from planner.recipes import Stage
from planner.storage import open_storage
from search_spaces import BuildContext
from search_spaces.pruning import PruneSpec
from search_spaces.quantization import QuantSpec
from tests.conftest import SAMPLE_TEXT, make_tiny_llama, make_tiny_tokenizer


class Doc:
    def __init__(self, text):
        self.text = text


def _search(study_file, tmp_path, capsys) -> optuna.Study:
    code = cli.main(["search", "--study-file", str(study_file), "--trials", "8", "--target", "transformers",
                     "--objectives", "perplexity,weight_mb"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db")), out


@pytest.mark.parametrize("factor", [1e-3, 1e9])
def test_a_shaped_candidate_far_worse_in_float_is_screened_before_its_last_stage(factor, tiny_study_file, tmp_path,
                                                                                 capsys, monkeypatch):
    monkeypatch.setattr(trial_module, "SCREEN_FACTOR", factor)  # 1e-3: every shaped candidate is "far worse"
    study, out = _search(tiny_study_file, tmp_path, capsys)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
              and "duplicate_of" not in t.user_attrs and "rejected" not in t.user_attrs]
    screened = [t for t in trials if "screened" in t.user_attrs]
    shaped = [t for t in trials if len(t.user_attrs["stages"]) > 1]
    assert shaped, "the seeds hold shaped candidates (pruned and quantized)"
    if factor > 1:
        assert not screened and all("measurements" in t.user_attrs for t in trials)
        return
    first = min(t.number for t in trials if "measurements" in t.user_attrs)
    assert screened and {t.number for t in screened} == {t.number for t in shaped if t.number > first}
    best = min(t.user_attrs["metrics"]["perplexity"] for t in trials if "perplexity" in t.user_attrs["metrics"])
    for trial in screened:
        entry = trial.user_attrs["screened"]
        assert entry["float"]["perplexity"] > factor * best and "not quantized or measured" in entry["reason"]
        assert "measurements" not in trial.user_attrs and "perplexity" not in trial.user_attrs["metrics"]
        seconds = trial.user_attrs["seconds"]
        assert "screen" in seconds and "quantization" not in seconds  # the last stage never ran
        assert "not quantized or measured" in out
    outcome = decide(study, [], study.user_attrs["baseline"])
    assert not {row.number for row in outcome.front} & {t.number for t in screened}


def test_build_screens_only_before_a_last_stage_that_follows_another():
    model, tokenizer = make_tiny_llama(vocab_size=300), make_tiny_tokenizer()
    context = BuildContext(tokenizer=tokenizer, calibration=[Doc(SAMPLE_TEXT * 4)], progress=False)
    seen = []

    def refuse(shaped):
        seen.append(shaped.config.intermediate_size)
        return "far worse", {"perplexity": 1e6}

    quant = Stage("quantization", QuantSpec(method="dynamic-int8", bits={"attn": 8, "mlp": 8}))
    built = build(model, [quant], context, screen=refuse)  # a single stage: nothing before it to judge
    assert not seen and built.model is not None
    cut = Stage("pruning", PruneSpec(mlp_keep=0.5, calibration_samples=1, calibration_seq_len=8))
    with pytest.raises(Screened) as raised:
        build(model, [cut, quant], context, screen=refuse)
    assert seen == [32]  # judged on the cut model (64 -> 32 neurons), before quantization
    assert raised.value.figures == {"perplexity": 1e6} and "screen" in raised.value.seconds
    assert "pruning" in raised.value.seconds and "quantization" not in raised.value.seconds


def test_the_progress_line_gives_the_time_left_at_this_process_pace():
    from planner.study import eta

    assert eta(120.0, 2, 3) == "  [eta 3 min]"  # 60 s a trial, 3 left
    assert eta(20.0, 2, 3) == "  [eta 30 s]"
    assert eta(50.0, 0, 3) == "" and eta(50.0, 2, 0) == ""  # nothing to go on, or nothing left


def _judged(study, stages, perplexity, **attrs):
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, values=[perplexity or 1.0],
        user_attrs={"stages": stages, "metrics": {"perplexity": perplexity} if perplexity else {}, **attrs}))


def test_a_repeat_is_judged_by_the_float_figure_an_earlier_trial_scored_on_the_same_stages_before_its_last():
    """A repeat on a cached student or cut is not scored in float again (half a minute at 1.24 B): the figure the
    first trial on it scored, passed or screened, is on that trial."""
    from types import SimpleNamespace

    from planner.trial import UPSTREAM_FIGURES, screen

    student = {"technique": "distillation", "spec": {"depth_keep": 0.8, "steps": 16}}
    cut = {"technique": "pruning", "spec": {"mlp_keep": 0.5}}
    quant = {"technique": "quantization", "spec": {"method": "llama-quant"}}
    study = optuna.create_study()
    bench = SimpleNamespace(objectives=("perplexity", "weight_mb"))
    assert screen(bench, study, [student]) is None  # nothing measured yet: nothing to judge by
    _judged(study, [student, quant], 10.0, **{UPSTREAM_FIGURES: {"perplexity": 15.0}})
    _judged(study, [cut, quant], None, screened={"reason": "far worse", "float": {"perplexity": 45.0}})
    judge = screen(bench, study, [student])
    assert judge.known == 15.0 and judge(None) is None and judge.figures == {"perplexity": 15.0}  # 15 <= 2 x 10
    judge = screen(bench, study, [cut])
    reason, figures = judge(None)  # no model scored: a measurement would fail on None
    assert figures == {"perplexity": 45.0} and "over 2x the best measured (10.00)" in reason
    assert screen(bench, study, [{**student, "spec": {"depth_keep": 0.8, "steps": 48}}]).known is None  # a new rung
    assert screen(bench, study, [cut, student]).known is None


def test_a_study_records_the_float_figure_each_candidate_was_screened_by(tiny_study_file, tmp_path, capsys,
                                                                         monkeypatch):
    from planner.trial import UPSTREAM_FIGURES

    monkeypatch.setattr(trial_module, "SCREEN_FACTOR", 1e9)  # nothing screened: every shaped candidate is built
    study, _ = _search(tiny_study_file, tmp_path, capsys)
    judged = [t for t in study.trials if UPSTREAM_FIGURES in t.user_attrs]
    assert judged and all(len(t.user_attrs["stages"]) > 1 and "measurements" in t.user_attrs for t in judged)
    for trial in judged:
        assert trial.user_attrs[UPSTREAM_FIGURES]["perplexity"] > 0
