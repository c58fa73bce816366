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
