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


@pytest.fixture
def report(tiny_study_file, tmp_path, capsys):
    assert cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "6", "--memory-budget", "0.8x",
                     "-q"]) == 0, capsys.readouterr().err
    path = tmp_path / "report.html"
    assert cli.main(["review", "--study", "tiny", "--storage", f"sqlite:///{tmp_path}/tiny.db", "--html",
                     str(path)]) == 0
    capsys.readouterr()
    return path


def test_the_page_says_what_a_user_trades(report, tmp_path):
    import optuna

    from planner.storage import open_storage

    study = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))
    recommended = yaml_recipe_trial(tmp_path)
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
