"""Tables and JSON for a study's outcome: the Pareto front, the budget, the recommended candidate."""
from __future__ import annotations

from planner.study_run import SearchOutcome, best_trials, feasible

COLUMNS = (("trial", "{:>5}"), ("perplexity", "{:>10.2f}"), ("bits/byte", "{:>9.3f}"), ("decode ms", "{:>9.1f}"),
           ("prefill ms", "{:>10.1f}"), ("weight MB", "{:>9.1f}"))


def trial_row(trial) -> dict:
    metrics = trial.user_attrs.get("metrics", {})
    return {
        "trial": trial.number,
        "perplexity": metrics.get("perplexity"),
        "bits_per_byte": metrics.get("bits_per_byte"),
        "decode_ms_p50": metrics.get("decode_ms_p50"),
        "prefill_ms_p50": metrics.get("prefill_ms_p50"),
        "weight_mb": metrics.get("weight_mb"),
        "stages": trial.user_attrs.get("stages", []),
        "label": trial.user_attrs.get("label", ""),
        "constraints": dict(trial.constraints),
        "meets_budget": feasible(trial),
    }


def _cells(row: dict) -> list[str]:
    values = (row["trial"], row["perplexity"], row["bits_per_byte"], row["decode_ms_p50"], row["prefill_ms_p50"],
              row["weight_mb"])
    return [fmt.format(v) if v is not None else f"{'n/a':>{len(name)}}" for (name, fmt), v in zip(COLUMNS, values)]


def table(rows: list[dict], marked: int | None = None, first: tuple[str, list[str]] | None = None) -> str:
    """Rows of trials; `first` adds a leading column (its name and one cell per row)."""
    lead_name, lead = first or ("", [""] * len(rows))
    width = max([len(lead_name), *map(len, lead)])
    header = "  " + f"{lead_name:<{width}}" + (" " if width else "") + "  ".join(
        f"{name:>{len(fmt.format(0))}}" for name, fmt in COLUMNS) + "  stages"
    lines = [header]
    for cell, row in zip(lead, rows):
        mark = "* " if row["trial"] == marked else "  "
        lines.append(mark + f"{cell:<{width}}" + (" " if width else "") + "  ".join(_cells(row)) + "  " + row["label"])
    return "\n".join(lines)


OBJECTIVE_NAMES = {"perplexity": "perplexity", "decode_ms_p50": "decode ms", "weight_mb": "weight MB"}


def best_table(outcome: SearchOutcome) -> str:
    best = best_per_objective_rows(outcome)
    if not best:
        return "no measured trial yet"
    names = [f"{OBJECTIVE_NAMES[name]}{'' if row['meets_budget'] else ' (over budget)'}" for name, row in best.items()]
    return table(list(best.values()), first=("best for", names))


def best_per_objective_rows(outcome: SearchOutcome) -> dict[str, dict]:
    return {name: trial_row(t) for name, t in best_trials(outcome.study).items()}


def budget_line(outcome: SearchOutcome) -> str:
    if not outcome.budgets:
        return "budget: none (every measured candidate is feasible)"
    return "budget: " + ", ".join(b.describe() for b in outcome.budgets)


def baseline_line(outcome: SearchOutcome) -> str:
    b = outcome.baseline
    return (f"baseline: perplexity {b.get('perplexity', float('nan')):.2f}, decode {b.get('decode_ms_p50', 0):.1f} ms, "
            f"prefill {b.get('prefill_ms_p50', 0):.1f} ms, weights {b.get('weight_mb', 0):.1f} MB")


def format_outcome(outcome: SearchOutcome) -> str:
    lines = [f"study {outcome.study.study_name}: {len(outcome.study.trials)} trials", budget_line(outcome),
             baseline_line(outcome), ""]
    if outcome.recommended is not None:
        lines += ["Pareto front of the candidates that meet the budget (* = recommended: best perplexity):",
                  table([trial_row(t) for t in outcome.front], outcome.recommended.number)]
    else:
        lines += ["No measured candidate meets the budget. Closest (least total excess over the budget):",
                  table([trial_row(t) for t in outcome.closest])]
    return "\n".join(lines)


def format_review(outcome: SearchOutcome) -> str:
    return format_outcome(outcome) + "\n\nBest trial per objective:\n" + best_table(outcome)


def outcome_to_dict(outcome: SearchOutcome) -> dict:
    return {
        "study": outcome.study.study_name,
        "trials": len(outcome.study.trials),
        "budgets": [b.to_dict() for b in outcome.budgets],
        "baseline": outcome.baseline,
        "front": [trial_row(t) for t in outcome.front],
        "recommended": outcome.recommended.number if outcome.recommended is not None else None,
        "closest": [trial_row(t) for t in outcome.closest],
        "best_per_objective": best_per_objective_rows(outcome),
    }
