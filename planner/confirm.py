"""The confirmation stage: before a study prints its outcome, the candidates at the top of its front that sit near
a relative latency budget are rebuilt and re-timed in fresh A/B rounds, and the recommendation is one that holds.

A trial's decode ratio was timed once, while the machine did whatever else it did then; a candidate near the
budget can pass or fail on that alone. Here, in accuracy order, each front candidate whose interval reaches
within CONFIRM_NEAR of a ratio budget is timed again (latency only, CONFIRM_REPEATS x the study's rounds, longer
while its interval straddles the budget); the first whose confirmation clearly meets the budget ends the stage.
A confirmation is stored on the study (`confirmations`, by trial number) and `planner.outcome.decide` judges by
it: a candidate that did not hold is never recommended over one that did. Candidates far from the budget
(their whole interval under CONFIRM_NEAR x the budget) need no confirmation. Under a deadline (`--timeout`, a
study's own) none starts past it, nor when the study's longest re-timing so far would not fit in what is left.
"""
from __future__ import annotations

import time

import optuna
from tqdm import tqdm

from planner.budgets import MEETS, Budget, shown_ratio, timed_ratio
from planner.errors import first_line
from planner.outcome import CONFIRMATIONS, confirmation, decide
from planner.recipes import stored_stages
from planner.trial import Workbench, release_memory

CONFIRM_NEAR = 0.85  # a candidate whose interval reaches past this fraction of a ratio budget is confirmed
CONFIRM_REPEATS = 2  # times the study's rounds
CONFIRM_MOST = 3  # candidates re-timed at most per study run


def ratio_budgets(budgets: list[Budget]) -> list[Budget]:
    return [b for b in budgets if b.relative is not None and b.ratio_metric]


def near(trial: optuna.trial.FrozenTrial, budgets: list[Budget]) -> bool:
    """Its timing leaves doubt about a ratio budget: the interval's top within CONFIRM_NEAR of it, or past it."""
    row = trial.user_attrs.get("metrics", {})
    for budget in ratio_budgets(budgets):
        if budget.ratio_metric not in row:
            continue
        _, _, high = timed_ratio(row, budget.ratio_metric)
        if high >= CONFIRM_NEAR * budget.relative:
            return True
    return False


def confirm(study: optuna.Study, bench: Workbench, say=tqdm.write, ends: float | None = None) -> None:
    """Re-time the front's best candidates near a ratio budget until one holds (at most CONFIRM_MOST), none past
    the deadline `ends` (epoch seconds) if there is one."""
    budgets = ratio_budgets(bench.budgets)
    if not budgets:
        return
    for _ in range(CONFIRM_MOST):
        outcome = decide(study, bench.budgets, bench.baseline)
        chosen = outcome.recommended
        if chosen is None or not near(chosen, budgets) or confirmation(study, chosen) is not None:
            return  # nothing to recommend, far from the budget, or already confirmed: the outcome holds
        late = None if ends is None else too_late(study, ends - time.time())
        if late:
            say(f"planner: trial {chosen.number} not re-timed ({late}): judged by its own timing")
            return
        _confirm_one(study, bench, chosen, say)


def too_late(study: optuna.Study, left: float) -> str | None:
    """Why no re-timing starts with `left` seconds before the deadline: none left, or fewer than the study's
    longest re-timing took (None: it starts; the first one runs while any time is left)."""
    if left <= 0:
        return "the deadline has passed"
    taken = [entry["seconds"] for entry in study.user_attrs.get(CONFIRMATIONS, {}).values() if "seconds" in entry]
    if taken and max(taken) > left:
        return f"a re-timing took {max(taken) / 60:.1f} min, {left / 60:.1f} min left before the deadline"
    return None


def _confirm_one(study: optuna.Study, bench: Workbench, trial: optuna.trial.FrozenTrial, say) -> None:
    started = time.perf_counter()
    stages = list(stored_stages(trial.user_attrs["stages"]))
    row = trial.user_attrs["metrics"]
    shown = ", ".join(_timing(row, b) for b in ratio_budgets(bench.budgets) if b.ratio_metric in row)
    say(f"planner: confirming trial {trial.number} ({shown}): rebuilt and re-timed in fresh A/B rounds")
    request = bench.request(may_skip=False).latency_only(CONFIRM_REPEATS)
    try:
        built = bench.steps.build(bench.model, stages, bench.context)
        request.release = lambda: setattr(built, "model", None)
        again = bench.target.measure(request, built.model, trial.user_attrs.get("label", ""))
        fresh = again.row
        verdicts = {b.kind: b.verdict(fresh) for b in ratio_budgets(bench.budgets) if b.ratio_metric in fresh}
        entry = {k: fresh[k] for k in ("decode_ratio", "decode_interval", "prefill_ratio", "prefill_interval",
                                        "latency_rounds", "latency_confidence") if k in fresh}
        entry.update(verdicts=verdicts, seconds=time.perf_counter() - started)
    except Exception as exc:  # a confirmation that cannot run leaves the trial as it was measured
        entry = {"failure": f"{type(exc).__name__}: {first_line(exc, 500)}", "verdicts": {}}
    finally:
        release_memory()
    stored = dict(study.user_attrs.get(CONFIRMATIONS, {}))
    stored[str(trial.number)] = entry
    study.set_user_attr(CONFIRMATIONS, stored)
    if "failure" in entry:
        say(f"planner: trial {trial.number} could not be re-timed ({entry['failure']}); kept as measured")
        return
    said = ", ".join(f"{_timing(fresh, b)}: {entry['verdicts'][b.kind]}" for b in ratio_budgets(bench.budgets)
                     if b.kind in entry["verdicts"])
    held = all(v == MEETS for v in entry["verdicts"].values())
    say(f"planner: trial {trial.number} re-timed at {said}" + ("" if held else "; it does not hold: not recommended"))


def _timing(row: dict, budget: Budget) -> str:
    return f"{budget.kind} {shown_ratio(row, budget.ratio_metric)} against {budget.relative:g}x"
