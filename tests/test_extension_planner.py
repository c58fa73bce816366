"""Extension in one module: a toy accuracy objective (a scorer + one registry line) and a toy deployment target
(one class + one register line) go through a real study, review, HTML report, recipe and apply with nothing
else changed. If adding either needs another edit, the registries leak and these tests say where."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml

import cli
from evaluators.scoring import WindowScorer
from planner import objectives
from planner.objectives import ACCURACY, MAXIMIZE, Objective
from planner.storage import open_storage
from targets import TARGETS
from targets.base import Measured, Target
from targets.transformers_target import TRANSFORMERS, measure_torch


class TokenAccuracy(WindowScorer):
    """Fraction of scored positions whose most likely token is the one that follows: higher is better."""

    name = "token_accuracy"

    def __init__(self, setup):
        self.right = self.total = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.right += int((logits.argmax(dim=-1) == targets).sum())
        self.total += targets.numel()

    def result(self, protocol, encoded, device, dtype, start):
        accuracy = self.right / self.total
        return type("Result", (), {"to_dict": lambda _: {"right": self.right, "total": self.total},
                                   "figures": lambda _: {"token_accuracy": accuracy}})()


TOKEN_ACCURACY = Objective("token_accuracy", "token acc", "fraction", "{:.3f}", "token_accuracy", brief="acc",
                           kind=ACCURACY, direction=MAXIMIZE, scorer=TokenAccuracy,
                           unmeasured=lambda baseline: 0.0)


class ToyTarget(Target):
    """Ships a plain checkpoint and measures it as transformers does; says how to load it in its own words."""

    name, runtime, artifact = "toy", "toy runtime", "a toy folder"
    artifacts = frozenset({"compressed-tensors"})  # what its ship writes (transformers' checkpoint)
    prepared: list = []

    def prepare(self, request) -> None:
        self.prepared.append(request.model)

    def measure(self, request, model, label: str) -> Measured:
        measured = measure_torch(request, model, label)
        measured.details["runtime"] = {"target": self.name}
        return measured

    def ship(self, model, tokenizer, stages, out: Path) -> Path:
        return TRANSFORMERS.ship(model, tokenizer, stages, out)

    def measure_shipped(self, request, artifact: Path) -> Measured:
        return TRANSFORMERS.measure_shipped(request, artifact)

    def how_to_load(self, artifact: Path, latency) -> str:
        return f"the toy runtime opens {artifact}"


@pytest.fixture
def token_accuracy():
    objectives.register_figure(TOKEN_ACCURACY, before="decode_ms_p50")
    yield TOKEN_ACCURACY
    objectives.unregister_figure("token_accuracy")


@pytest.fixture
def toy_target():
    TARGETS.add(ToyTarget())
    yield TARGETS["toy"]
    TARGETS.pop("toy")


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_maximised_accuracy_objective_in_one_line(tiny_study_file, tmp_path, capsys, token_accuracy):
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


def test_a_target_in_one_class(tiny_study_file, tmp_path, capsys, toy_target):
    tiny_study_file.write_text(tiny_study_file.read_text().replace('target = "transformers"', 'target = "toy"')
                               .replace('"dynamic-int8"', '"gptq"'))
    code, out, err = run(["search", "--study-file", tiny_study_file, "--trials", "3", "-q"], capsys)
    assert code == 0, err
    assert toy_target.prepared, "the target's prepare hook runs before the baseline"
    study = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))
    assert study.user_attrs["target"] == "toy"
    assert all(t.user_attrs["measurements"]["runtime"] == {"target": "toy"}
               for t in study.trials if "measurements" in t.user_attrs)
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
