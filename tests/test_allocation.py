"""The per-tensor type allocation: within the byte target, hull choices only, and close to the exhaustive
optimum (a Lagrangian allocation is optimal for the bytes it uses; what it leaves is at most one step)."""
from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from search_spaces.quantization.allocation import Option, allocate, hull

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


def test_hull_drops_points_above_the_lower_convex_hull():
    options = [Option("a", 10, 10.0), Option("b", 20, 9.5), Option("c", 30, 2.0), Option("d", 40, 3.0),
               Option("e", 50, 1.0)]
    assert [o.kind for o in hull(options)] == ["a", "c", "e"]  # b is above a-c; d costs more for more error


def test_a_generous_target_takes_the_largest_and_a_tight_one_the_smallest():
    options = {"x": [Option("Q4_K", 4, 1.0), Option("Q8_0", 8, 0.1)], "y": [Option("Q4_K", 4, 2.0), Option("Q8_0", 8, 0.2)]}
    assert {n: o.kind for n, o in allocate(options, 100).items()} == {"x": "Q8_0", "y": "Q8_0"}
    assert {n: o.kind for n, o in allocate(options, 3).items()} == {"x": "Q4_K", "y": "Q4_K"}
    # 12 bytes: one tensor goes up, the one whose upgrade buys more error (y: 1.8 against 0.9)
    assert {n: o.kind for n, o in allocate(options, 12).items()} == {"x": "Q4_K", "y": "Q8_0"}


@st.composite
def instances(draw):
    tensors = draw(st.integers(1, 4))
    options = {}
    for t in range(tensors):
        sizes = sorted(draw(st.lists(st.integers(1, 40), min_size=2, max_size=4, unique=True)))
        errors = sorted(draw(st.lists(st.floats(0.0, 10.0), min_size=len(sizes), max_size=len(sizes))), reverse=True)
        options[f"t{t}"] = [Option(TYPES[i], s, e) for i, (s, e) in enumerate(zip(sizes, errors))]
    target = draw(st.integers(1, 160))
    return options, target


@settings(max_examples=300, deadline=None)
@given(instances())
def test_allocation_is_within_target_and_near_the_exhaustive_optimum(instance):
    options, target = instance
    chosen = allocate(options, target)
    total = sum(o.bytes for o in chosen.values())
    smallest = sum(min(o.bytes for o in opts) for opts in options.values())
    assert total <= max(target, smallest)
    for name, option in chosen.items():
        assert option in hull(options[name])
    feasible = [combo for combo in itertools.product(*options.values()) if sum(o.bytes for o in combo) <= target]
    if feasible:
        best = min(sum(o.error for o in combo) for combo in feasible)
        gap = max(max(o.error for o in opts) - min(o.error for o in opts) for opts in options.values())
        assert sum(o.error for o in chosen.values()) <= best + gap + 1e-9
