"""The technique contract: spec dataclasses that round-trip through plain dicts, the build context, the registry.

A technique is one module in this package that registers a `Technique`: its spec type (what a recipe
stores), its search-space settings type (ranges a study file may narrow), `suggest(trial, space)` (the
only place that talks to Optuna for it) and `apply(model, spec, context)` (builds the candidate for real).
The planner composes registered techniques in `order` (distillation, then pruning, then quantization).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


class SpecError(ValueError):
    """A spec or space dict that does not describe a valid value; the message names the first bad field."""


class DictSpec:
    """Mixin for frozen dataclasses: `to_dict()` gives plain JSON/YAML types, `from_dict()` validates.

    Tuples become lists in the dict and lists become tuples again on the way back; nested DictSpec
    fields round-trip too. Subclasses check values in `__post_init__` and raise SpecError naming the field.
    """

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None):
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in fields]
        if unknown:
            raise SpecError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(fields)})")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            values[name] = _typed(value, hints[name], f"{where}.{name}")
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise SpecError(f"{where}.{missing[0]}: missing field")
        try:
            return cls(**values)
        except SpecError:
            raise
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{where}: {exc}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, DictSpec):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(value: Any, hint: Any, where: str) -> Any:
    """Check a plain value against a field's annotation (the common cases), converting lists to tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _typed(value, arg, where)
            except SpecError as exc:
                errors.append(exc)
        raise errors[0]
    if isinstance(hint, type) and issubclass(hint, DictSpec):
        return hint.from_dict(value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return tuple(_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_hint, value_hint = args or (Any, Any)
        return {_typed(k, key_hint, where): _typed(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if hint is Any or origin is typing.Literal:
        if origin is typing.Literal and value not in args:
            raise SpecError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise SpecError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True)
class BuildContext:
    """What `apply` may use besides the model: calibration text is the training split, never held-out text."""

    tokenizer: Any
    calibration: Sequence[Any]  # evaluators.corpus.Document of the training split
    device: Any = "cpu"
    seed: int = 0
    cache_dir: Path | None = None  # where costly artefacts (distilled students) are kept
    model_id: str = ""  # identity of the source model (spec and content hash), for cache keys
    progress: bool = True


@dataclass(frozen=True)
class Technique:
    name: str
    order: int  # composition order: lower runs first
    spec_type: type
    space_type: type
    suggest: Callable[[Any, Any], Any]  # (optuna trial, space) -> spec, or None when the stage is off
    apply: Callable[[Any, Any, BuildContext], Any]  # (model, spec, context) -> model
    # Cheap, exact estimates, so a candidate can be judged before it is built. A stage that changes
    # shapes maps the model config to the config of what it builds; a stage that changes how weights
    # are stored gives the exact stored bytes of a model (which may live on the meta device) under a spec.
    derive_config: Callable[[Any, Any], Any] | None = None  # (config, spec) -> config
    weight_bytes: Callable[[Any, Any], int] | None = None  # (model, spec) -> bytes
    # Hand-picked candidates as trial parameters: the first switches the stage off, the rest are what a
    # user would try by hand (e.g. 8-bit everywhere). The study starts with them so its front holds them.
    presets: Callable[[Any], list[dict]] | None = None  # (space) -> [off params, preset params, ...]
    # Trial parameters of the few candidates of this stage among which its smallest is, whatever the other
    # stages do: the planner sizes their combinations to tell at once when no candidate fits a memory budget.
    # Parameters left out take their first choice (they must not change the size).
    smallest: Callable[[Any], list[dict]] | None = None  # (space) -> [params, ...]
    # Warm starts across stages: a shape-changing stage names the reduced shapes worth trying (`shapes`),
    # a storage stage the presets worth trying on each of them (`shape_presets`); the study starts with
    # their combinations too (the search-quality benchmark found the front's volume sits there).
    shapes: Callable[[Any], list[dict]] | None = None  # (space) -> [params, ...]
    shape_presets: Callable[[Any], list[dict]] | None = None  # (space) -> [params, ...]
    # Writing a built model as a checkpoint plain transformers loads, where save_pretrained is not enough
    # (e.g. packed integer weights). The tokenizer is saved beside it by the caller.
    save: Callable[[Any, Any, Path], None] | None = None  # (model, spec, folder) -> None


TECHNIQUES: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    if technique.name in TECHNIQUES:
        raise ValueError(f"technique {technique.name} is registered twice")
    TECHNIQUES[technique.name] = technique
    return technique


def ordered() -> list[Technique]:
    return sorted(TECHNIQUES.values(), key=lambda t: t.order)
