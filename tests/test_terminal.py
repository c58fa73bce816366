"""What a user sees in the terminal: planner's own lines, not the libraries' (unless -v)."""
from __future__ import annotations

import os
import subprocess
import sys

import bitsandbytes  # noqa: F401  (required: a broken install fails here)

BNB_SPACE = 'methods = ["bnb"]\nbnb_modes = ["int8", "nf4"]'


def run(*argv, env) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "cli", *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=600)
    return done.returncode, (done.stdout + done.stderr).splitlines()


def test_a_bitsandbytes_search_prints_planners_lines_only_and_v_brings_the_libraries_back(tiny_study_file, tmp_path):
    text = tiny_study_file.read_text()
    tiny_study_file.write_text(text.replace('methods = ["none", "rtn", "dynamic-int8"]', BNB_SPACE))
    env = {**os.environ, "PLANNER_CACHE": str(tmp_path / "cache")}
    code, lines = run("search", "--study-file", tiny_study_file, "--trials", "3", env=env)
    assert code == 0, "\n".join(lines)
    trial_lines = [line for line in lines if line.startswith("trial ")]
    assert len(trial_lines) == 3 and any("quant(bnb int8" in line for line in trial_lines)
    ours = ("trial ", "planner: ", "study ", "objectives ", "budget: ", "baseline: ", "Pareto front", "  trial",
            "* ", "recipe of trial ")
    foreign = [line for line in lines if line.strip() and not line.startswith(ours)
               and not line.lstrip().split(" ")[0].isdigit()]  # table rows start with a trial number
    assert foreign == [], foreign
    assert len(lines) <= 3 + 15  # a line per trial, the outcome table, nothing per forward

    (tmp_path / "tiny.db").unlink()
    code, lines = run("search", "--study-file", tiny_study_file, "--trials", "3", "-v", env=env)
    assert code == 0
    assert any("MatMul8bitLt: inputs will be cast" in line for line in lines)  # bitsandbytes' own log lines
