"""A storage grid declares which artifact formats hold it, a target which formats it ships: a study naming a grid
its target cannot ship is refused in one line before anything runs (no study stored), a recipe naming one is
refused by `apply` in one line, and a space's group sizes and symmetry are those its grid holds."""
from __future__ import annotations

import optuna
import pytest

import cli
from planner.storage import open_storage
from search_spaces.quantization import QuantSpace, STORAGE_SCHEMES
from search_spaces.specs import SpecError
from targets import TARGETS


def test_each_grid_is_held_by_the_artifact_of_the_targets_that_store_it():
    assert STORAGE_SCHEMES["compressed-tensors"].artifacts == {"compressed-tensors"}
    assert STORAGE_SCHEMES["gguf"].artifacts == {"gguf"}
    transformers, llama = TARGETS["transformers"], TARGETS["llama.cpp"]
    assert transformers.cannot_store("compressed-tensors") is None and llama.cannot_store("gguf") is None
    assert transformers.cannot_store("gguf") == ("the gguf grid is held by gguf; the transformers target ships "
                                                 "compressed-tensors")
    assert llama.cannot_store("compressed-tensors") is not None


@pytest.mark.parametrize("target, grid", [("transformers", "gguf"), ("llama.cpp", "compressed-tensors")])
def test_a_study_naming_a_grid_its_target_cannot_ship_is_refused_before_anything_runs(
        tiny_study_file, tmp_path, capsys, target, grid):
    text = tiny_study_file.read_text().replace('methods = ["none", "rtn", "dynamic-int8"]',
                                               f'methods = ["none", "rtn"]\ngrid = "{grid}"')
    tiny_study_file.write_text(text)
    code = cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "1", "--target", target, "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == f"planner: error: space.quantization.grid: {TARGETS[target].cannot_store(grid)}"
    assert optuna.get_all_study_names(open_storage(f"sqlite:///{tmp_path}/tiny.db")) == []


def test_a_space_holds_only_the_group_sizes_and_symmetry_of_its_grid():
    with pytest.raises(SpecError, match=r"^QuantSpace.group_sizes: the gguf grid holds 32, not 64$"):
        QuantSpace(grid="gguf", bits=(4, 16), group_sizes=(32, 64))
    assert QuantSpace(grid="gguf", bits=(4, 16), group_sizes=(32,)).group_sizes == (32,)


def test_a_study_file_naming_a_grid_starts_from_that_grids_own_fields(tiny_model_dir):
    from planner.settings import StudySettings
    from planner.sources import ModelSource, load_model
    from planner.study import resolve_spaces

    model, _ = load_model(ModelSource.parse(str(tiny_model_dir)), "cpu")
    settings = StudySettings(model=str(tiny_model_dir), space={"quantization": {"grid": "gguf", "methods": ["rtn"]}})
    quant = resolve_spaces(settings, model)["quantization"]
    assert quant.grid == "gguf" and quant.group_sizes == (32,) and set(quant.bits) <= set(STORAGE_SCHEMES["gguf"].stored_bits)


def test_apply_refuses_a_recipe_whose_grid_its_target_cannot_ship(tmp_path):
    from planner.apply import check_grids
    from planner.errors import PlannerError
    from planner.recipes import Stage
    from search_spaces.quantization import QuantSpec
    from types import SimpleNamespace

    gguf = Stage("quantization", QuantSpec(method="rtn", bits={"attn": 4, "mlp": 4}, group_size=32, grid="gguf"))
    recipe = SimpleNamespace(stages=(gguf,))
    check_grids(recipe, TARGETS["llama.cpp"], tmp_path / "r.yaml")
    with pytest.raises(PlannerError, match=r"r.yaml: the gguf grid is held by gguf; the transformers target ships"):
        check_grids(recipe, TARGETS["transformers"], tmp_path / "r.yaml")
    library = Stage("quantization", QuantSpec(method="dynamic-int8", bits={"attn": 8, "mlp": 8}))
    check_grids(SimpleNamespace(stages=(library,)), TARGETS["llama.cpp"], tmp_path / "r.yaml")  # no grid: not judged
