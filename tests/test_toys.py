"""The four toy extensions (tests/toys), each registered the documented way (one module ending in its register
call, one entry point in the plug-in package's pyproject), go through a one-trial search, `apply` and `review`
in fresh interpreters where only their entry points make them known: no test code registers anything there.

Each run is restricted to the toy (the only method, grid, objective or target it can draw), so the one trial is
the toy's and what `apply` ships was made by it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import TINY_EVALUATION, install_toys

from planner.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
ONLY_QUANTIZATION = """
[space.distillation]
enabled = [false]

[space.pruning]
enabled = [false]
"""
# toy -> (target, study file's quantization space, extra search flags)
RUNS = {
    "objective": ("transformers", 'methods = ["rtn"]\nbits = [4]\ngroup_sizes = [32]',
                  ["--objectives", "token_accuracy,weight_mb"]),
    "method": ("transformers", 'methods = ["toy-clipped"]\nbits = [4]\ngroup_sizes = [32]', []),
    "grid": ("toy", 'methods = ["rtn"]\ngrid = "toy-int6"\nbits = [6]\nhead_bits = [6]', []),
    "target": ("toy", 'methods = ["none"]', []),
}


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory) -> dict:
    """The environment of a process in which the toys are installed (their dist-info and package on its path)."""
    paths = install_toys(tmp_path_factory.mktemp("toys-site"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])}


def planner(env: dict, *argv) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "cli", *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(params=list(RUNS))
def toy_run(request, tmp_path, tiny_model_dir, text_corpus_dir, toy_env):
    """A one-trial search with one toy, then `apply` of its recipe and `review --json` of its study."""
    toy = request.param
    target, quantization, flags = RUNS[toy]
    study_file = tmp_path / "study.toml"
    study_file.write_text(f'model = "{tiny_model_dir}"\ndata = "{text_corpus_dir}"\nstudy = "{toy}"\n'
                          f'storage = "sqlite:///{tmp_path}/toy.db"\nrecipe = "{tmp_path}/recipe.yaml"\n'
                          + TINY_EVALUATION.replace('target = "transformers"', f'target = "{target}"')
                          + ONLY_QUANTIZATION + f"\n[space.quantization]\n{quantization}\n")
    env = {**toy_env, "PLANNER_CACHE": str(tmp_path / "cache")}
    search = planner(env, "search", "--study-file", study_file, "--trials", "1", "-q", *flags)
    applied = planner(env, "apply", tmp_path / "recipe.yaml", "--out", tmp_path / "deploy")
    review = planner(env, "review", "--study", toy, "--storage", f"sqlite:///{tmp_path}/toy.db", "--json")
    study = optuna.load_study(study_name=toy, storage=open_storage(f"sqlite:///{tmp_path}/toy.db"))
    (trial,) = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])  # others: presets queued, not run
    assert "failure" not in trial.user_attrs and "rejected" not in trial.user_attrs
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    reviewed = json.loads(review.stdout)
    assert [row["trial"] for row in reviewed["front"]] == [0] and reviewed["recommended"] == 0
    assert f"shipped {tmp_path / 'deploy'}" in applied.stdout and f"for {target}, loaded fresh" in applied.stdout
    return toy, trial, recipe, reviewed, search.stdout, applied.stdout, tmp_path


def test_each_toy_searches_applies_and_reviews(toy_run, tiny_model_dir, toys):
    toy, trial, recipe, reviewed, searched, applied, folder = toy_run
    stages = {stage["technique"]: stage["spec"] for stage in trial.user_attrs["stages"]}
    spec = stages.get("quantization")
    deploy = folder / "deploy"
    if toy == "objective":
        row = trial.user_attrs["metrics"]
        counted = trial.user_attrs["measurements"]["token_accuracy"]
        assert 0 < counted["total"] and row["token_accuracy"] == counted["right"] / counted["total"]
        assert trial.values[0] == row["token_accuracy"] and recipe["metrics"]["summary"]["token_accuracy"] == row[
            "token_accuracy"]
        assert reviewed["objectives"] == ["token_accuracy", "weight_mb"]
        assert reviewed["front"][0]["token_accuracy"] == row["token_accuracy"]
        assert "objectives: token acc (maximized), weight MB (minimized)" in searched
    elif toy == "method":
        assert spec["method"] == "toy-clipped" and spec["grid"] == "compressed-tensors"
        assert "toy-clipped" in reviewed["front"][0]["label"]
        config = json.loads((deploy / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert_clipped(deploy, tiny_model_dir)
    elif toy == "grid":
        assert spec["grid"] == "toy-int6" and spec["bits"] == {"attn": 6, "mlp": 6, "head": 6}
        assert_codes_decode_to_the_evaluated_model(deploy, spec, tiny_model_dir, toys.target)
    else:
        assert reviewed["target"] == "toy" and recipe["provenance"]["target"] == "toy"
        assert trial.user_attrs["measurements"]["runtime"] == {"target": "toy", "prepared": True}
        assert f"the toy runtime opens {deploy}" in applied


def assert_clipped(deploy: Path, source: Path) -> None:
    """The shipped layers were rounded by the toy's rule: the 4-bit codes compressed-tensors stores decode to
    within 2.5 standard deviations of their source row (plus half a step), where round to nearest would keep
    each row's largest weight."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    stored = load_file(deploy / "model.safetensors")
    original = dict(AutoModelForCausalLM.from_pretrained(source).named_parameters())
    projections = [n.removesuffix(".weight") for n in original if n.endswith("proj.weight")]
    clipped = 0
    for name in projections:
        weight = original[f"{name}.weight"].detach().float()
        out, width = weight.shape
        codes = unpack_from_int32(stored[f"{name}.weight_packed"], 4, torch.Size([out, width]))
        decoded = (codes.float().reshape(out, width // 32, 32) * stored[f"{name}.weight_scale"].unsqueeze(-1))
        limit = 2.5 * weight.std(dim=1, keepdim=True)
        step = limit / 7  # 4 bits, symmetric: at most the clipped range over 7.5 levels each side
        assert (decoded.reshape(out, width).abs() <= limit + step / 2 + 1e-6).all(), name
        clipped += int((weight.abs() > limit + step).sum())
    assert clipped > 0  # the source has weights past the limit, so round to nearest would not pass this


def assert_codes_decode_to_the_evaluated_model(deploy: Path, spec: dict, source: Path, runtime) -> None:
    """The artifact stores 6-bit codes in blocks of 32 for every quantized layer, and the toy runtime (`runtime`:
    the toy target's module) decodes it, tensor by tensor, to exactly the weights the study evaluated (the recipe's
    spec built again here)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from search_spaces import BuildContext
    from search_spaces.quantization import QuantSpec, apply

    grids = json.loads((deploy / runtime.GRIDS).read_text())
    assert grids and all(g == {"bits": 6, "group_size": 32} for g in grids.values())
    stored = load_file(deploy / "model.safetensors")
    assert all(stored[f"{name}.codes"].dtype == torch.int8 and -32 <= int(stored[f"{name}.codes"].min())
               and int(stored[f"{name}.codes"].max()) <= 31 for name in grids)
    evaluated = apply(AutoModelForCausalLM.from_pretrained(source), QuantSpec.from_dict(spec),
                      BuildContext(tokenizer=None, calibration=(), seed=0, progress=False))
    built, shipped = dict(evaluated.named_parameters()), dict(runtime.load(deploy).named_parameters())
    assert shipped.keys() == built.keys()
    assert [name for name in built if not torch.equal(shipped[name], built[name])] == []
