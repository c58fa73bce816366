"""The toy accuracy objective (a scorer and one `Objective`, tests/toys/planner_toys/objective.py) and the toy
deployment target (one class, planner_toys/target.py), registered through their entry points, go through a real
study, review, HTML report, recipe and apply with nothing else changed. If either needs another edit, the
registries leak and these tests say where."""
from __future__ import annotations

import json

import optuna
import yaml

import cli
from planner import objectives
from planner.storage import open_storage
from targets.transformers_target import measure_torch


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_maximised_accuracy_objective_in_one_line(tiny_study_file, tmp_path, capsys, toys):
    tiny_study_file.write_text(tiny_study_file.read_text().replace('"dynamic-int8"', '"gptq"'))
    code, out, err = run(["search", "--study-file", tiny_study_file, "--trials", "4", "-q",
                          "--objectives", "token_accuracy,weight_mb"], capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    measured = [t for t in study.trials if "token_accuracy" in t.user_attrs.get("metrics", {})]
    assert len(measured) >= 4
    for trial in measured:
        row = trial.user_attrs["metrics"]
        assert 0.0 <= row["token_accuracy"] <= 1.0 and trial.values[0] == row["token_accuracy"]
        assert trial.user_attrs["measurements"]["token_accuracy"]["total"] > 0
        assert "perplexity" in row  # always scored, from the same windows
    assert "objectives: token acc (maximized), weight MB (minimized)" in out
    # The recommendation is the front's best by the objective's own direction: the highest accuracy.
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    best = max(t.values[0] for t in measured if all(v <= 0 for v in t.constraints.values()))
    assert recipe["metrics"]["summary"]["token_accuracy"] == best

    code, out, err = run(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--json",
                          ], capsys)
    assert code == 0, err
    rows = json.loads(out)["front"]
    assert rows and all("token_accuracy" in row for row in rows)
    code, out, err = run(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--html",
                          tmp_path / "report.html"], capsys)
    assert code == 0, err
    page = (tmp_path / "report.html").read_text()
    assert "token acc" in page and "higher is better" in page


def test_a_target_in_one_class(tiny_study_file, tmp_path, capsys, toys):
    tiny_study_file.write_text(tiny_study_file.read_text().replace('target = "transformers"', 'target = "toy"')
                               .replace('"dynamic-int8"', '"gptq"'))
    code, out, err = run(["search", "--study-file", tiny_study_file, "--trials", "3", "-q"], capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))
    assert study.user_attrs["target"] == "toy"
    measured = [t for t in study.trials if "measurements" in t.user_attrs]
    # the target's prepare hook ran before the first measurement of the model
    assert measured and all(t.user_attrs["measurements"]["runtime"] == {"target": "toy", "prepared": True}
                            for t in measured)
    # its space is its own grid's: every quantized candidate on the toy grid
    quantized = [s["spec"] for t in measured for s in t.user_attrs["stages"] if s["technique"] == "quantization"]
    assert all(spec["grid"] == toys.grid.INT6.name for spec in quantized)
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe["provenance"]["target"] == "toy"
    code, out, err = run(["apply", tmp_path / "recipe.yaml", "--out", tmp_path / "deploy"], capsys)
    assert code == 0, err
    assert f"the toy runtime opens {tmp_path / 'deploy'}" in out


def test_the_transformers_target_counts_decompressed_weights_as_resident_and_packed_ones_as_disk():
    """compressed-tensors layers are decompressed to float by from_pretrained: the memory objective and budget
    see what transformers holds, the packed size is the disk figure."""
    from conftest import SAMPLE_TEXT, make_tiny_llama, make_tiny_tokenizer
    from evaluators.corpus import Document
    from evaluators.latency import LatencyProtocol
    from evaluators.memory import weight_bytes
    from evaluators.perplexity import PerplexityProtocol
    from search_spaces.base import BuildContext
    from search_spaces.quantization import QuantSpec, apply
    from targets.base import Request

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    dense = weight_bytes(model).total_bytes
    quantized = apply(model, QuantSpec(method="rtn", bits={"attn": 4, "mlp": 4}, group_size=32),
                      BuildContext(tokenizer=tokenizer, calibration=()))
    packed = weight_bytes(quantized).total_bytes
    request = Request(quantized, tokenizer, [Document("held-out", SAMPLE_TEXT * 3)], PerplexityProtocol(32, 32),
                      LatencyProtocol(), frozenset({"memory", "perplexity"}), objectives.scorers({"perplexity"}, None))
    measured = measure_torch(request, quantized, "rtn")
    assert packed < dense
    assert measured.row["weight_bytes"] == dense and measured.row["disk_bytes"] == packed
    assert measured.details["memory"]["decompressed_on_load"] is True
    assert measured.row["perplexity"] > 1 and measured.skipped is None
