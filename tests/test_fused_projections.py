"""Decoders with fused projections (Phi-3: one q/k/v projection and one gate/up projection; GLM-4: fused
gate/up; GPT-NeoX: q/k/v interleaved per head): fused MLPs are cut like any other, and the cuts the surgery
cannot make are left out of the space up front, with one line saying why, so a study with every technique on
has no failed trial. (tests/test_fused_slicing.py proves the cuts exact and the pruned models reloadable.)"""
from __future__ import annotations

import optuna
import pytest

import cli
from planner.storage import open_storage
from tests.conftest import TINY_EVALUATION, make_tiny_tokenizer

SPACE = TINY_EVALUATION + """
[space.distillation]
enabled = [true]  # always on: the sampler alone may leave it off in 8 trials, and a cut student is cut again
depth_keep = [1.0, 0.5]
mlp_keep = [1.0, 0.5]
heads_keep = [1.0, 0.5]
steps = [2]
batch_size = [2]
seq_len = [32]
importance_samples = 2
importance_seq_len = 32
[space.pruning]
depth_keep = [1.0, 0.5]
mlp_keep = [1.0, 0.5]
heads_keep = [1.0, 0.5]
calibration_samples = 2
calibration_seq_len = 32
[space.quantization]
methods = ["none", "rtn"]
"""


HEAD_WIDTH = "heads_keep: 0.5 left out: {} derives the head width from hidden size / heads"
MLP_LEFT_OUT = "mlp_keep: 0.5 left out"


@pytest.mark.parametrize("arch, left_out", [
    # Phi3Config states no head_dim, but Phi-3 reads it once the cut writes it: its fused q/k/v loses heads.
    ("phi3", []),
    ("glm4", []),
    ("gpt_neox", [f"space.pruning.{HEAD_WIDTH.format('gpt_neox')}",
                  f"space.distillation.{HEAD_WIDTH.format('gpt_neox')}"]),
])
def test_fused_projections_leave_impossible_cuts_out_and_no_trial_fails(arch, left_out, tmp_path, text_corpus_dir,
                                                                       monkeypatch, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "cache"))
    tokenizer = make_tiny_tokenizer()
    kv_heads = {} if arch == "gpt_neox" else {"num_key_value_heads": 2}  # GPT-NeoX has no such field
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=1, **kv_heads)
    model_dir = tmp_path / arch
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    study_file = tmp_path / "study.toml"
    study_file.write_text(f'model = "{model_dir}"\ndata = "{text_corpus_dir}"\nstudy = "fused"\n'
                          f'storage = "sqlite:///{tmp_path}/fused.db"\nrecipe = "{tmp_path}/recipe.yaml"\n' + SPACE)
    code = cli.main(["search", "--study-file", str(study_file), "--trials", "8"])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    study = optuna.load_study(study_name="fused", storage=open_storage(f"sqlite:///{tmp_path}/fused.db"))
    assert [t.user_attrs.get("failure") for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE] == []
    for line in left_out:
        assert line in out, out
    assert MLP_LEFT_OUT not in out, out  # fused MLPs are cut
    assert sum("_keep: 0.5 left out" in line for line in out.splitlines()) == len(left_out), out
    techniques = [{s["technique"] for s in t.user_attrs["stages"]} for t in study.trials]
    assert any("pruning" in t for t in techniques) and any("distillation" in t for t in techniques)
    assert any("mlp 0.5" in t.user_attrs["label"] for t in study.trials)  # a seeded shape: the MLP cut ran
