"""Which type each tensor gets under a byte target: a Lagrangian allocation over measured per-tensor errors.

Each tensor has options (type, stored bytes, predicted error). For a multiplier lam >= 0, every tensor takes
the option minimising ``error + lam * bytes``; a larger lam buys fewer bytes at more error. The lam that
meets the byte target is found by bisection, and what the bisection leaves unspent is handed back greedily
to the tensors whose next larger option buys the most error per byte. Each choice is on the lower convex hull
of its tensor's (bytes, error) points (a point above the hull is never the best for any lam), so the result
is the best total error for its bytes among hull choices -- what llama.cpp's --target-bpw (PR #15550) does,
without its heuristics of layer position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Option:
    kind: str  # a type name, e.g. "Q4_K"
    bytes: int
    error: float


def hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, error), by increasing bytes and decreasing error."""
    by_size = sorted(options, key=lambda o: (o.bytes, o.error))
    frontier: list[Option] = []
    for option in by_size:  # keep only options that lower the error as bytes grow
        if not frontier or option.error < frontier[-1].error:
            if frontier and option.bytes == frontier[-1].bytes:
                frontier[-1] = option
            else:
                frontier.append(option)
    lower: list[Option] = []
    for option in frontier:
        while len(lower) >= 2 and _cross(lower[-2], lower[-1], option) <= 0:
            lower.pop()
        lower.append(option)
    return lower


def _cross(a: Option, b: Option, c: Option) -> float:
    """> 0 when b lies strictly below the segment from a to c (b is kept on the lower hull)."""
    return (b.bytes - a.bytes) * (c.error - a.error) - (b.error - a.error) * (c.bytes - a.bytes)


def _choose(hulls: Mapping[str, list[Option]], lam: float) -> dict[str, int]:
    return {name: min(range(len(h)), key=lambda i: (h[i].error + lam * h[i].bytes, h[i].bytes))
            for name, h in hulls.items()}


def _total(hulls, picks) -> int:
    return sum(hulls[name][i].bytes for name, i in picks.items())


def allocate(options: Mapping[str, Sequence[Option]], byte_target: float) -> dict[str, Option]:
    """The option of each tensor with the least total error whose total bytes stay within `byte_target`
    (each tensor's smallest option when even those exceed it)."""
    hulls = {name: hull(opts) for name, opts in options.items()}
    smallest = {name: 0 for name in hulls}
    if _total(hulls, smallest) >= byte_target:
        return {name: hulls[name][0] for name in hulls}
    largest = {name: len(h) - 1 for name, h in hulls.items()}
    if _total(hulls, largest) <= byte_target:
        return {name: hulls[name][-1] for name in hulls}
    low, high = 0.0, 1.0  # lam = 0 picks the largest; raise high until it fits
    while _total(hulls, _choose(hulls, high)) > byte_target:
        high *= 4.0
    for _ in range(100):  # bisection on lam: the fitting pick with the smallest lam
        middle = (low + high) / 2
        if _total(hulls, _choose(hulls, middle)) > byte_target:
            low = middle
        else:
            high = middle
    picks = _choose(hulls, high)
    spare = byte_target - _total(hulls, picks)
    while True:  # spend what is left on the steps that buy the most error per byte
        steps = [((h[picks[n]].error - h[picks[n] + 1].error) / (h[picks[n] + 1].bytes - h[picks[n]].bytes), n)
                 for n, h in hulls.items() if picks[n] + 1 < len(h)
                 and h[picks[n] + 1].bytes - h[picks[n]].bytes <= spare]
        if not steps:
            break
        _, name = max(steps)
        spare -= hulls[name][picks[name] + 1].bytes - hulls[name][picks[name]].bytes
        picks[name] += 1
    return {name: hulls[name][i] for name, i in picks.items()}
