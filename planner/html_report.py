"""`planner review --html`: one self-contained page with the study's tables, Pareto plots and parameter
importances, drawn with Optuna's plotly visualisations (plotly.js is inlined: the page works offline)."""
from __future__ import annotations

import html
from pathlib import Path

import optuna

from planner.errors import PlannerError, check_writable
from planner.objectives import metric
from planner.outcome import Outcome, measured
from planner.report import best_table, format_outcome


def axis_name(name: str) -> str:
    m = metric(name)
    return f"{m.label} ({m.unit})" if m.unit and m.unit not in m.label else m.label


def pareto_views(objectives: tuple[str, ...]) -> list[tuple[str, str]]:
    """Two-dimensional views read better than one cloud: the accuracy objective against each of the others."""
    return [(objectives[0], other) for other in objectives[1:]]


def measured_study(study: optuna.Study) -> optuna.Study:
    """An in-memory copy holding only the measured trials. Rejected and skipped candidates carry a stand-in
    perplexity (a multiple of the baseline's) that would squash every plot's axis."""
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials([t for t in study.get_trials(deepcopy=True) if measured(t)])
    return copy


def _figures(study: optuna.Study, objectives: tuple[str, ...]) -> list[tuple[str, object]]:
    import optuna.visualization as vis

    figures = []
    for x, y in pareto_views(objectives):
        ix, iy = objectives.index(x), objectives.index(y)
        figures.append((f"Pareto front: {axis_name(x)} against {axis_name(y)} (feasible trials in colour)",
                        vis.plot_pareto_front(study, target_names=[axis_name(x), axis_name(y)],
                                              targets=lambda t, ix=ix, iy=iy: (t.values[ix], t.values[iy]))))
    for index, name in enumerate(objectives):
        title = f"Parameter importances for {axis_name(name)}"
        try:
            figure = vis.plot_param_importances(study, target=lambda t, i=index: t.values[i],
                                                target_name=axis_name(name))
        except (ValueError, RuntimeError) as exc:
            # Importances need parameters that every measured trial shares and that vary; say why not.
            figures.append((title, f"not available: {exc}"))
            continue
        figures.append((title, figure))
    return figures


def write_html_report(outcome: Outcome, path: Path) -> Path:
    try:
        import plotly  # noqa: F401 - only to fail with a clear message
    except ImportError:
        raise PlannerError("review --html needs plotly: pip install plotly") from None
    path = Path(path)
    check_writable(path, "report")
    study = measured_study(outcome.study)
    title = f"planner study {outcome.study.study_name}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}pre{background:#f4f4f4;padding:1em}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", f"<pre>{html.escape(format_outcome(outcome))}</pre>",
             f"<h2>Best trial per objective</h2><pre>{html.escape(best_table(outcome))}</pre>"]
    if len(study.trials) < 2:
        parts.append("<p>Fewer than two measured trials: nothing to plot yet.</p>")
    else:
        inline_js = True  # plotly.js once, inline: no network when the page is opened
        for heading, figure in _figures(study, outcome.objectives):
            parts.append(f"<h2>{html.escape(heading)}</h2>")
            if isinstance(figure, str):
                parts.append(f"<p>{html.escape(figure)}</p>")
                continue
            parts.append(figure.to_html(full_html=False, include_plotlyjs=inline_js))
            inline_js = False
    parts.append("</body></html>")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("\n".join(parts), encoding="utf-8")
    temporary.replace(path)
    return path
