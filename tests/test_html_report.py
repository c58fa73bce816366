"""`planner review --html`: what the page says, and that a real browser (headless Chromium) draws it without a
JavaScript error."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

import cli
from conftest import write_tiny_study_file

# Flags the machine's probe found necessary for Chromium as root on a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=15000"]
# Injected by the test only: every JavaScript error and console.error, written into the page once it settled.
ERROR_PROBE = ("<script>window.__errors=[];window.addEventListener('error',e=>window.__errors.push(String(e.message)));"
               "const __ce=console.error;console.error=(...a)=>{window.__errors.push(a.join(' '));__ce(...a);};"
               "window.addEventListener('load',()=>setTimeout(()=>{const p=document.createElement('pre');"
               "p.id='js-errors';p.textContent=JSON.stringify(window.__errors);document.body.appendChild(p);},1000));"
               "</script>")


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir, text_corpus_dir):
    """The page of one six-trial study under a memory budget (searched once for the module's tests: they only read
    it), in the study's folder beside tiny.db and recipe.yaml."""
    folder = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PLANNER_CACHE", str(folder / "cache"))
        study_file = write_tiny_study_file(folder, tiny_model_dir, text_corpus_dir)
        assert cli.main(["search", "--study-file", str(study_file), "--trials", "6", "--memory-budget", "0.8x",
                         "-q"]) == 0
        path = folder / "report.html"
        assert cli.main(["review", "--study", "tiny", "--storage", f"sqlite:///{folder}/tiny.db", "--html",
                         str(path)]) == 0
    return path


def test_the_page_says_what_a_user_trades(report):
    import optuna

    from planner.storage import open_storage

    study = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{report.parent}/tiny.db"))
    recommended = yaml_recipe_trial(report.parent)
    page = report.read_text()
    assert "What perplexity costs in decode ms" in page and "What perplexity costs in weight MB" in page
    assert f"recommended: trial {recommended}" in page and "baseline (uncompressed)" in page
    limit_mb = study.user_attrs["budgets"][0]["limit"] / 1e6
    assert f"budget {limit_mb:.1f}" in page  # the memory budget drawn on the weight axis, in MB
    assert "Seconds per trial and stage" in page and "<table class='compare'>" in page
    assert page.count("Plotly.newPlot") >= 3 and 'src="https://' not in page  # plotly.js inlined, once
    labels = {t.user_attrs["label"] for t in study.trials if "perplexity" in t.user_attrs.get("metrics", {})}
    # Every measured point says which stages it is (in the figures' JSON, "/" is written \u002f).
    assert labels and [label for label in labels if label.replace("/", "\\u002f") not in page] == []


def yaml_recipe_trial(tmp_path) -> int:
    import yaml

    return yaml.safe_load((tmp_path / "recipe.yaml").read_text())["provenance"]["trial"]


def chromium() -> str:
    found = os.environ.get("PLANNER_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    return found


def test_a_headless_browser_draws_every_plot_without_a_javascript_error(report, tmp_path):
    browser = chromium()
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("<head>", "<head>" + ERROR_PROBE, 1))
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, *profile, "--dump-dom", probed.as_uri()], capture_output=True,
                         text=True, timeout=180).stdout
    errors = re.search(r'<pre id="js-errors">(.*?)</pre>', dom, re.S)
    assert errors is not None, "the page's scripts did not finish"
    assert json.loads(errors.group(1).replace("&quot;", '"')) == []
    graphs = re.findall(r'<div id="[^"]+" class="([^"]*plotly-graph-div[^"]*)"', dom)
    assert len(graphs) >= 3 and all("js-plotly-plot" in classes for classes in graphs)  # each one rendered
    assert dom.count('class="main-svg"') >= 2 * len(graphs)  # plotly draws two svg layers per plot
    assert dom.count('class="point"') > 10  # the trials' markers and bars are there, not empty axes

    shot = tmp_path / "report.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, *profile, "--window-size=1200,2400", f"--screenshot={shot}",
                    report.as_uri()], capture_output=True, timeout=180, cwd=tmp_path)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 30_000  # a drawn page, not a blank one


# Injected by the test only: for every plot, the points of the "meets the budget" trace that lie past a budget line
# (a dashed vertical or horizontal line), written into the page once plotly has drawn.
SIDE_PROBE = ("<script>window.addEventListener('load',()=>setTimeout(()=>{const out=[];let lines=0;"
              "document.querySelectorAll('.js-plotly-plot').forEach(gd=>{const shapes=(gd.layout.shapes||[])"
              ".filter(s=>s.type==='line'&&s.line&&s.line.dash==='dash');lines+=shapes.length;"
              "gd.data.filter(t=>t.name==='meets the budget').forEach(t=>{shapes.forEach(s=>{"
              "const vertical=s.x0===s.x1;const limit=vertical?s.x0:s.y0;const values=vertical?t.x:t.y;"
              "values.forEach(v=>{if(v>limit)out.push([t.name,v,limit]);});});});});"
              "const p=document.createElement('pre');p.id='budget-sides';p.textContent=JSON.stringify({lines,out});"
              "document.body.appendChild(p);},1000));</script>")


def _drawn_sides(page, tmp_path, name) -> dict:
    probed = tmp_path / f"{name}.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + SIDE_PROBE, 1))
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / ('profile-' + name)}",
                          "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180).stdout
    found = re.search(r'<pre id="budget-sides">(.*?)</pre>', dom, re.S)
    assert found is not None, "the page's scripts did not finish"
    return json.loads(found.group(1).replace("&quot;", '"'))


def test_every_point_that_meets_the_budget_is_drawn_on_its_allowed_side(report, tmp_path):
    """A memory budget (MB axis) in a real study, and a relative latency budget, drawn on the same-run ratio it is
    judged by (the points as decode x with their intervals; ms would put some past the line)."""
    memory = _drawn_sides(report, tmp_path, "memory")
    assert memory["lines"] >= 1 and memory["out"] == []
    ratio_page = _ratio_budget_report(tmp_path)
    latency = _drawn_sides(ratio_page, tmp_path, "latency")
    assert latency["lines"] >= 1 and latency["out"] == []
    assert "decode x" in ratio_page.read_text() and "(0.29x same run)" in ratio_page.read_text()


def _ratio_budget_report(tmp_path):
    """A study under decode <= 0.3x whose candidates' ms, read against the baseline's ms, would say otherwise:
    each was timed when the machine was slower (its reference too, so the same-run ratio is what holds)."""
    import optuna

    from planner.budgets import parse_budget
    from planner.html_report import write_html_report
    from planner.outcome import decide

    baseline = {"perplexity": 20.0, "decode_ms_p50": 10.0, "weight_mb": 500.0}
    budget = parse_budget("latency", "0.3x").resolve(baseline)
    study = optuna.create_study(directions=["minimize"] * 2)
    study.set_metric_names(["perplexity", "decode_ms_p50"])
    for number, (ppl, ms, ratio) in enumerate([(21.0, 3.9, 0.29), (22.0, 3.5, 0.25), (25.0, 3.6, 0.33)]):
        metrics = {"perplexity": ppl, "decode_ms_p50": ms, "decode_ratio": ratio, "weight_mb": 90.0,
                   "decode_interval": [ratio - 0.01, ratio + 0.005], "stages": f"candidate {number}"}
        study.add_trial(optuna.trial.create_trial(values=[ppl, ms], constraints={"latency": budget.violation(metrics)},
                                                  user_attrs={"metrics": metrics, "label": f"candidate {number}"}))
    return write_html_report(decide(study, [budget], baseline), tmp_path / "ratio.html")


def test_a_relative_latency_budget_is_plotted_on_the_ratio_an_absolute_one_in_ms(tmp_path):
    import optuna

    from planner.budgets import parse_budget
    from planner.html_report import Axis, axis_of
    from planner.outcome import Outcome

    baseline = {"decode_ms_p50": 10.0}
    trial = optuna.trial.create_trial(values=[1.0], user_attrs={"metrics": {"decode_ms_p50": 3.0, "decode_ratio": 0.3}})
    relative = Outcome(None, [parse_budget("latency", "0.3x").resolve(baseline)], baseline, [], None, [])
    assert axis_of(relative, "decode_ms_p50", [trial]) == Axis("decode_ratio", 0.3, "decode_interval")
    absolute = Outcome(None, [parse_budget("latency", "3ms")], baseline, [], None, [])
    assert axis_of(absolute, "decode_ms_p50", [trial]) == Axis("decode_ms_p50", 3.0)
    untimed = optuna.trial.create_trial(values=[1.0], user_attrs={"metrics": {"decode_ms_p50": 3.0}})
    assert axis_of(relative, "decode_ms_p50", [untimed]) == Axis("decode_ms_p50", 3.0)
    unbudgeted = Outcome(None, [parse_budget("memory", "100MB")], baseline, [], None, [])
    assert axis_of(unbudgeted, "decode_ms_p50", [trial]) == Axis("decode_ratio", None, "decode_interval")
    assert axis_of(unbudgeted, "weight_mb", [trial]) == Axis("weight_mb", 100.0)
