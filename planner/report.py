"""What a user reads: one line per finished trial, and the outcome as tables or JSON (the Pareto front, the
budget, the baseline, the recommended candidate, the best trial per objective). Columns come from the metric
registry (`planner.objectives`): a study shows the figures its trials measured."""
from __future__ import annotations

import optuna

from planner.objectives import FIGURES, MINIMIZE, OBJECTIVES, column_order, metric
from planner.outcome import CONFIRMATIONS, Compared, Outcome, best_trials, feasible
from planner.workers import NOT_STARTED, answered, finished, repeat, timed_from_disk


def trial_line(trial: optuna.trial.FrozenTrial, total: int, counted: int | None = None) -> str:
    """One line per finished trial; `counted`: the study's trials toward `total` so far (repeats do not count,
    so trial numbers may run past the total)."""
    where = f"{trial.number:>3}/{total}" if counted is None else f"{trial.number:>3} ({counted}/{total})"
    row = trial.user_attrs.get("metrics", {})
    label = trial.user_attrs.get("label", "?")
    if trial.state == optuna.trial.TrialState.FAIL:
        reason = trial.user_attrs.get("failure") or trial.user_attrs.get("interrupted", "unknown")
        return f"trial {where} FAILED  {label}: {reason}"
    figures = "  ".join(f"{m.brief} {m.shown(row.get(m.name))}" for m in FIGURES
                        if m.brief and (m.name in row or m.name == "perplexity"))  # ppl n/a: not scored
    seconds = trial.user_attrs.get("seconds", {}).get("total", 0.0)
    note = (trial.user_attrs.get("rejected") or trial.user_attrs.get(NOT_STARTED)
            or trial.user_attrs.get("skipped_perplexity")
            or trial.user_attrs.get("screened", {}).get("reason")
            or (f"same candidate as trial {trial.user_attrs['duplicate_of']}" if "duplicate_of" in trial.user_attrs
                else ""))
    note = "; ".join(filter(None, (note, timed_from_disk(trial))))
    if repeat(trial):
        note += "; not counted in the trials"
    return (f"trial {where} {'ok  ' if feasible(trial) else 'over'} {figures}  {seconds:5.1f} s  {label}"
            + (f"  ({note})" if note else ""))


def trial_row(trial) -> dict:
    metrics = trial.user_attrs.get("metrics", {})
    return {
        "trial": trial.number,
        **{name: metrics.get(name) for name in column_order()},
        "stages": trial.user_attrs.get("stages", []),
        "label": trial.user_attrs.get("label", ""),
        "constraints": dict(trial.constraints),
        "meets_budget": feasible(trial),
        "undecided": trial.user_attrs.get("undecided", []),  # budgets whose latency interval straddles them
    }


def columns(rows: list[dict]) -> list[str]:
    """The figures any of the rows has, in registry order (a study without kl shows no kl column)."""
    return [name for name in column_order() if any(row.get(name) is not None for row in rows)]


def table(rows: list[dict], marked: int | None = None, first: tuple[str, list[str]] | None = None,
          doubtful: set[int] = frozenset()) -> str:
    """Rows of trials; `first` adds a leading column (its name and one cell per row); `marked` gets a *, the
    `doubtful` trials a ?."""
    names = columns(rows)
    cells = [[str(row["trial"])] + [metric(n).shown(row.get(n)) for n in names] for row in rows]
    headings = ["trial"] + [metric(n).label for n in names]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headings)]
    lead_name, lead = first or ("", [""] * len(rows))
    lead_width = max([len(lead_name), *map(len, lead)])
    gap = " " if lead_width else ""

    def line(mark: str, lead_cell: str, values: list[str], label: str) -> str:
        return (mark + f"{lead_cell:<{lead_width}}" + gap + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths))
                + "  " + label)

    lines = [line("  ", lead_name, headings, "stages")]
    for lead_cell, row, values in zip(lead, rows, cells):
        mark = "* " if row["trial"] == marked else "? " if row["trial"] in doubtful else "  "
        lines.append(line(mark, lead_cell, values, row["label"]))
    return "\n".join(lines)


def best_per_objective_rows(outcome: Outcome) -> dict[str, dict]:
    return {name: trial_row(t) for name, t in best_trials(outcome.study).items()}


def best_table(outcome: Outcome) -> str:
    best = best_per_objective_rows(outcome)
    if not best:
        return "no measured trial yet"
    names = [f"{metric(name).label}{'' if row['meets_budget'] else ' (over budget)'}" for name, row in best.items()]
    return table(list(best.values()), first=("best for", names))


def budget_line(outcome: Outcome) -> str:
    if not outcome.budgets:
        return "budget: none (every measured candidate is feasible)"
    return "budget: " + ", ".join(b.describe() for b in outcome.budgets)


def baseline_line(outcome: Outcome) -> str:
    shown = [f"{metric(name).label} {metric(name).shown(outcome.baseline[name])}"
             for name in column_order() if outcome.baseline.get(name) is not None and name != "bits_per_byte"]
    return "baseline: " + (", ".join(shown) or "not measured yet")


def objectives_line(outcome: Outcome) -> str:
    objectives = [OBJECTIVES[name] for name in outcome.objectives]
    if all(o.direction == MINIMIZE for o in objectives):
        return "objectives (minimised): " + ", ".join(o.label for o in objectives)
    return "objectives: " + ", ".join(f"{o.label} ({o.direction}d)" for o in objectives)


def target_of(outcome: Outcome) -> str:
    """The deployment target the study's figures were measured in (studies before targets: transformers)."""
    return outcome.study.user_attrs.get("target", "transformers")


def not_counted(study: optuna.Study) -> str:
    """What the draws that did not count were, e.g. '3 twin(s) of measured candidates, 2 over the memory budget
    from the spec' ('' when none)."""
    trials = [t for t in study.get_trials(deepcopy=False) if finished(t) and repeat(t)]
    twins = sum("duplicate_of" in t.user_attrs for t in trials)
    late = sum(NOT_STARTED in t.user_attrs for t in trials)
    parts = [f"{twins} twin(s) of measured candidates"] if twins else []
    if len(trials) > twins + late:
        parts.append(f"{len(trials) - twins - late} over the memory budget from the spec")
    if late:
        parts.append(f"{late} predicted to run past the deadline")
    return ", ".join(parts)


def trials_line(outcome: Outcome) -> str:
    """The study's trials as `--trials` counts them (distinct candidates), and the repeats drawn on top."""
    counted = sum(answered(t) for t in outcome.study.get_trials(deepcopy=False))
    extra = not_counted(outcome.study)
    return (f"study {outcome.study.study_name}: {counted} trials, measured in {target_of(outcome)}"
            + (f"; not counted: {extra}" if extra else ""))


def _format_front(outcome: Outcome) -> str:
    lines = [trials_line(outcome), objectives_line(outcome), budget_line(outcome), baseline_line(outcome), ""]
    first = metric(outcome.objectives[0]).label
    if outcome.recommended is not None:
        doubt = outcome.doubtful & {t.number for t in outcome.front}
        lines += [f"Pareto front of the candidates that meet the budget (* = recommended: best {first}"
                  + ("; ? = not clearly within the latency budget: its interval straddles it, or it did not hold "
                     "when re-timed; never recommended over a candidate that clearly meets it" if doubt else "")
                  + "):", table([trial_row(t) for t in outcome.front], outcome.recommended.number, doubtful=doubt)]
    else:
        lines += ["No measured candidate meets the budget. Closest (least total excess over the budget):",
                  table([trial_row(t) for t in outcome.closest])]
    return "\n".join(lines)


def compared_verdict(item: Compared, recommended: int | None) -> str:
    """In words: whether a stock setting meets the budget, which measured candidates dominate it beyond the
    timings' intervals, and which are better but level with it within a timing's interval."""
    if item.failure:
        return f"not measured: {item.failure}"
    budget = "meets the budget" if item.meets_budget else "over the budget"
    said = [f"dominated by trial {_trials(item.dominated_by, recommended)}"] if item.dominated_by else \
        ["no candidate dominates it"]
    if item.level_with:
        said.append(f"better, timing level within the intervals: trial {_trials(item.level_with, recommended)}")
    return "; ".join([budget] + said)


def _trials(numbers: list[int], recommended: int | None, most: int = 6) -> str:
    shown = ", ".join(f"{n}{'*' if n == recommended else ''}" for n in numbers[:most])
    return shown + (f" (+{len(numbers) - most})" if len(numbers) > most else "")


def compared_table(outcome: Outcome) -> str:
    """The stock settings the study measured (`compare`) in the trials' columns, each with its verdict."""
    recommended = outcome.recommended.number if outcome.recommended is not None else None
    rows = [{"trial": "-", **{n: item.row.get(n) for n in column_order()},
             "label": f"{item.label}: {compared_verdict(item, recommended)}"} for item in outcome.compared]
    return table(rows, first=("compared", [item.name for item in outcome.compared]))


def format_outcome(outcome: Outcome) -> str:
    lines = [_format_front(outcome)]
    if outcome.compared:
        lines += ["", "Compared with the target's stock tool, measured as the candidates (objectives compared; "
                      "latency as its same-run ratio; * = recommended):", compared_table(outcome)]
    return "\n".join(lines)


def format_review(outcome: Outcome) -> str:
    return format_outcome(outcome) + "\n\nBest trial per objective:\n" + best_table(outcome)


def outcome_to_dict(outcome: Outcome) -> dict:
    return {
        "study": outcome.study.study_name,
        "trials": len(outcome.study.trials),
        "target": target_of(outcome),
        "objectives": list(outcome.objectives),
        "budgets": [b.to_dict() for b in outcome.budgets],
        "baseline": outcome.baseline,
        "front": [trial_row(t) for t in outcome.front],
        "recommended": outcome.recommended.number if outcome.recommended is not None else None,
        "closest": [trial_row(t) for t in outcome.closest],
        "best_per_objective": best_per_objective_rows(outcome),
        "doubtful": sorted(outcome.doubtful),
        "confirmations": outcome.study.user_attrs.get(CONFIRMATIONS, {}),
        "compared": [{"name": c.name, "label": c.label, **{n: c.row.get(n) for n in column_order()},
                      "meets_budget": c.meets_budget, "dominated_by": c.dominated_by, "level_with": c.level_with,
                      "failure": c.failure}
                     for c in outcome.compared],
    }
