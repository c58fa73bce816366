from dataclasses import dataclass

import pytest
import yaml

from planner.recipes import RECIPE_VERSION, Recipe, RecipeError, Stage, load_recipe, save_recipe
from search_spaces.base import Technique
from search_spaces.specs import DictSpec, SpecError


@dataclass(frozen=True)
class PruneSpec(DictSpec):
    mlp_keep: float = 1.0

    def __post_init__(self):
        if not 0 < self.mlp_keep <= 1:
            raise SpecError(f"mlp_keep: must be in (0, 1], got {self.mlp_keep}")


@dataclass(frozen=True)
class QuantSpec(DictSpec):
    bits: int = 8


def _technique(technique_name, technique_order, spec):
    class Fake(Technique):
        name, order, spec_type, space_type = technique_name, technique_order, spec, spec

        def suggest(self, trial, space):
            return None

        def apply(self, model, spec, context):
            return model

    return Fake()


TECHNIQUES = {"pruning": _technique("pruning", 20, PruneSpec), "quantization": _technique("quantization", 30, QuantSpec)}


def make_recipe():
    return Recipe(
        model_source="builtin:smollm2-135m",
        model_hash="sha256:abc",
        stages=(Stage("pruning", PruneSpec(0.75)), Stage("quantization", QuantSpec(4))),
        budget=({"kind": "memory", "limit": 3e8, "relative": None, "text": "300MB"},),
        metrics={"perplexity": {"perplexity": 31.5, "protocol": {"context_length": 512}}},
        provenance={"study": "demo", "trial": 7, "seed": 0},
    )


def test_recipe_round_trips_through_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    save_recipe(make_recipe(), path)
    assert load_recipe(path, TECHNIQUES) == make_recipe()
    data = yaml.safe_load(path.read_text())
    assert data["version"] == RECIPE_VERSION and list(data)[:3] == ["version", "model", "stages"]
    assert not list(tmp_path.glob(".*.tmp"))


def _write(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _mutated(change):
    data = make_recipe().to_dict()
    change(data)
    return data


@pytest.mark.parametrize("data, message", [
    ("stages: [unclosed", "is not valid YAML"),
    ("just a string", "recipe: expected a mapping, got str"),
    (_mutated(lambda d: d.pop("version")), "recipe.version: missing field"),
    (_mutated(lambda d: d.update(version="1")), "recipe.version: expected int, got str"),
    (_mutated(lambda d: d.update(version=RECIPE_VERSION + 1)), "is newer than this planner reads"),
    (_mutated(lambda d: d["model"].pop("content_hash")), "model.content_hash: missing field"),
    (_mutated(lambda d: d.update(stages={"a": 1})), "recipe.stages: expected list, got dict"),
    (_mutated(lambda d: d["stages"][0].update(technique="sparsify")), r"stages\[0\].technique: unknown technique 'sparsify'"),
    (_mutated(lambda d: d["stages"][1]["spec"].update(bits="four")), r"stages\[1\].spec.bits: expected int"),
    (_mutated(lambda d: d["stages"][0]["spec"].update(mlp_keep=2.0)), "mlp_keep: must be in"),
    (_mutated(lambda d: d["stages"][1]["spec"].update(method="awq")), r"stages\[1\].spec.method: unknown field"),
    (_mutated(lambda d: d["stages"].reverse()), "in order pruning -> quantization"),
    (_mutated(lambda d: d.update(metrics=[1, 2])), "metrics: expected a mapping"),
])
def test_bad_recipes_name_the_first_bad_field(tmp_path, data, message):
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(_write(tmp_path, data), TECHNIQUES)
    assert "\n" not in str(info.value)


def test_python_object_tags_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"!!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(_write(tmp_path, payload), TECHNIQUES)
    assert not marker.exists()


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml", TECHNIQUES)
