"""`planner review --dashboard`: a real optuna-dashboard on a free loopback port, read through its HTTP API."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import optuna
import optuna_dashboard  # noqa: F401  (the dashboard extra, required: make test installs it)

import cli
from conftest import interruptible
from planner.storage import open_storage


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def attrs(serialized: list) -> dict:
    """optuna-dashboard sends user attributes as [{key, value}] with values as strings."""
    return {a["key"]: a["value"] for a in serialized}


def test_the_dashboard_serves_the_study_with_the_planners_attributes(tiny_study_file, tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/tiny.db"
    assert cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "3", "-q"]) in (0, 1)
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs={"failure": "OutOfMemoryError: out of memory", "label": "x"}))
    process = subprocess.Popen([sys.executable, "-m", "cli", "review", "--study", "tiny", "--storage", url,
                                "--dashboard", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=interruptible)  # Ctrl-C delivered, however pytest was started
    try:
        hint = process.stdout.readline()
        assert hint.startswith("optuna-dashboard: http://127.0.0.1:") and hint.rstrip().endswith("(Ctrl-C stops it)"), \
            hint + process.stderr.read() if process.poll() is not None else hint
        page = hint.split()[1]
        base = page.split("/dashboard/")[0]
        summaries = get(f"{base}/api/studies")["study_summaries"]
        (summary,) = [s for s in summaries if s["study_name"] == "tiny"]
        assert page.endswith(f"/dashboard/studies/{summary['study_id']}")
        assert attrs(summary["user_attrs"])["model"]  # the study's own attributes: model, baseline, budgets
        detail = get(f"{base}/api/studies/{summary['study_id']}")
        trials = detail["trials"]
        assert len(trials) == len(study.get_trials()) and detail["objective_names"] == ["perplexity", "decode_ms_p50", "weight_mb"]
        measured = [attrs(t["user_attrs"]) for t in trials if t["state"] == "Complete"]
        assert measured and all({"stages", "label", "metrics", "seconds"} <= set(a) for a in measured)
        assert any("perplexity" in a["metrics"] for a in measured)
        failed = [attrs(t["user_attrs"]) for t in trials if t["state"] == "Fail"]
        assert failed == [{"failure": "OutOfMemoryError: out of memory", "label": "x"}]
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == 0 and "Traceback" not in process.stderr.read()


def test_a_busy_port_and_a_missing_study_are_one_line(tiny_study_file, tmp_path, capsys):
    import socket

    assert cli.main(["search", "--study-file", str(tiny_study_file), "--trials", "1", "-q"]) in (0, 1)
    url = f"sqlite:///{tmp_path}/tiny.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["review", "--study", "tiny", "--storage", url, "--dashboard", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"planner: error: cannot serve the dashboard on 127.0.0.1:{port}: ") and err.count("\n") == 1
    assert cli.main(["review", "--study", "ghost", "--storage", url, "--dashboard", "--port", "0"]) == 2
    assert "no study 'ghost' in" in capsys.readouterr().err
    assert cli.main(["review", "--dashboard", "--storage", url]) == 2
    assert "review --dashboard needs --study NAME" in capsys.readouterr().err
    assert cli.main(["review", "--study", "tiny", "--dashboard", "--port", "70000"]) == 2
    assert "expected a port number from 0 to 65535, got 70000" in capsys.readouterr().err
