"""The llama.cpp target beyond the hand-written writer's three architectures: `auto` picks llama.cpp for a model
only llama.cpp's converter serves, and a search with all three techniques on ships a GGUF that loads in llama.cpp
and generates (a tiny random model of a real configuration, made here: Phi-3 with its fused projections and a
SentencePiece vocabulary; Qwen3 with SmolLM2's byte-level BPE passed too, see the parameters)."""
from __future__ import annotations

import os
import shutil

import optuna
import pytest
import yaml

import cli
from conftest import TINY_STUDY_SPACE
from planner.storage import open_storage
from test_convert import CASES, _sentencepiece, _special_ids

# the llama.cpp target's own methods, llama-quant's calibration kept small (its decode costs not asked for)
SEARCH = TINY_STUDY_SPACE.replace('target = "transformers"', 'target = "auto"').replace(
    'methods = ["none", "rtn", "dynamic-int8"]',
    'methods = ["none", "rtn", "llama-quant"]\n[space.quantization.allocation]\nsamples = 4\nseq_len = 32\n'
    'speed = [0.0]')


def _folder(case_name, tmp_path, corpus_lines):
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

    from planner import assets

    case = next(c for c in CASES if c.name == case_name)
    if case.tokenizer == "bpe":
        tokenizer = AutoTokenizer.from_pretrained(assets.ensure(assets.lookup("model", "smollm2-135m")))
    else:
        gemma = case.tokenizer == "gemma-sp"
        _sentencepiece(tmp_path / "sp", corpus_lines, gemma=gemma)
        tokenizer = (GemmaTokenizer if gemma else LlamaTokenizer).from_pretrained(tmp_path / "sp")
    model = case.make(len(tokenizer), _special_ids(tokenizer))
    folder = tmp_path / case_name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if case.tokenizer != "bpe":  # as a Llama-2-style checkpoint ships it (transformers 5 saves tokenizer.json only)
        shutil.copyfile(tmp_path / "sp" / "tokenizer.model", folder / "tokenizer.model")
    return folder


# Phi-3 in the suite (fused projections, SentencePiece, head cuts left out: the most the target must get right;
# about 40 s). PLANNER_TEST_ALL_ARCHITECTURES=1 runs every architecture of tests/test_convert.py (about 10 min);
# True: llama.cpp loads pruned heads of that architecture (writer.FREE_HEAD_SPLIT), so the space keeps head cuts.
HEADS_KEPT = {"llama3-rope": True, "llama2-sentencepiece": True, "mistral": True, "qwen3": True}
# cases the planner's own writer serves (Llama 3 rotary scaling; test_convert checks its file against the converter's)
HAND_WRITTEN_CASES = {"llama3-rope"}
ARCHITECTURES = [c.name for c in CASES] if os.environ.get("PLANNER_TEST_ALL_ARCHITECTURES") else ["phi3"]


@pytest.mark.builtin
@pytest.mark.parametrize("case_name", ARCHITECTURES)
def test_a_converter_only_architecture_is_searched_and_shipped_on_llama_cpp(case_name, tmp_path, text_corpus_dir,
                                                                           capsys, monkeypatch):
    from llama_cpp import Llama

    from planner.sources import DataSource, load_corpus

    lines = [line for doc in load_corpus(DataSource.parse("builtin:shakespeare")).train[:2]
             for line in doc.text.splitlines() if line.strip()]
    folder = _folder(case_name, tmp_path, lines)
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "cache"))
    study = tmp_path / "study.toml"
    study.write_text(f'model = "{folder}"\ndata = "{text_corpus_dir}"\nstudy = "tiny"\n'
                     f'storage = "sqlite:///{tmp_path}/tiny.db"\nrecipe = "{tmp_path}/recipe.yaml"\n' + SEARCH)
    code = cli.main(["search", "--study-file", str(study), "--trials", "4", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    stored = optuna.load_study(study_name="tiny", storage=open_storage(f"sqlite:///{tmp_path}/tiny.db"))
    assert stored.user_attrs["target"] == "llama.cpp"  # auto: llama.cpp serves it through its converter
    measured = [t for t in stored.trials if "measurements" in t.user_attrs]
    failed = [(t.user_attrs.get("label"), t.user_attrs.get("failure")) for t in stored.trials
              if t.state == optuna.trial.TrialState.FAIL]
    assert measured and not failed, failed
    # llama-quant took part: its tensor names are the converted file's (a mismatch fails the trial)
    assert any(t.user_attrs["measurements"]["runtime"].get("quantizer") == "llama.cpp" for t in measured)
    writer = "planner GGUF writer" if case_name in HAND_WRITTEN_CASES else "llama.cpp converter"
    for trial in measured:
        runtime = trial.user_attrs["measurements"]["runtime"]
        assert runtime["writer"] == writer and (writer != "llama.cpp converter" or runtime["converter"]["llama_cpp"])
        assert trial.user_attrs["metrics"]["perplexity"] > 1
    heads = {t.params.get("pruning.heads_keep") for t in stored.trials} - {None}
    if not HEADS_KEPT.get(case_name):  # pruned heads would not load in llama.cpp: left out of the space
        assert heads <= {1.0}, heads
    if case_name == "gemma2":  # GGUF gemma2 has no separate LM head: the head stays tied (16 or untouched)
        assert {t.params.get("quantization.rtn.head_bits") for t in stored.trials} <= {None, 16}
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert recipe["metrics"]["runtime"]["writer"] == writer
    code = cli.main(["apply", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "deploy")])
    out, err = capsys.readouterr()
    assert code == 0, err
    llm = Llama(str(tmp_path / "deploy" / "model.gguf"), n_ctx=64, verbose=False)
    try:
        assert len(llm.tokenize(b"Shall I compare thee")) > 0
        assert llm("Shall I compare thee", max_tokens=4)["usage"]["completion_tokens"] > 0
    finally:
        llm.close()


@pytest.mark.builtin
@pytest.mark.parametrize("config_class, model_class", [("CohereConfig", "CohereForCausalLM"),
                                                       ("GPTNeoXConfig", "GPTNeoXForCausalLM")])
def test_llama_quant_names_the_tensors_the_converter_writes_where_the_gguf_arch_is_not_the_model_type(
        config_class, model_class, tmp_path):
    """Cohere's GGUF architecture is `command-r`, GPT-NeoX's `gptneox`: llama-quant's tensor names come from the
    converter's architecture, so every quantizable tensor it plans is one the converted file holds (a Cohere
    search failed every llama-quant trial with "gguf knows no architecture 'cohere'")."""
    from transformers import AutoTokenizer

    from planner import assets
    from targets.llamacpp import sensitivity, writer
    from targets.llamacpp.imatrix import gguf_arch_name
    from targets.llamacpp.quantize import quantize_gguf
    from test_convert import _model

    tokenizer = AutoTokenizer.from_pretrained(assets.ensure(assets.lookup("model", "smollm2-135m")))
    model = _model(config_class, model_class)(len(tokenizer), _special_ids(tokenizer))
    assert gguf_arch_name(model) == {"CohereConfig": "command-r", "GPTNeoXConfig": "gptneox"}[config_class]
    planned = {t.gguf_name: "Q8_0" for t in sensitivity.quantizable(model, {})}
    layers = sum(1 for name in planned if name.startswith("blk."))
    assert "token_embd.weight" in planned and layers >= 4 * model.config.num_hidden_layers
    source = tmp_path / "f32.gguf"
    writer.write(model, tokenizer, source)
    written = quantize_gguf(source, tmp_path / "q.gguf", "Q8_0", overrides=planned)  # each name is in the file
    assert all(written[name] == "Q8_0" for name in planned)


def test_llama_quant_is_left_out_up_front_where_gguf_cannot_name_the_tensors(monkeypatch):
    """An architecture whose tensors gguf-py cannot name gives llama-quant nothing to plan by: the target leaves
    the method out of the space (and the study says so in one line), never a failed trial."""
    from planner.study import methods_left_out
    from search_spaces.quantization import QuantSpace
    from targets import TARGETS
    from targets.llamacpp import imatrix
    from targets.llamacpp import target as target_module
    from tests.conftest import make_tiny_llama

    target, model = TARGETS["llama.cpp"], make_tiny_llama()
    given = {"quantization": QuantSpace(methods=("none", "rtn", "llama-quant"))}
    assert "llama-quant" in target.fit_spaces(given, model)["quantization"].methods
    monkeypatch.setattr(imatrix, "gguf_arch_name", lambda model: "an-architecture-gguf-does-not-know")
    monkeypatch.setattr(target_module, "gguf_arch_name", imatrix.gguf_arch_name)
    fitted = target.fit_spaces(given, model)
    assert fitted["quantization"].methods == ("none", "rtn")
    assert methods_left_out(target, given, fitted, model) == [
        "planner: space.quantization.methods: llama-quant left out: it plans a type per GGUF tensor, and gguf-py "
        "names no tensors of the 'an-architecture-gguf-does-not-know' architecture"]
