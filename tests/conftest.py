"""Shared fixtures: tiny random models of two architectures and a tiny local Hugging Face folder, and the toy
extensions (tests/toys: a plug-in package registered through its entry points).

Everything here is built offline in a second or two, so most tests never touch the built-in assets.
`PLANNER_TOYS=1 pytest` runs the whole suite with the four toys registered, in this process and in every
process the tests start.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path
from types import SimpleNamespace

# `make test` runs the suite in one worker process per core (pytest-xdist, `-n auto`). Each computes
# single-threaded, and so does every process it starts (the variable is inherited): two workers each running
# torch's two threads on two cores made the suite no faster than one process (measured: 20.5 against 20.8 min);
# one thread each, 11.5-12.5 min.
IN_A_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if IN_A_WORKER:  # before torch is imported: it reads the variable once
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

if IN_A_WORKER:
    torch.set_num_threads(1)

WORKERS_AT_MOST = 4  # `-n auto`: one a core, at most this many (each holds the built-in model at times)


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(len(os.sched_getaffinity(0)), WORKERS_AT_MOST))


TOYS = Path(__file__).parent / "toys"  # the toys' plug-in package: planner_toys/ and its pyproject.toml
TOYS_PACKAGE = "planner_toys"


def toy_entry_points() -> dict[str, dict[str, str]]:
    """The toys' entry points as their pyproject declares them: group -> {registered name: module}."""
    return tomllib.loads((TOYS / "pyproject.toml").read_text())["project"]["entry-points"]


def install_toys(site: Path) -> list[str]:
    """What `pip install tests/toys` writes for the registries to find, without changing the shared environment:
    the package's metadata and entry points in a dist-info folder under `site`. Returns the path entries (`site`,
    and the folder holding planner_toys) that make importlib.metadata find them as an installed package's."""
    project = tomllib.loads((TOYS / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {module}\n" for name, module in points.items()) + "\n"
        for group, points in toy_entry_points().items()))
    return [str(site), str(TOYS)]


# Before any test module imports a registry: the registries then find the toys on their first read.
TOYS_REGISTERED = os.environ.get("PLANNER_TOYS") == "1"
if TOYS_REGISTERED and str(TOYS) not in sys.path:  # once, though a test imports this module as tests.conftest too
    _site = Path(tempfile.mkdtemp(prefix="planner-toys-"))
    atexit.register(shutil.rmtree, _site, ignore_errors=True)
    _paths = install_toys(_site)
    sys.path[:0] = _paths
    os.environ["PYTHONPATH"] = os.pathsep.join(_paths + [p for p in [os.environ.get("PYTHONPATH")] if p])


def pytest_report_header(config):
    return f"toys: {'registered (PLANNER_TOYS=1)' if TOYS_REGISTERED else 'not registered'}"


def _unregister(group: str, name: str) -> None:
    from planner.objectives import unregister_figure
    from search_spaces.quantization import QUANT_METHODS, STORAGE_SCHEMES
    from targets import TARGETS

    if group == "planner.figures":
        unregister_figure(name)
    else:
        {"planner.storage_schemes": STORAGE_SCHEMES, "planner.quantization_methods": QUANT_METHODS,
         "planner.targets": TARGETS}[group].pop(name)


@pytest.fixture
def toys(tmp_path_factory):
    """The four toys registered as their entry points register them: for the whole session under PLANNER_TOYS=1,
    else for this test (installed, each entry-point group loaded by the registries' own loader, and what the toys
    registered taken back afterwards). Yields their modules (objective, grid, method, target)."""
    from search_spaces.base import load_plugins

    points = toy_entry_points()
    paths = [] if TOYS_REGISTERED else install_toys(tmp_path_factory.mktemp("toys-site"))
    sys.path[:0] = paths
    try:
        for group in points:  # imported already where a registry has been read: then nothing happens
            load_plugins(group)
        yield SimpleNamespace(**{name: sys.modules[f"{TOYS_PACKAGE}.{name}"]
                                 for name in ("objective", "grid", "method", "target")})
    finally:
        if paths:
            for group, names in points.items():
                for name in names:
                    _unregister(group, name)
            for path in paths:
                sys.path.remove(path)
            for module in [m for m in sys.modules if m.split(".")[0] == TOYS_PACKAGE]:
                del sys.modules[module]  # imported anew (and registered again) by the next test that asks


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


def methods_rounding_onto(scheme: str) -> tuple[str, ...]:
    """The default space's methods that round onto the storage scheme `scheme` by their own word (`rounds_onto`),
    whatever is registered: what a target storing on it keeps."""
    from search_spaces.quantization import QUANT_METHODS, STORAGE_SCHEMES, QuantSpace

    return tuple(m for m in QuantSpace().methods if m != "none" and QUANT_METHODS[m].rounds_onto(STORAGE_SCHEMES[scheme]))


class Doc:
    """A calibration document as the corpus loader hands it: just its text."""

    def __init__(self, text):
        self.text = text


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


def write_tiny_study_file(folder: Path, model_dir: Path, corpus_dir: Path) -> Path:
    """A study file for study 'tiny' in folder/tiny.db on the tiny model; recipe at folder/recipe.yaml."""
    path = folder / "study.toml"
    path.write_text(f'model = "{model_dir}"\ndata = "{corpus_dir}"\nstudy = "tiny"\n'
                    f'storage = "sqlite:///{folder}/tiny.db"\nrecipe = "{folder}/recipe.yaml"\n'
                    + TINY_STUDY_SPACE)
    return path


@pytest.fixture
def tiny_study_file(tmp_path, tiny_model_dir, text_corpus_dir, monkeypatch) -> Path:
    """A study file for study 'tiny' in tmp_path/tiny.db on the tiny model; recipe at tmp_path/recipe.yaml."""
    monkeypatch.setenv("PLANNER_CACHE", str(tmp_path / "cache"))
    return write_tiny_study_file(tmp_path, tiny_model_dir, text_corpus_dir)


def interruptible():
    """For subprocess.Popen(preexec_fn=...): in the child, SIGINT as a terminal delivers it. A test run started in
    the background by a shell inherits SIGINT ignored, and so would every process it starts (Python then never
    turns Ctrl-C into KeyboardInterrupt), which tests of Ctrl-C must not depend on."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
