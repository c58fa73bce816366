"""`planner review --html`: one self-contained page (plotly.js inlined once: it works offline) that answers
"what do I give up for what?": the accuracy objective against each cost, with the baseline, the budget, the
Pareto front and the recommended candidate marked and every point labelled with its stages; a table of the
recommended candidate against the baseline and the best uniform recipe; the seconds each trial spent per
stage; and parameter importances where they say something."""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import optuna

from planner.budgets import INTERVALS, METRICS, RATIOS
from planner.errors import PlannerError, check_writable
from planner.objectives import OBJECTIVES, accuracy_objectives, column_order, metric, minimised
from planner.outcome import Outcome, feasible, measured, pareto_front
from planner.report import best_table, format_outcome, target_of

# latency figure -> its same-run ratio to the reference (decode_ms_p50 -> decode_ratio), where a target times A/B
SAME_RUN = {METRICS[kind][0]: ratio for kind, ratio in RATIOS.items()}
IMPORTANCE_FLOOR = 0.01  # importances below this say nothing: left out of the plot
COLOURS = {"feasible": "#1f77b4", "infeasible": "#b0b0b0", "front": "#1f77b4", "recommended": "#d62728",
           "baseline": "#2ca02c", "stock": "#9467bd", "budget": "rgba(214, 39, 40, 0.08)"}


def axis_name(name: str) -> str:
    m = metric(name)
    return f"{m.label} ({m.unit})" if m.unit and m.unit not in m.label else m.label


def pareto_views(objectives: tuple[str, ...]) -> list[tuple[str, str]]:
    """Two-dimensional views read better than one cloud: each cost (x: decode ms, weight MB, ...) against each
    accuracy objective (y: perplexity, kl), the study's first accuracy objective first."""
    accuracy = accuracy_objectives(objectives)
    costs = [n for n in objectives if n not in accuracy]
    if not costs:  # accuracy against accuracy (e.g. perplexity and kl only)
        return [(accuracy[1], accuracy[0])] if len(accuracy) > 1 else []
    return [(cost, y) for y in accuracy for cost in costs]


def _shown_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Measured trials, each candidate once (a twin repeats its original's figures)."""
    return [t for t in study.get_trials(deepcopy=False) if measured(t) and "duplicate_of" not in t.user_attrs]


def _hover(trial, names: tuple[str, ...]) -> str:
    row = trial.user_attrs["metrics"]
    figures = "<br>".join(f"{metric(n).label}: {metric(n).shown(row.get(n))}" for n in names if row.get(n) is not None)
    verdict = "meets the budget" if feasible(trial) else "over the budget"
    return f"trial {trial.number}: {html.escape(trial.user_attrs.get('label', ''))}<br>{figures}<br>{verdict}"


def budget_limit(outcome: Outcome, name: str) -> float | None:
    """The budget on objective `name`, in that objective's unit (None when there is none)."""
    objective = OBJECTIVES.get(name)
    budget = next((b for b in outcome.budgets if objective is not None and b.kind == objective.budget), None)
    if budget is None or budget.limit is None:
        return None
    return budget.limit * objective.budget_scale


@dataclass(frozen=True)
class Axis:
    """What an objective's axis plots: the figure its budget's verdict uses (a relative latency budget is judged
    on the same-run ratio, so that is drawn, with its confidence interval as error bars), and the budget's
    line in that figure's unit."""

    name: str  # the metrics-row key plotted
    limit: float | None
    interval: str | None = None  # the row key of [low, high] error bars


def axis_of(outcome: Outcome, name: str, trials) -> Axis:
    """A latency timed A/B is drawn as its same-run ratio (comparable across the study's timings), with the
    budget's line at its ratio, unless the budget is absolute (ms): then in ms, as it is judged."""
    objective = OBJECTIVES.get(name)
    budget = next((b for b in outcome.budgets if objective is not None and b.kind == objective.budget), None)
    ratio = SAME_RUN.get(name)
    if ratio and (budget is None or budget.relative is not None) \
            and any(ratio in t.user_attrs["metrics"] for t in trials):
        return Axis(ratio, budget.relative if budget is not None else None, INTERVALS.get(ratio))
    return Axis(name, budget_limit(outcome, name))


def _error_bars(rows: list[dict], axis: Axis) -> dict | None:
    if axis.interval is None or not any(row.get(axis.interval) for row in rows):
        return None
    low = [row[axis.name] - (row.get(axis.interval) or [row[axis.name]] * 2)[0] for row in rows]
    high = [(row.get(axis.interval) or [row[axis.name]] * 2)[1] - row[axis.name] for row in rows]
    return {"type": "data", "symmetric": False, "array": high, "arrayminus": low, "thickness": 1}


def trade_off_figure(outcome: Outcome, x: str, y: str):
    import plotly.graph_objects as go

    names = outcome.objectives
    trials = _shown_trials(outcome.study)
    ax, ay = axis_of(outcome, x, trials), axis_of(outcome, y, trials)
    trials = [t for t in trials if ax.name in t.user_attrs["metrics"] and ay.name in t.user_attrs["metrics"]]
    value = lambda t, a: t.user_attrs["metrics"][a.name]  # noqa: E731
    figure = go.Figure()
    for label, group, symbol in (("meets the budget", [t for t in trials if feasible(t)], "circle"),
                                 ("over the budget", [t for t in trials if not feasible(t)], "circle-open")):
        if group:
            colour = COLOURS["feasible" if symbol == "circle" else "infeasible"]
            rows = [t.user_attrs["metrics"] for t in group]
            figure.add_trace(go.Scatter(
                x=[value(t, ax) for t in group], y=[value(t, ay) for t in group], mode="markers", name=label,
                marker={"symbol": symbol, "size": 9, "color": colour}, hovertemplate="%{text}<extra></extra>",
                error_x=_error_bars(rows, ax), error_y=_error_bars(rows, ay),
                text=[_hover(t, names) for t in group]))
    # The front of this view: feasible candidates no other beats on both of its axes (the study's front is
    # over every objective, and its projection is not a front).
    feasible_here = [t for t in trials if feasible(t)]
    front = sorted(pareto_front(feasible_here, values=lambda t: (value(t, ax), value(t, ay))),
                   key=lambda t: (value(t, ax), value(t, ay)))
    if front:
        figure.add_trace(go.Scatter(x=[value(t, ax) for t in front], y=[value(t, ay) for t in front], mode="lines",
                                    name="trade-off front (meets the budget)", hoverinfo="skip",
                                    line={"color": COLOURS["front"], "dash": "dot", "shape": "hv"}))
    baseline = outcome.baseline
    if baseline.get(ax.name) is not None and baseline.get(ay.name) is not None:
        figure.add_trace(go.Scatter(
            x=[baseline[ax.name]], y=[baseline[ay.name]], mode="markers+text", name="baseline (uncompressed)",
            text=["baseline"], textposition="top center", marker={"symbol": "diamond", "size": 13,
                                                                    "color": COLOURS["baseline"]},
            hovertemplate=f"baseline<br>{metric(ax.name).label}: %{{x}}<br>{metric(ay.name).label}: %{{y}}"
                          "<extra></extra>"))
    stock = [c for c in outcome.compared if ax.name in c.row and ay.name in c.row]
    if stock:  # the target's stock tool (`compare`), measured as the candidates
        figure.add_trace(go.Scatter(
            x=[c.row[ax.name] for c in stock], y=[c.row[ay.name] for c in stock], mode="markers+text",
            name="stock tool (compare)", text=[c.name for c in stock], textposition="top center",
            error_x=_error_bars([c.row for c in stock], ax), error_y=_error_bars([c.row for c in stock], ay),
            marker={"symbol": "x", "size": 11, "color": COLOURS["stock"]}, hovertemplate="%{customdata}<extra></extra>",
            customdata=[f"{html.escape(c.label)}<br>{metric(ax.name).label}: {metric(ax.name).shown(c.row[ax.name])}"
                        f"<br>{metric(ay.name).label}: {metric(ay.name).shown(c.row[ay.name])}" for c in stock]))
    if outcome.recommended is not None and outcome.recommended in trials:
        chosen = outcome.recommended
        figure.add_trace(go.Scatter(
            x=[value(chosen, ax)], y=[value(chosen, ay)], mode="markers+text", name="recommended",
            text=[f"recommended: trial {chosen.number}"], textposition="bottom right",
            marker={"symbol": "star", "size": 20, "color": COLOURS["recommended"],
                    "line": {"width": 1, "color": "black"}},
            hovertemplate="%{customdata}<extra></extra>", customdata=[_hover(chosen, names)]))
    for axis, shown in (("x", ax), ("y", ay)):
        if shown.limit is None:
            continue
        # The budget as a dashed line, the region past it shaded: what lies there is not recommendable.
        region = {"fillcolor": COLOURS["budget"], "line": {"width": 0}, "layer": "below"}
        far = max([shown.limit, baseline.get(shown.name) or 0.0]
                  + [t.user_attrs["metrics"][shown.name] for t in trials])
        text = f"budget {metric(shown.name).shown(shown.limit)}"
        if axis == "x":
            figure.add_vline(x=shown.limit, line_dash="dash", line_color=COLOURS["recommended"], annotation_text=text)
            figure.add_vrect(x0=shown.limit, x1=far * 1.05, **region)
        else:
            figure.add_hline(y=shown.limit, line_dash="dash", line_color=COLOURS["recommended"], annotation_text=text)
            figure.add_hrect(y0=shown.limit, y1=far * 1.05, **region)
    better = "lower" if OBJECTIVES[y].direction == "minimize" else "higher"
    figure.update_layout(xaxis_title=axis_name(ax.name), yaxis_title=f"{axis_name(ay.name)} ({better} is better)",
                         legend={"orientation": "h", "y": -0.2}, margin={"t": 30}, height=520)
    if ay.name == "perplexity" and trials and max(value(t, ay) for t in trials) > 10 * min(value(t, ay) for t in trials):
        figure.update_yaxes(type="log")  # a few broken candidates would squash the useful range
    return figure


def is_uniform(trial) -> bool:
    """One quantization stage at one bit-width everywhere, as a user would pick by hand."""
    stages = trial.user_attrs.get("stages", [])
    if len(stages) != 1 or stages[0]["technique"] != "quantization":
        return False
    spec = stages[0]["spec"]
    return len({spec["bits"]["attn"], spec["bits"]["mlp"]}) == 1 and not spec.get("overrides")


def comparison_rows(outcome: Outcome) -> list[tuple[str, dict]]:
    """(name, metrics row) of the baseline, the recommended candidate, each stock setting compared against
    (`compare`) and the best uniform recipe."""
    rows = [("baseline (uncompressed)", outcome.baseline)]
    if outcome.recommended is not None:
        rows.append((f"recommended: trial {outcome.recommended.number}", outcome.recommended.user_attrs["metrics"]))
    rows += [(f"stock: {c.label}", c.row) for c in outcome.compared if c.row]
    uniform = [t for t in _shown_trials(outcome.study) if feasible(t) and is_uniform(t)]
    if uniform:
        best = min(uniform, key=lambda t: (minimised(outcome.objectives, t.values)[0], t.number))
        rows.append((f"best uniform recipe: trial {best.number}", best.user_attrs["metrics"]))
    return rows


def comparison_table(outcome: Outcome) -> str:
    names = [n for n in column_order() if n not in ("bits_per_byte", "decode_ratio")
             and (outcome.baseline.get(n) is not None or n in outcome.objectives)]
    head = "".join(f"<th>{html.escape(metric(n).label)}</th>" for n in names)
    body = []
    for label, row in comparison_rows(outcome):
        cells = []
        for n in names:
            value, base = row.get(n), outcome.baseline.get(n)
            same_run = row.get(SAME_RUN.get(n, ""))  # the ratio a relative budget's verdict used, where timed
            if same_run is not None and row is not outcome.baseline:
                ratio = f" <small>({same_run:.2f}x same run)</small>"
            elif getattr(OBJECTIVES.get(n), "uses_reference", False):
                ratio = ""  # a divergence from the baseline itself (kl): its ratio to the baseline's ~0 says nothing
            else:
                ratio = f" <small>({value / base:.2f}x)</small>" if value is not None and base else ""
            cells.append(f"<td>{metric(n).shown(value)}{ratio}</td>")
        stages = html.escape(row.get("stages", "")) if row is not outcome.baseline else "baseline"
        body.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}<td>{stages}</td></tr>")
    return (f"<table class='compare'><tr><th></th>{head}<th>stages</th></tr>{''.join(body)}</table>"
            "<p><small>Ratios are to the baseline's figure; a latency timed A/B shows its same-run ratio to the "
            "uncompressed model (what a relative budget is judged on).</small></p>")


def timeline_figure(study: optuna.Study):
    """Seconds each trial spent per stage (build stages, measuring; rejected and twin trials in one piece)."""
    import plotly.graph_objects as go

    trials = [t for t in study.get_trials(deepcopy=False) if "seconds" in t.user_attrs]
    if not trials:
        return None
    parts: dict[str, list[float]] = {}
    for index, trial in enumerate(trials):
        seconds = dict(trial.user_attrs["seconds"])
        total = seconds.pop("total", 0.0)
        if not seconds:
            seconds = {"judged without building" if "duplicate_of" not in trial.user_attrs else "twin reused": total}
        for stage, value in seconds.items():
            parts.setdefault(stage, [0.0] * len(trials))[index] = value
    labels = [f"trial {t.number}" for t in trials]
    figure = go.Figure([go.Bar(y=labels, x=values, name=stage, orientation="h",
                               hovertemplate=f"{stage}: %{{x:.1f}} s<extra>%{{y}}</extra>")
                        for stage, values in parts.items()])
    figure.update_layout(barmode="stack", xaxis_title="seconds", height=max(300, 22 * len(trials) + 120),
                         yaxis={"autorange": "reversed"}, margin={"t": 30}, legend={"orientation": "h", "y": -0.1})
    return figure


def importance_figure(study: optuna.Study, index: int, name: str):
    """Parameter importances for one objective, only those >= IMPORTANCE_FLOOR; or a sentence saying why none."""
    import plotly.graph_objects as go

    trials = [t for t in study.get_trials(deepcopy=False) if measured(t)]
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials(trials)
    try:
        importances = optuna.importance.get_param_importances(copy, target=lambda t: t.values[index])
    except (ValueError, RuntimeError) as exc:
        return f"not available: {exc}"
    shown = {param: value for param, value in importances.items() if value >= IMPORTANCE_FLOOR}
    if not shown:
        return f"no parameter explains {IMPORTANCE_FLOOR:.0%} or more of the {metric(name).label} of the measured trials"
    params = list(reversed(shown))
    figure = go.Figure(go.Bar(x=[shown[p] for p in params], y=params, orientation="h",
                              hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    figure.update_layout(xaxis_title="importance (fANOVA share of the variance)", height=120 + 28 * len(params),
                         margin={"t": 30})
    return figure


def write_html_report(outcome: Outcome, path: Path) -> Path:
    try:
        import plotly  # noqa: F401 - only to fail with a clear message
    except ImportError:
        raise PlannerError("review --html needs plotly: pip install plotly") from None
    path = Path(path)
    check_writable(path, "report")
    title = f"planner study {outcome.study.study_name}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}pre{background:#f4f4f4;padding:1em;"
             "overflow-x:auto}table.compare{border-collapse:collapse}table.compare td,table.compare th"
             "{border:1px solid #ccc;padding:.3em .6em;text-align:right}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Every figure measured in {html.escape(target_of(outcome))} (the study's deployment target).</p>"]
    figures: list[tuple[str, object]] = []
    if len(_shown_trials(outcome.study)) < 1:
        parts.append("<p>No measured trial yet: nothing to plot.</p>")
    else:
        shown = _shown_trials(outcome.study)
        for x, y in pareto_views(outcome.objectives):
            drawn = metric(axis_of(outcome, x, shown).name).label  # e.g. decode x where timed A/B
            figures.append((f"What {metric(y).label} costs in {drawn}", trade_off_figure(outcome, x, y)))
    parts.append("<h2>Recommended against the baseline and the best uniform recipe</h2>" + comparison_table(outcome))
    inline_js = True  # plotly.js once, inline: no network when the page is opened

    def add(heading: str, figure) -> None:
        nonlocal inline_js
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(figure, str):
            parts.append(f"<p>{html.escape(figure)}</p>")
            return
        parts.append(figure.to_html(full_html=False, include_plotlyjs=inline_js, config={"responsive": True}))
        inline_js = False

    for heading, figure in figures:
        add(heading, figure)
    timeline = timeline_figure(outcome.study)
    if timeline is not None:
        add("Seconds per trial and stage", timeline)
    if len([t for t in outcome.study.get_trials(deepcopy=False) if measured(t)]) >= 2:
        for index, name in enumerate(outcome.objectives):
            add(f"What moves {metric(name).label}: parameter importances", importance_figure(outcome.study, index, name))
    parts += [f"<h2>Outcome</h2><pre>{html.escape(format_outcome(outcome))}</pre>",
              f"<h2>Best trial per objective</h2><pre>{html.escape(best_table(outcome))}</pre>", "</body></html>"]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("\n".join(parts), encoding="utf-8")
    temporary.replace(path)
    return path
