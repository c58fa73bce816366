"""A study on the llama.cpp target, end to end on the tiny model: auto chooses llama.cpp, the space holds only
what GGUF serves, every figure comes from llama.cpp (A/B ratios against the uncompressed GGUF), the recipe
names its target, and apply ships model.gguf, loads it fresh and re-measures it."""
from __future__ import annotations

import json

import llama_cpp  # noqa: F401  (required: a broken install fails here)
import optuna
import yaml

import cli
from planner.storage import open_storage
from targets.llamacpp import target as llamacpp_target
from targets.llamacpp.runtime import serving_threads


def test_a_latency_budgeted_llama_cpp_study_ships_a_gguf(tiny_study_file, tmp_path, capsys, monkeypatch):
    text = tiny_study_file.read_text().replace('target = "transformers"', 'target = "auto"')
    tiny_study_file.write_text(text.replace('methods = ["none", "rtn", "dynamic-int8"]',
                                            'methods = ["none", "rtn", "gptq", "dynamic-int8", "bnb"]'))
    code = cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "5", "--latency-budget", "5x", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))
    assert study.user_attrs["target"] == "llama.cpp"
    measured = [t for t in study.trials if "measurements" in t.user_attrs]
    assert measured
    for trial in measured:
        details, metrics = trial.user_attrs["measurements"], trial.user_attrs["metrics"]
        assert details["runtime"]["target"] == "llama.cpp" and details["memory"]["method"] == "gguf_tensor_bytes"
        assert metrics["decode_ratio"] > 0 and metrics["decode_ms_p50"] > 0 and metrics["disk_bytes"] > metrics["weight_bytes"]
        # rounds (the 2 repeats, more while the interval straddled the budget) of 3 runs, R C R then C R C:
        # the reference's runs are the even ones of the 3 x rounds, x new tokens
        rounds = details["latency"]["rounds"]
        served = serving_threads()  # the study left threads unset: llama-cpp-python's own counts, recorded
        assert (details["latency"]["threads"], details["latency"]["batch_threads"]) == (served.decode, served.batch)
        assert rounds >= 2 and details["latency"]["reference_decode"]["n"] == (3 * rounds + 1) // 2 * 4
        assert details["latency"]["decode"]["n"] == 3 * rounds // 2 * 4 and len(details["latency"]["decode_rounds"]) == rounds
        # no prefill budget: one prefill a run, the one its decode needs
        assert details["latency"]["protocol"]["prefills"] == 1 and details["latency"]["prefill"]["n"] == 3 * rounds // 2
        # only GGUF's grids: no bitsandbytes, no dynamic int8, blocks of 32
        for stage in trial.user_attrs["stages"]:
            if stage["technique"] == "quantization":
                assert stage["spec"]["method"] in ("rtn", "gptq") and stage["spec"]["grid"] == "gguf"
        if "skipped_perplexity" in trial.user_attrs:  # over 1.5x the budget on a busy machine: rightly not scored
            continue
        assert metrics["perplexity"] > 1 and details["perplexity"]["dtype"] == "gguf", trial.user_attrs
    assert any("skipped_perplexity" not in t.user_attrs for t in measured)  # scored in llama.cpp, not all skipped
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe["provenance"]["target"] == "llama.cpp"

    # apply times as the recipe's budgets say: given a prefill budget, the runtime's own count of prefills
    budgeted = {**recipe, "budget": recipe["budget"] + [{"kind": "prefill", "limit": 1e9, "relative": None,
                                                         "text": "1000000s"}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(budgeted))
    timed_with = []
    real_time_ab = llamacpp_target.time_ab
    monkeypatch.setattr(llamacpp_target, "time_ab", lambda *a, **k: timed_with.append(a[2].prefills) or real_time_ab(*a, **k))
    code = cli.main(["apply", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "deploy")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert timed_with and set(timed_with) == {None}
    assert (tmp_path / "deploy" / "model.gguf").is_file() and (tmp_path / "deploy" / "recipe.yaml").is_file()
    assert "shipped" in out and "model.gguf for llama.cpp, loaded fresh and re-measured" in out
    assert "the uncompressed model in the same run" in out
    # how to serve it says the thread counts its figures were timed with
    assert f"llama_cpp.Llama('{tmp_path / 'deploy' / 'model.gguf'}', {serving_threads().as_kwargs()})" in out

    code = cli.main(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db"])
    out = capsys.readouterr().out
    assert code == 0 and "study tiny: 5 trials, measured in llama.cpp" in out and "decode x" in out
    code = cli.main(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--json"])
    assert json.loads(capsys.readouterr().out)["target"] == "llama.cpp"

    # the study keeps its target: reopening it for transformers is refused before anything is written
    code = cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "6", "--latency-budget", "5x",
                     "--target", "transformers", "-q"])
    assert code == 2 and "measures candidates for target llama.cpp, not transformers" in capsys.readouterr().err
