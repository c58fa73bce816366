"""Shared fixtures: tiny random models of two architectures and a tiny local Hugging Face folder.

Everything here is built offline in a second or two, so most tests never touch the built-in assets.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SAMPLE_TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. "
    "Sometime too hot the eye of heaven shines, and often is his gold complexion dimm'd; "
    "and every fair from fair sometime declines, by chance or nature's changing course untrimm'd. "
)


@pytest.fixture(autouse=True, scope="session")
def _quiet_and_seeded():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)


def make_tiny_llama(vocab_size: int = 128, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    defaults = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True)
    config = LlamaConfig(**{**defaults, **overrides})  # any default can be overridden
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2(vocab_size: int = 128, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, **overrides)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few lines: real merges, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved Llama-style model folder with its tokenizer, as a user's local checkpoint would be."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_corpus_dir(tmp_path_factory) -> Path:
    """A folder of plain-text works, one file each."""
    path = tmp_path_factory.mktemp("corpus")
    for i in range(5):
        (path / f"work_{i}.txt").write_text((f"Work number {i}. " + SAMPLE_TEXT) * 6, encoding="utf-8")
    return path


# The tiny studies exercise the planner on transformers' own figures (test_llamacpp_study.py runs the tiny
# model on llama.cpp, which `auto` would choose for it).
TINY_EVALUATION = """
target = "transformers"

[evaluation.perplexity]
context_length = 64
stride = 64
max_tokens = 256

[evaluation.latency]
prompt_tokens = 16
new_tokens = 4
repeats = 2
warmup = 1
"""
TINY_STUDY_SPACE = TINY_EVALUATION + """
[space.distillation]
steps = [4]
batch_size = [2]
seq_len = [32]
importance_samples = 4
importance_seq_len = 32

[space.pruning]
calibration_samples = 4
calibration_seq_len = 32
heal_steps = [2, 4]
heal_seq_len = 32

[space.quantization]
methods = ["none", "rtn", "dynamic-int8"]
"""


@pytest.fixture
def tiny_study_file(tmp_path, tiny_model_dir, text_corpus_dir, monkeypatch) -> Path:
    """A study file for study 'tiny' in tmp_path/tiny.db on the tiny model; recipe at tmp_path/recipe.yaml."""
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "study.toml"
    path.write_text(f'model = "{tiny_model_dir}"\ndata = "{text_corpus_dir}"\nstudy = "tiny"\n'
                    f'storage = "sqlite:///{tmp_path}/tiny.db"\nrecipe = "{tmp_path}/recipe.yaml"\n'
                    + TINY_STUDY_SPACE)
    return path


def interruptible():
    """For subprocess.Popen(preexec_fn=...): in the child, SIGINT as a terminal delivers it. A test run started in
    the background by a shell inherits SIGINT ignored, and so would every process it starts (Python then never
    turns Ctrl-C into KeyboardInterrupt), which tests of Ctrl-C must not depend on."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
