"""`planner review --html`: one self-contained page with the study's tables, Pareto plots and parameter
importances, drawn with Optuna's plotly visualisations (plotly.js is inlined: the page works offline)."""
from __future__ import annotations

import html
from pathlib import Path

import optuna

from planner.errors import PlannerError
from planner.report import best_table, format_outcome
from planner.search import OBJECTIVES
from planner.study_run import SearchOutcome, measured

AXIS_NAMES = {"perplexity": "perplexity", "decode_ms_p50": "decode ms/token (p50)", "weight_mb": "weights (MB)"}
# Two-dimensional views read better than one 3-D cloud: perplexity against each cost.
PARETO_VIEWS = (("perplexity", "weight_mb"), ("perplexity", "decode_ms_p50"))


def measured_study(study: optuna.Study) -> optuna.Study:
    """An in-memory copy holding only the measured trials. Rejected and skipped candidates carry a stand-in
    perplexity (a multiple of the baseline's) that would squash every plot's axis."""
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials([t for t in study.get_trials(deepcopy=True) if measured(t)])
    return copy


def _figures(study: optuna.Study) -> list[tuple[str, object]]:
    import optuna.visualization as vis

    figures = []
    for x, y in PARETO_VIEWS:
        ix, iy = OBJECTIVES.index(x), OBJECTIVES.index(y)
        figures.append((f"Pareto front: {AXIS_NAMES[x]} against {AXIS_NAMES[y]} (feasible trials in colour)",
                        vis.plot_pareto_front(study, target_names=[AXIS_NAMES[x], AXIS_NAMES[y]],
                                              targets=lambda t, ix=ix, iy=iy: (t.values[ix], t.values[iy]))))
    for index, name in enumerate(OBJECTIVES):
        title = f"Parameter importances for {AXIS_NAMES[name]}"
        try:
            figure = vis.plot_param_importances(study, target=lambda t, i=index: t.values[i],
                                                target_name=AXIS_NAMES[name])
        except (ValueError, RuntimeError) as exc:
            # Importances need parameters that every measured trial shares and that vary; say why not.
            figures.append((title, f"not available: {exc}"))
            continue
        figures.append((title, figure))
    return figures


def write_html_report(outcome: SearchOutcome, path: Path) -> Path:
    try:
        import plotly  # noqa: F401 - only to fail with a clear message
    except ImportError:
        raise PlannerError("review --html needs plotly: pip install plotly") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise PlannerError(f"cannot write {path}: folder {path.parent} does not exist")
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
        for heading, figure in _figures(study):
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
