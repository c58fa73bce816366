"""Choice lists of a search space and how a trial picks from them (shared by the pruning and distillation spaces).

Spaces list discrete choices on purpose: a study samples the same value again (so the student cache
hits and recipes stay readable), and a study file narrows a space by shortening a list.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from search_spaces.base import SpecError


def choose(trial, name: str, choices: Sequence[Any]) -> Any:
    """One of `choices`: the value itself when there is only one (nothing for Optuna to learn, no parameter
    recorded), else Optuna's categorical suggestion under `name`."""
    if len(choices) == 1:
        return choices[0]
    return trial.suggest_categorical(name, list(choices))


def check_choices(where: str, choices: Sequence[Any], check: Callable[[str, Any], None]) -> None:
    """At least one choice, no repeats, each valid by `check(where[i], value)` (which raises SpecError)."""
    if not choices:
        raise SpecError(f"{where}: needs at least one choice")
    if len(set(choices)) != len(choices):
        raise SpecError(f"{where}: repeated choices {list(choices)}")
    for i, value in enumerate(choices):
        check(f"{where}[{i}]", value)


def check_member(allowed: Sequence[Any]) -> Callable[[str, Any], None]:
    def check(where: str, value: Any) -> None:
        if value not in allowed:
            raise SpecError(f"{where}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
    return check


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

