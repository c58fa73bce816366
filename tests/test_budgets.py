import pytest

from planner.budgets import Budget, parse_budget
from planner.errors import PlannerError


@pytest.mark.parametrize("kind, text, limit", [
    ("latency", "25ms", 25.0),
    ("latency", "25 ms", 25.0),
    ("latency", "0.02s", 20.0),
    ("latency", "1500us", 1.5),
    ("prefill", "1.2S", 1200.0),
    ("memory", "300MB", 300e6),
    ("memory", "300mb", 300e6),
    ("memory", "1.5GiB", 1.5 * 2**30),
    ("memory", "512KiB", 512 * 1024),
    ("memory", "1e9B", 1e9),
])
def test_absolute_budgets(kind, text, limit):
    budget = parse_budget(kind, text)
    assert budget.limit == pytest.approx(limit) and budget.relative is None


def test_relative_budget_resolves_against_the_baseline():
    budget = parse_budget("memory", "0.5x")
    assert budget.relative == 0.5 and budget.limit is None
    resolved = budget.resolve({"weight_bytes": 538_060_032})
    assert resolved.limit == pytest.approx(269_030_016)
    assert "0.5x baseline" in resolved.describe() and "269.0 MB" in resolved.describe()


def test_violation_is_relative_excess():
    budget = parse_budget("latency", "20ms")
    assert budget.violation({"decode_ms_p50": 15.0}) == pytest.approx(-0.25)
    assert budget.violation({"decode_ms_p50": 30.0}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="resolved"):
        parse_budget("latency", "0.7x").violation({"decode_ms_p50": 1.0})
    with pytest.raises(PlannerError, match="baseline has no prefill_ms_p50"):
        parse_budget("prefill", "0.7x").resolve({"decode_ms_p50": 1.0})


@pytest.mark.parametrize("kind, text, message", [
    ("latency", "fast", "not a number with a unit"),
    ("latency", "", "not a number with a unit"),
    ("latency", "-5ms", "must be positive"),
    ("latency", "0ms", "must be positive"),
    ("latency", "25", r"unknown unit '\(none\)'"),
    ("latency", "25MB", "unknown unit 'mb'"),
    ("memory", "300ms", "unknown unit 'ms'"),
    ("memory", "300 parsecs", "unknown unit 'parsecs'"),
    ("speed", "1x", "unknown budget kind"),
])
def test_bad_budgets_name_the_problem(kind, text, message):
    with pytest.raises(PlannerError, match=message):
        parse_budget(kind, text)


def test_budget_round_trips_through_a_dict():
    budget = parse_budget("memory", "300MB")
    assert Budget(**budget.to_dict()) == budget


@pytest.mark.parametrize("text, row, violation", [
    # relative: judged on the same-run A/B ratio where the row has one, whatever the absolute figure says
    ("0.5x", {"decode_ms_p50": 4.0, "decode_ratio": 0.6}, 0.2),
    ("0.5x", {"decode_ms_p50": 40.0, "decode_ratio": 0.25}, -0.5),
    ("0.5x", {"decode_ms_p50": 4.0}, -0.2),  # no ratio measured: the absolute limit (0.5 x 10 ms)
    ("4ms", {"decode_ms_p50": 5.0, "decode_ratio": 0.1}, 0.25),  # absolute budgets ignore ratios
])
def test_relative_latency_budgets_compare_same_run_ratios(text, row, violation):
    budget = parse_budget("latency", text).resolve({"decode_ms_p50": 10.0})
    assert budget.violation(row) == pytest.approx(violation)
    assert budget.uses_ratio(row) is (text.endswith("x") and "decode_ratio" in row)


def test_relative_prefill_budgets_use_the_prefill_ratio():
    budget = parse_budget("prefill", "0.8x").resolve({"prefill_ms_p50": 100.0})
    assert budget.violation({"prefill_ms_p50": 50.0, "prefill_ratio": 1.2, "decode_ratio": 0.1}) == pytest.approx(0.5)
