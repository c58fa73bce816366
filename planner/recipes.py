"""Recipe files: one candidate, written as versioned YAML, that `planner apply` rebuilds deterministically.

A recipe names its model (source and content hash), the ordered stages with their spec dicts, the budget,
the measured metrics with their protocols and device, and its provenance. Loading uses `yaml.safe_load`
(no Python object tags) and names the first bad field in its error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from planner.errors import PlannerError, check_writable, first_line, read_user_text

RECIPE_VERSION = 1
RECIPE_FIELDS = ("version", "model", "stages", "budget", "metrics", "provenance")


class RecipeError(PlannerError):
    """A recipe file that cannot be used; the message names the file and the first bad field."""


@dataclass(frozen=True)
class Stage:
    technique: str
    spec: Any  # the technique's spec dataclass


def plain_stages(stages) -> list[dict]:
    """Stages as plain JSON values: what a trial's `stages` attribute, a recipe and a cache key hold (a stored
    trial's stages compare equal to these)."""
    return json.loads(json.dumps([{"technique": s.technique, "spec": s.spec.to_dict()} for s in stages]))


@dataclass(frozen=True)
class Recipe:
    model_source: str
    model_hash: str
    stages: tuple[Stage, ...]
    budget: tuple[dict, ...] = ()
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "model": {"source": self.model_source, "content_hash": self.model_hash},
            "stages": plain_stages(self.stages),
            "budget": [dict(b) for b in self.budget],
            "metrics": self.metrics,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Any, techniques: dict) -> "Recipe":
        """Validate a plain dict; `techniques` maps a technique name to its registered Technique."""
        from search_spaces.specs import SpecError

        data = _mapping(data, "recipe")
        unknown = [key for key in data if key not in RECIPE_FIELDS]
        if unknown:
            raise RecipeError(f"recipe.{unknown[0]}: unknown field (known: {', '.join(RECIPE_FIELDS)})")
        version = _field(data, "version", int, "recipe")
        if version > RECIPE_VERSION:
            raise RecipeError(f"version: recipe version {version} is newer than this planner reads "
                              f"({RECIPE_VERSION}); upgrade planner")
        if version < 1:
            raise RecipeError(f"version: must be 1 or more, got {version}")
        model = _mapping(_field(data, "model", dict, "recipe"), "model")
        source = _field(model, "source", str, "model")
        content_hash = _field(model, "content_hash", str, "model")
        stages = []
        for i, raw in enumerate(_field(data, "stages", list, "recipe")):
            where = f"stages[{i}]"
            raw = _mapping(raw, where)
            name = _field(raw, "technique", str, where)
            if name not in techniques:
                raise RecipeError(f"{where}.technique: unknown technique '{name}' (known: {', '.join(sorted(techniques))})")
            try:
                spec = techniques[name].spec_type.from_dict(_field(raw, "spec", dict, where), f"{where}.spec")
            except SpecError as exc:
                raise RecipeError(str(exc)) from None
            stages.append(Stage(name, spec))
        order = [techniques[s.technique].order for s in stages]
        if order != sorted(order) or len(set(order)) != len(order):
            raise RecipeError("stages: techniques must appear once each, in order "
                              + " -> ".join(t.name for t in sorted(techniques.values(), key=lambda t: t.order)))
        budgets = data.get("budget") or []
        if not isinstance(budgets, list):
            raise RecipeError(f"recipe.budget: expected list, got {type(budgets).__name__}")
        budget = tuple(_mapping(b, f"budget[{i}]") for i, b in enumerate(budgets))
        metrics = _mapping(data.get("metrics") or {}, "metrics")
        provenance = _mapping(data.get("provenance") or {}, "provenance")
        return cls(source, content_hash, tuple(stages), budget, metrics, provenance, version)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _field(data: dict, name: str, kind: type, where: str) -> Any:
    if name not in data:
        raise RecipeError(f"{where}.{name}: missing field")
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecipeError(f"{where}.{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write atomically (temp file, then rename), so a reader never sees half a recipe."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    tmp.replace(path)


def load_recipe(path: Path, techniques: dict) -> Recipe:
    path = Path(path)
    text = read_user_text(path, "recipe", RecipeError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {first_line(exc)}") from None
    try:
        return Recipe.from_dict(data, techniques)
    except RecipeError as exc:
        raise RecipeError(f"recipe {path}: {exc}") from None


def stored_stages(plain: list[dict]) -> tuple[Stage, ...]:
    """Stages from their plain stored form (a trial's `stages`, a recipe's)."""
    from search_spaces import TECHNIQUES

    return tuple(Stage(s["technique"], TECHNIQUES[s["technique"]].spec_type.from_dict(s["spec"])) for s in plain)


def pinned_stages(stages: tuple[Stage, ...], measurements: dict) -> tuple[Stage, ...]:
    """Each stage's spec with what the measured artifact records of its build fixed (Technique.pin): the recipe
    rebuilds the file that was measured, not the one its spec would choose on another machine."""
    from search_spaces import TECHNIQUES

    return tuple(Stage(s.technique, TECHNIQUES[s.technique].pin(s.spec, measurements)) for s in stages)


def recipe_for(study, trial) -> Recipe:
    """The recipe of a measured trial of an Optuna study, from what the study stored (no model needed)."""
    import optuna
    import torch
    import transformers

    import planner

    model = study.user_attrs.get("model")
    if not model:
        raise PlannerError(f"study '{study.study_name}' has no baseline yet (no search has run in it)")
    stages = pinned_stages(stored_stages(trial.user_attrs.get("stages", [])), trial.user_attrs.get("measurements", {}))
    settings = study.user_attrs.get("settings", {})
    confirmed = study.user_attrs.get("confirmations", {}).get(str(trial.number))
    return Recipe(
        model_source=model["source"],
        model_hash=model["content_hash"],
        stages=stages,
        budget=tuple(study.user_attrs.get("budgets", [])),
        metrics={"summary": trial.user_attrs.get("metrics", {}), **trial.user_attrs.get("measurements", {}),
                 **({"storage_notes": trial.user_attrs["storage_notes"]} if "storage_notes" in trial.user_attrs else {}),
                 **({"confirmation": confirmed} if confirmed else {})},  # its re-timing before the outcome
        provenance={
            "study": study.study_name,
            "trial": trial.number,
            "objectives": list(study.metric_names or ()),
            "seed": settings.get("seed", 0),
            "data": settings.get("data"),
            # Where the figures were measured and the artifact ships (`planner apply` re-measures it there).
            "target": study.user_attrs.get("target", "transformers"),
            # the precision the model was held in: candidates and the reference were made from it (footprint.py)
            **({"dtype": study.user_attrs["dtype"]} if "dtype" in study.user_attrs else {}),
            "evaluation": settings.get("evaluation") or {},
            "planner": planner.__version__,
            "torch": str(torch.__version__),  # a str subclass that YAML's safe dumper refuses
            "transformers": str(transformers.__version__),
            "optuna": str(optuna.__version__),
        },
    )


def write_recipe(study, trial, path: Path) -> Path:
    path = Path(path)
    check_writable(path, "recipe")
    save_recipe(recipe_for(study, trial), path)
    return path
