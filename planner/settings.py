"""Search settings: from a study file (TOML or YAML), then command-line flags on top.

A study file holds the same names as the flags (`model`, `data`, `trials`, `latency_budget`, ...), an
`[evaluation]` table for the measurement protocols, and a `[space.<technique>]` table per technique that
narrows its ranges (or `<technique> = false` under `[space]` to switch the stage off).
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from evaluators.latency import LatencyProtocol
from evaluators.perplexity import PerplexityProtocol
from planner.budgets import Budget, parse_budget
from planner.errors import PlannerError, first_line, read_user_text
from planner.objectives import parse_objectives
from planner.samplers import DEFAULT_SAMPLER
from planner.sources import DEFAULT_DATA, DEFAULT_MODEL

# Lighter than `planner evaluate`'s defaults: every trial pays these.
SEARCH_PERPLEXITY = PerplexityProtocol(context_length=512, stride=512, max_tokens=2048)
SEARCH_LATENCY = LatencyProtocol(prompt_tokens=64, new_tokens=16, warmup=1, repeats=3)


@dataclass(frozen=True)
class StudySettings:
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    study: str = "planner"
    storage: str | None = None  # default: sqlite:///studies/<study>.db
    sampler: str = DEFAULT_SAMPLER
    seed: int = 0
    trials: int = 20
    timeout: float | None = None  # seconds for this run
    latency_budget: str | None = None
    prefill_budget: str | None = None
    memory_budget: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    recipe: str | None = None  # default: studies/<study>-recipe.yaml
    objectives: str | list | None = None  # names, e.g. "perplexity,kl,weight_mb" (default: planner.objectives.DEFAULT)
    target: str = "auto"  # where candidates ship: llama.cpp, transformers, vllm, or auto (targets/)
    # the target's stock tool settings measured beside the candidates, e.g. "Q4_K_M,Q4_0" (llama-quantize presets)
    compare: str | list | None = None
    space: dict = field(default_factory=dict)  # technique -> dict of ranges, or False (stage off)
    evaluation: dict = field(default_factory=dict)  # perplexity / latency protocol fields

    def __post_init__(self):
        if self.trials < 1:
            raise PlannerError(f"trials must be at least 1, got {self.trials}")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise PlannerError(f"timeout must be a finite positive number of seconds, got {self.timeout}")
        if not 0 <= self.seed < 2**32:  # what every sampler's random generator accepts
            raise PlannerError(f"seed must be from 0 to {2**32 - 1}, got {self.seed}")
        parse_objectives(self.objectives)  # an unknown or repeated objective fails before anything loads
        self.compare_names()
        from targets import AUTO, TARGETS

        if self.target != AUTO and self.target not in TARGETS:
            raise PlannerError(f"unknown target '{self.target}' (known: {AUTO}, {', '.join(TARGETS)})")
        if not self.study or not all(c.isalnum() or c in "-_." for c in self.study):
            raise PlannerError(f"study name '{self.study}' may hold only letters, digits, '-', '_' and '.'")

    def objective_names(self) -> tuple[str, ...]:
        return parse_objectives(self.objectives)

    def compare_names(self) -> tuple[str, ...]:
        """The stock settings named by `compare` (checked against the target once it is chosen)."""
        if self.compare is None:
            return ()
        names = [n.strip() for n in self.compare.split(",")] if isinstance(self.compare, str) else list(self.compare)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise PlannerError(f"compare must be a comma-separated list of the target's stock settings "
                               f"(e.g. Q4_K_M,Q4_0), got {self.compare!r}")
        repeated = next((n for n in names if names.count(n) > 1), None)
        if repeated:
            raise PlannerError(f"compare: '{repeated}' is listed twice")
        return tuple(names)

    def budgets(self) -> list[Budget]:
        given = {"latency": self.latency_budget, "prefill": self.prefill_budget, "memory": self.memory_budget}
        return [parse_budget(kind, text) for kind, text in given.items() if text is not None]

    def perplexity_protocol(self) -> PerplexityProtocol:
        return _protocol(PerplexityProtocol, SEARCH_PERPLEXITY, self.evaluation.get("perplexity", {}))

    def latency_protocol(self) -> LatencyProtocol:
        return _protocol(LatencyProtocol, SEARCH_LATENCY, self.evaluation.get("latency", {}))

    def recipe_path(self) -> Path:
        return Path(self.recipe or f"studies/{self.study}-recipe.yaml")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _protocol(kind, default, overrides: dict):
    if not isinstance(overrides, dict):
        raise PlannerError(f"evaluation settings must be a table, got {type(overrides).__name__}")
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise PlannerError(f"unknown {kind.__name__} setting '{unknown[0]}' (known: {', '.join(sorted(known))})")
    try:
        return replace(default, **overrides)
    except (TypeError, ValueError) as exc:
        raise PlannerError(f"bad {kind.__name__} setting: {exc}") from None


def read_study_file(path: Path) -> dict[str, Any]:
    """Plain settings from a .toml or .yaml study file (safe loaders only)."""
    path = Path(path)
    text = read_user_text(path, "study file")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise PlannerError(f"study file {path} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise PlannerError(f"study file {path} is not valid {path.suffix[1:].upper()}: "
                           f"{first_line(exc)}") from None
    if not isinstance(data, dict):
        raise PlannerError(f"study file {path} must hold a table of settings")
    return data


def make_settings(file_values: dict[str, Any], flag_values: dict[str, Any]) -> StudySettings:
    """Study-file values, overridden by every flag the user actually gave (None = not given)."""
    known = {f.name: f for f in fields(StudySettings)}
    merged = {k.replace("-", "_"): v for k, v in file_values.items()}
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise PlannerError(f"unknown study setting '{unknown[0]}' (known: {', '.join(known)})")
    merged.update({k: v for k, v in flag_values.items() if v is not None})
    for name, value in merged.items():
        _check_type(name, value, known[name].type)
    return StudySettings(**merged)


def _check_type(name: str, value: Any, annotation: str) -> None:
    """The value against the field's annotation (a string under `from __future__ import annotations`)."""
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict, "list": list}
    words = [w.strip() for w in annotation.split("|")]
    if value is None and "None" in words:
        return
    kinds = [(w, expected[w]) for w in words if w in expected]
    if kinds and not any(isinstance(value, kind) and not (kind is int and isinstance(value, bool))
                         for _, kind in kinds):
        shown = " or ".join(w for w, _ in kinds)
        raise PlannerError(f"study setting '{name}' must be {shown}, got {type(value).__name__} {value!r}")
