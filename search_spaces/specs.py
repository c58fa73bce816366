"""Specs and spaces as frozen dataclasses that round-trip through plain dicts, and the one way to check a field.

`DictSpec.from_dict` checks a plain dict against the dataclass's annotations and names the first bad field
(`QuantSpec.gptq.damp: ...`); each spec's `__post_init__` checks values with the `check_*` helpers below,
which all raise `SpecError("<where>: <what was expected>, got <value>")`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
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
        except SpecError as exc:
            # A nested spec names its fields by its class (GPTQSettings.damp); say where it sits instead.
            own = cls.__name__ + "."
            if where != cls.__name__ and str(exc).startswith(own):
                raise SpecError(f"{where}.{str(exc)[len(own):]}") from None
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


def is_one_of(value: Any, allowed: Sequence[Any]) -> bool:
    """Membership that keeps booleans, integers and None apart (in Python, True == 1 and 1 == 1.0)."""
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) and (value is None) == (a is None)
               for a in allowed)


def shown(values: Sequence[Any]) -> str:
    return ", ".join("null" if v is None else repr(v) for v in values)


def check_choices(where: str, choices: Sequence[Any], check: Callable[[str, Any], None],
                  allow_empty: bool = False) -> None:
    """A list of choices (a tuple once parsed): at least one unless `allow_empty`, no repeats, each valid by
    `check(where[i], value)`."""
    if not isinstance(choices, (tuple, list)) or (not choices and not allow_empty):
        raise SpecError(f"{where}: expected a non-empty list of choices, got {choices!r}")
    for i, value in enumerate(choices):
        check(f"{where}[{i}]", value)
    if len(set(choices)) != len(choices):
        raise SpecError(f"{where}: repeated choices {list(choices)}")


def check_member(allowed: Sequence[Any]) -> Callable[[str, Any], None]:
    def check(where: str, value: Any) -> None:
        if not is_one_of(value, allowed):
            raise SpecError(f"{where}: expected one of {shown(allowed)}, got {value!r}")
    return check


check_bool = check_member((False, True))


def check_int(minimum: int) -> Callable[[str, Any], None]:
    def check(where: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SpecError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return check


def check_float(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str, Any], None]:
    def check(where: str, value: Any) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise SpecError(f"{where}: expected a number in {bounds}, got {value!r}")
    return check


check_positive = check_float(0.0, float("inf"), low_open=True)  # a learning rate, a temperature
check_fraction = check_float(0.0, 1.0, low_open=True)  # a share in (0, 1]: a keep ratio, a promoted fraction


def check_rungs(where: str, steps) -> None:
    """Training step counts of multi-fidelity rungs: positive integers, strictly ascending."""
    check_choices(where, steps, check_int(1))
    if list(steps) != sorted(steps):
        raise SpecError(f"{where}: rungs must ascend (each continues the one before), got {list(steps)}")
