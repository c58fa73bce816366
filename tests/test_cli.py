import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli

QUICK = ["--context-length", "32", "--stride", "16", "--max-eval-tokens", "256",
         "--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "2", "--warmup", "1"]


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_prints_a_table_and_writes_json(tiny_model_dir, text_corpus_dir, tmp_path, capsys):
    out_file = tmp_path / "figures.json"
    code, out, err = run(["evaluate", "--model", str(tiny_model_dir), "--data", str(text_corpus_dir),
                          "--device", "cpu", "--threads", "1", "--json", str(out_file), *QUICK], capsys)
    assert code == 0, err
    for label in ("perplexity", "bits per byte", "prefill ms (p50)", "decode ms/token (p50)", "weights MB"):
        assert label in out
    figures = json.loads(out_file.read_text())
    assert figures["perplexity"]["protocol"] == {"context_length": 32, "stride": 16, "max_tokens": 256}
    assert figures["perplexity"]["perplexity"] > 1
    assert figures["latency"]["threads"] == 1 and figures["latency"]["decode"]["n"] == 2 * 4
    assert figures["memory"]["weights"]["total_bytes"] > 0
    assert figures["corpus"]["eval_documents"] == ["work_4.txt"]
    assert figures["device"] == "cpu" and figures["environment"]["torch"] == torch.__version__


def test_skip_leaves_an_evaluator_out(tiny_model_dir, capsys):
    code, out, err = run(["evaluate", "--model", str(tiny_model_dir), "--skip", "perplexity", "--skip", "latency"],
                         capsys)
    assert code == 0, err
    assert "weights MB" in out and "perplexity" not in out.split("\n", 1)[1]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_model_dir, text_corpus_dir):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02\x03" * 100)
    (root / "short.txt").write_text("To be.\nOr not.\n")
    (root / "no-config").mkdir()
    from transformers import BertConfig

    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(root / "bert")
    model, data = str(tiny_model_dir), str(text_corpus_dir)
    cases = [
        (["--model", "/nonexistent/model"], "model path /nonexistent/model does not exist"),
        (["--model", "builtin:nope"], "unknown built-in model 'builtin:nope'"),
        (["--model", str(root / "no-config")], "no config.json"),
        (["--model", str(root / "bert"), "--data", data], "not a causal language model"),
        (["--model", model, "--data", str(root / "empty.txt")], "is empty"),
        (["--model", model, "--data", str(root / "binary.txt")], "looks binary"),
        (["--model", model, "--data", str(root / "missing.txt")], "does not exist"),
        (["--model", model, "--data", "builtin:tolstoy"], "unknown built-in corpus"),
        (["--model", model, "--data", str(root / "short.txt"), *QUICK], "fewer than one window"),
        (["--model", model, "--data", data, "--context-length", "16", "--stride", "32"], "stride"),
        (["--model", model, "--data", data, "--context-length", "4096"], "exceeds the model's 256 positions"),
        (["--model", model, "--max-eval-tokens", "0"], "expected a positive number"),
        (["--model", model, "--repeats", "many"], "expected a whole number"),
        (["--model", model, "--device", "abacus"], "unknown device"),
        (["--model", model, "--dtype", "int3"], "unknown dtype"),
        (["--model", model, "--json", "/nonexistent/dir/out.json"], "does not exist"),
        (["--bogus-flag"], "unrecognized arguments"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", model, "--device", "cuda"], "CUDA is not available"))
    return cases


def test_bad_input_gives_one_line_and_exit_code_2(bad_inputs, capsys):
    for argv, message in bad_inputs:
        code, out, err = run(["evaluate", *argv], capsys)
        assert code == 2, (argv, err)
        assert message in err, (argv, err)
        assert err.count("\n") == 1 and err.startswith("planner: error: "), (argv, err)
        assert "Traceback" not in err + out


def console_script() -> list[str]:
    script = Path(sys.executable).with_name("planner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--model", "/nonexistent/model"], "does not exist"),
    (["evaluate", "--model", "builtin:nope"], "unknown built-in model"),
    (["evaluate", "--data", "/dev/null/empty.txt", "--skip", "latency"], "does not exist"),
])
def test_installed_command_exits_2_without_traceback(argv, message):
    proc = subprocess.run([*console_script(), *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_assets_list_names_every_builtin(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path))
    code, out, _ = run(["assets", "list"], capsys)
    assert code == 0
    assert "builtin:smollm2-135m" in out and "builtin:shakespeare" in out and "not fetched" in out
    assert str(tmp_path) in out


@pytest.mark.builtin
def test_builtin_model_on_held_out_shakespeare(tmp_path, capsys):
    """The demo's figures, on a small budget: real weights give a perplexity in the tens."""
    out_file = tmp_path / "builtin.json"
    code, out, err = run(["evaluate", "--max-eval-tokens", "1536", "--skip", "latency", "--json", str(out_file)], capsys)
    assert code == 0, err
    figures = json.loads(out_file.read_text())
    assert 10 < figures["perplexity"]["perplexity"] < 100
    assert 1.0 < figures["perplexity"]["bits_per_byte"] < 2.5
    assert figures["memory"]["weights"]["total_bytes"] == 134_515_008 * 4  # fp32, tied head counted once
    assert set(figures["corpus"]["eval_documents"]) == {"hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt",
                                                        "twelfth_night_gut.txt", "much_ado_about_nothing_gut.txt",
                                                        "julius_caesar_gut.txt"}
