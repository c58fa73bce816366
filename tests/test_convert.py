"""llama.cpp's own converter (targets/llamacpp/convert.py) on tiny random models of real configurations.

Each model is made here (no download): real config classes at tiny sizes, every weight drawn at a scale
that makes logits of order one (norm weights and biases perturbed too, so a converter or graph that drops a
norm offset, a bias or a rotary detail shows up). Each is converted, loaded in llama.cpp, and its logits over
a held-out passage must match transformers' (float32) within LOGIT_TOLERANCE, and llama.cpp must tokenize
held-out text exactly as transformers' tokenizer does.

Tokenizers (offline): the built-in model's real SmolLM2 tokenizer (byte-level BPE; the converter recognises
its pre-tokenizer) for the BPE architectures, and SentencePiece BPE models with byte fallback trained here
on the built-in corpus: Llama-2 style (dummy prefix, <s> </s> <unk>) for Llama 2, Mistral v0.1-0.3, Phi-3
and Qwen2, Gemma style (no dummy prefix, <pad> <eos> <bos> <unk>) for Gemma 2 and 3. (Qwen2 cannot take
SmolLM2's: the converter reads the tokenizer back with AutoTokenizer, which transformers 5 makes a
Qwen2Tokenizer for any qwen2 folder, with Qwen2's own pre-tokenizer around SmolLM2's vocabulary: a hash the
converter does not know.)

Candidates stored on GGUF grids (rtn here) are written bit for bit: their GGUF decodes, tensor by tensor, to
the GGUF the converter writes for the same weights as plain floats, its blocks are the stored ones (rows
moved where the converter moves rows: llama's q/k, GPT-NeoX's fused qkv), and it runs in llama.cpp as in torch.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

import llama_cpp  # noqa: E402,F401  (required: a missing runtime fails the suite)

from targets.llamacpp import convert as conv  # noqa: E402
from targets.llamacpp.runtime import loaded, tokenize  # noqa: E402

pytestmark = pytest.mark.builtin  # the SmolLM2 tokenizer and the held-out corpus are built-in assets

# llama.cpp computes in float32 with its own kernels (another summation order). With a float32 KV cache
# the largest difference over a 64-token window on logits of order one stays near 1e-5 (measured: 6e-6 on
# llama3-rope); with llama.cpp's default F16 KV cache (what the target runs) it is 2e-3 to 5e-3 on every
# architecture here, so the comparison runs with an F32 cache and a tolerance an error in the graph or the
# conversion would exceed by orders of magnitude. GELU models (Gemma, GPT-NeoX) differ by about 1e-3 from the
# first position on (no attention yet): ggml's GELU is the tanh approximation read from an F16 table, where
# transformers computes it in float32 (GPT-NeoX: the exact erf form); they get GELU_TOLERANCE.
LOGIT_TOLERANCE = 1e-4
GELU_TOLERANCE = 5e-3
# llama.cpp rounds the activations to 8 bits (Q8_0 / Q8_1) for its quantized dot products: a candidate on GGUF
# grids differs by about 0.1 (measured 0.07 to 0.14) on logits of order one; a block in the wrong place would
# differ by their whole scale.
QUANTIZED_TOLERANCE = 0.3
WINDOW = 64
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512)
EXTRA_TEXT = " Numbers 1234567 and 3.14,  double  spaces,\ttabs,\n\nnewlines; é ünïcode ÆØÅ ß 漢字 😀 — dashes."


@dataclass(frozen=True)
class Case:
    name: str
    tokenizer: str  # "bpe" (SmolLM2), "llama-sp", "gemma-sp"
    make: Callable  # (vocab_size, special ids) -> model
    tolerance: float = LOGIT_TOLERANCE


def _randomized(model):
    """Weights at a scale that gives logits of order one; 1-d parameters (norms, biases) perturbed."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() == 1:
                parameter.add_(noise * 0.1)
            else:
                parameter.copy_(noise / math.sqrt(parameter.shape[-1]))
    return model.eval()


def _model(config_class, model_class, **settings):
    def make(vocab_size, special):
        import transformers

        config = getattr(transformers, config_class)(**{**TINY, "vocab_size": vocab_size, **special, **settings})
        torch.manual_seed(0)
        return _randomized(getattr(transformers, model_class)(config))

    return make


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, "rope_theta": 500000.0}
CASES = [
    Case("llama3-rope", "bpe", _model("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2,
                                      rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    Case("llama2-sentencepiece", "llama-sp", _model("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=False)),
    Case("mistral", "llama-sp", _model("MistralConfig", "MistralForCausalLM", num_key_value_heads=2,
                                       sliding_window=None)),
    Case("qwen2", "llama-sp", _model("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2,
                                     tie_word_embeddings=True)),
    Case("qwen3", "bpe", _model("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=32,
                                tie_word_embeddings=True)),
    # sliding windows shorter than the compared window, so local attention is checked too
    Case("gemma2", "gemma-sp", _model("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=16,
                                      query_pre_attn_scalar=16, sliding_window=16), GELU_TOLERANCE),
    Case("gemma3", "gemma-sp", _model("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=16,
                                      query_pre_attn_scalar=16, sliding_window=16), GELU_TOLERANCE),
    Case("phi3", "llama-sp", _model("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2)),
    Case("olmo2", "bpe", _model("Olmo2Config", "Olmo2ForCausalLM", num_key_value_heads=2)),
    Case("stablelm", "bpe", _model("StableLmConfig", "StableLmForCausalLM", num_key_value_heads=2,
                                   partial_rotary_factor=0.25, use_qkv_bias=True)),
    Case("gpt-neox", "bpe", _model("GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.25), GELU_TOLERANCE),
]


def _sentencepiece(folder, lines: list[str], gemma: bool) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
               unk_piece="<unk>") if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=1000, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=not gemma, minloglevel=2, **ids)
    folder.mkdir(parents=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())


@pytest.fixture(scope="session")
def corpus():
    from planner.sources import DataSource, load_corpus

    return load_corpus(DataSource.parse("builtin:shakespeare"))


@pytest.fixture(scope="session")
def held_out(corpus) -> str:
    return "".join(document.text[1000:3000] for document in corpus.eval) + EXTRA_TEXT


@pytest.fixture(scope="session")
def tokenizers(corpus, tmp_path_factory) -> dict:
    from planner import assets
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

    lines = [line for document in corpus.train[:4] for line in document.text.splitlines() if line.strip()]
    folder = tmp_path_factory.mktemp("sentencepiece")
    _sentencepiece(folder / "llama", lines, gemma=False)
    _sentencepiece(folder / "gemma", lines, gemma=True)
    return {"bpe": AutoTokenizer.from_pretrained(assets.ensure(assets.lookup("model", "smollm2-135m"))),
            "llama-sp": LlamaTokenizer.from_pretrained(folder / "llama"),
            "gemma-sp": GemmaTokenizer.from_pretrained(folder / "gemma")}


def _special_ids(tokenizer) -> dict:
    return {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id") for kind in ("bos", "eos", "pad")}


@pytest.fixture(scope="session")
def converted(tokenizers, tmp_path_factory) -> dict:
    """case name -> (model, tokenizer, ConversionInfo): every case converted in one converter process."""
    made = {}
    for case in CASES:
        tokenizer = tokenizers[case.tokenizer]
        made[case.name] = (case.make(len(tokenizer), _special_ids(tokenizer)), tokenizer,
                           tmp_path_factory.mktemp(case.name) / "model.gguf")
    infos = conv.convert_many(list(made.values()))
    return {name: (model, tokenizer, info) for (name, (model, tokenizer, _)), info in zip(made.items(), infos)}


def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position, with a float32 KV cache (runtime.loaded keeps the default F16)."""
    import contextlib
    import os

    from llama_cpp import GGML_TYPE_F32, Llama

    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        llm = Llama(str(path), n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), n_threads=2, logits_all=True,
                    type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_llama_cpp_logits_match_transformers(case, converted, held_out):
    model, tokenizer, info = converted[case.name]
    assert info.hf_architecture == type(model).__name__ and info.outtype == "f32"
    ids = tokenizer(held_out, add_special_tokens=False)["input_ids"][:WINDOW]
    expected, actual = _torch_logits(model, ids), _llama_cpp_logits(info.path, ids)
    assert expected.std() > 0.5  # logits of order one: the tolerance means something
    assert np.abs(actual - expected).max() < case.tolerance, (info.architecture, np.abs(actual - expected).max())


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_what_the_file_stores_beyond_the_held_tensors_is_known_up_front(case, converted):
    """A candidate's size estimate on the llama.cpp target (held tensors + `bytes_beyond_held`) is the converted
    file's tensor bytes: e.g. llama3 rotary scaling's rope_freqs, which no tensor of the model holds."""
    from gguf import GGUFReader

    from evaluators.memory import weight_bytes
    from targets.llamacpp.writer import bytes_beyond_held

    model, _, info = converted[case.name]
    stored = sum(int(t.n_bytes) for t in GGUFReader(str(info.path)).tensors)
    assert weight_bytes(model).total_bytes + bytes_beyond_held(model) == stored


def test_check_vocab_says_up_front_whether_llama_cpp_tokenizes_as_the_model(tokenizers, held_out):
    from transformers import LlamaConfig, Qwen2Config

    config = LlamaConfig(**TINY, vocab_size=len(tokenizers["bpe"]))
    assert conv.check_vocab(config, tokenizers["bpe"], "LlamaForCausalLM", held_out) is None
    # SmolLM2's tokenizer in a Qwen2 folder is read back as a Qwen2Tokenizer (see above): refused in one line
    reason = conv.check_vocab(Qwen2Config(**TINY, vocab_size=len(tokenizers["bpe"])), tokenizers["bpe"],
                              "Qwen2ForCausalLM", held_out)
    assert reason is not None and "pre-tokenizer was not recognized" in reason, reason


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_llama_cpp_tokenizes_held_out_text_as_transformers(case, converted, held_out):
    _, tokenizer, info = converted[case.name]
    with loaded(info.path, WINDOW, 2) as llm:
        assert tokenize(llm, held_out) == tokenizer(held_out, add_special_tokens=False)["input_ids"]


# --- candidates stored on GGUF grids: their exact blocks, in the converter's layout ---------------------------

QUANTIZED = {  # case -> the spec its candidate is built with (q/k permuted, qkv regrouped, fused projections)
    "llama2-sentencepiece": dict(bits={"attn": 4, "mlp": 5, "head": 8}, symmetric=False),  # Q4_1, Q5_1, Q8_0, F16
    "gpt-neox": dict(bits={"attn": 4, "mlp": 8}, symmetric=True),  # Q4_0, Q8_0
    "phi3": dict(bits={"attn": 5, "mlp": 4}, symmetric=True),  # Q5_0, Q4_0
}


@pytest.fixture(scope="session")
def quantized(converted, tmp_path_factory) -> dict:
    """case name -> (candidate, its GGUF's info, the GGUF of the same weights as plain floats)."""
    import copy

    from search_spaces.base import BuildContext
    from search_spaces.quantization import QuantSpec, apply

    items, candidates = [], {}
    for name, settings in QUANTIZED.items():
        model, tokenizer, _ = converted[name]
        spec = QuantSpec(method="rtn", group_size=32, grid="gguf", **settings)
        candidate = apply(copy.deepcopy(model), spec, BuildContext(tokenizer=None, calibration=(), seed=0,
                                                                   progress=False))
        plain = type(candidate)(candidate.config)  # the same weights (as evaluated), nothing stored
        plain.load_state_dict(candidate.state_dict())
        folder = tmp_path_factory.mktemp(f"{name}-quantized")
        items += [(candidate, tokenizer, folder / "q.gguf"), (plain.eval(), tokenizer, folder / "plain.gguf")]
        candidates[name] = candidate
    infos = conv.convert_many(items)
    return {name: (candidate, infos[2 * index], infos[2 * index + 1])
            for index, (name, candidate) in enumerate(candidates.items())}


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_stored_layers_are_written_bit_exact_in_the_converters_layout(name, quantized):
    from gguf import GGUFReader, quants

    candidate, info, plain = quantized[name]
    stored = conv.stored_tensors(candidate)
    assert {entry["from"] for entry in info.stored.values()} == set(stored)  # every stored layer, as stored
    file = {tensor.name: tensor for tensor in GGUFReader(str(info.path)).tensors}
    floats = {tensor.name: tensor for tensor in GGUFReader(str(plain.path)).tensors}
    assert set(file) == set(floats)
    for gguf_name, tensor in file.items():
        reference = floats[gguf_name]
        if gguf_name not in info.stored:  # everything else: what the converter wrote for the float model
            assert tensor.tensor_type == reference.tensor_type and np.array_equal(tensor.data, reference.data)
            continue
        data, kind = stored[info.stored[gguf_name]["from"]]
        assert tensor.tensor_type.name == kind == info.stored[gguf_name]["type"], gguf_name
        # it decodes to exactly the weights the candidate evaluated, in the row order the converter wrote them
        assert np.array_equal(quants.dequantize(tensor.data, tensor.tensor_type),
                              quants.dequantize(reference.data, reference.tensor_type)), gguf_name
        # its bytes are the stored blocks, whole rows moved (sorted rows: the same multiset of rows)
        rows = np.asarray(tensor.data).reshape(data.shape[0], -1).view(np.uint8)
        if info.stored[gguf_name]["permuted"]:
            assert sorted(map(bytes, rows)) == sorted(map(bytes, data.view(np.uint8)))
        else:
            assert np.array_equal(rows, data.view(np.uint8).reshape(rows.shape)), gguf_name
    assert any(entry["permuted"] for entry in info.stored.values()) == (name != "phi3")


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_a_quantized_candidate_runs_in_llama_cpp_as_in_torch(name, quantized, held_out, tokenizers):
    candidate, info, _ = quantized[name]
    tokenizer = tokenizers[next(case for case in CASES if case.name == name).tokenizer]
    ids = tokenizer(held_out, add_special_tokens=False)["input_ids"][:WINDOW]
    expected, actual = _torch_logits(candidate, ids), _llama_cpp_logits(info.path, ids)
    assert np.abs(actual - expected).max() < QUANTIZED_TOLERANCE, np.abs(actual - expected).max()
    assert (actual.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.9


# --- what the converter refuses, in one line ------------------------------------------------------------------

def test_a_tokenizer_the_converter_does_not_know_fails_in_one_line(tmp_path):
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()  # a toy byte-level BPE: its pre-tokenizer hash is nobody's
    model = make_tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(conv.ConversionFailed, match="pre-tokenizer was not recognized") as failed:
        conv.convert(model, tokenizer, tmp_path / "model.gguf")
    assert "\n" not in str(failed.value)
    assert not (tmp_path / "model.gguf").exists() and list(tmp_path.iterdir()) == []


def test_what_the_converter_and_runtime_serve_comes_from_them():
    from transformers import GPT2Config, LlamaConfig

    assert conv.converter_supports(LlamaConfig(architectures=["LlamaForCausalLM"])) is None
    assert conv.converter_supports(GPT2Config(), "GPT2LMHeadModel") is None  # the converter serves GPT-2 too
    assert "does not convert FooForCausalLM" in conv.converter_supports(LlamaConfig(architectures=["FooForCausalLM"]))
    assert conv.converter_supports(LlamaConfig()) == "the model's config names no architecture"
    known = conv.architectures()
    assert known["Qwen3ForCausalLM"] == "qwen3" and known["GPTNeoXForCausalLM"] == "gptneox"
    assert {"llama", "qwen3", "gemma2", "phi3", "olmo2", "stablelm", "gptneox"} <= conv.runtime_architectures()
    version = conv.converter_version()
    assert re.fullmatch(r"[0-9a-f]{40}", version["llama_cpp"])
    assert version["llama_cpp_python"] == conv.installed_runtime()


def test_sliding_window_layers_out_of_the_runtimes_pattern_are_refused(tokenizers, tmp_path):
    from targets.llamacpp.errors import UnsupportedForGGUF

    # a depth cut of Gemma 2 (sliding, full, sliding, full...) that kept layers 0, 1 and 3: llama.cpp's gemma2
    # graph alternates by position and would make the third layer local (measured: logits off by 1.3)
    make = _model("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                  sliding_window=16, num_hidden_layers=3,
                  layer_types=["sliding_attention", "full_attention", "full_attention"])
    model = make(len(tokenizers["gemma-sp"]), _special_ids(tokenizers["gemma-sp"]))
    assert "fixed pattern" in conv.layer_types_reason(model.config)
    with pytest.raises(UnsupportedForGGUF, match="fixed pattern"):
        conv.convert(model, tokenizers["gemma-sp"], tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == []
    model.config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]  # its own pattern
    assert conv.layer_types_reason(model.config) is None


@pytest.mark.parametrize("compare_bytes", [conv.COMPARE_BYTES, 4 * 8 * 3])  # whole, or three rows at a time
def test_a_stored_tensor_is_compared_in_row_chunks_with_the_same_answers(compare_bytes, monkeypatch, tmp_path):
    """The converter child compares each stored tensor with the converter's floats a chunk of rows at a time (whole
    float32 copies of a 3.2 B model's embedding were its peak): unchanged, permuted and changed rows are told
    apart as before, and the stored tensors are handed to the writer as views of their file, not copies."""
    import torch
    from gguf import GGMLQuantizationType as T
    from safetensors.torch import save_file

    monkeypatch.setattr(conv, "COMPARE_BYTES", compare_bytes)
    weights = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float16)
    assert conv._row_order(weights, T.F16, weights.copy(), T.F16) is None
    order = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 8])
    assert np.array_equal(conv._row_order(weights[order], T.F16, weights, T.F16), order)  # the last chunk differs
    changed = weights.copy()
    changed[8, 0] += 1
    with pytest.raises(ValueError, match="changed its values"):
        conv._row_order(changed, T.F16, weights, T.F16)
    with pytest.raises(ValueError, match=r"wrote it as \(8, 9\), it is stored as \(8, 10\)"):
        conv._row_order(weights[:9], T.F16, weights, T.F16)

    path = tmp_path / "stored.safetensors"
    blocks = np.arange(60, dtype=np.uint8).reshape(3, 20)
    save_file({"a": torch.from_numpy(blocks), "b": torch.from_numpy(weights)}, str(path))
    entries, data_start = conv._safetensors_header(str(path))
    for name, expected in (("a", blocks), ("b", weights)):
        mapped = conv._mapped(str(path), entries, data_start, name)
        assert isinstance(mapped.base, np.memmap) or isinstance(mapped, np.memmap)
        assert mapped.dtype == expected.dtype and np.array_equal(mapped, expected)


# --- the planner's own writer where it serves: a Llama 3 model, as the converter writes it ---------------------

def _fields(path) -> dict:
    from gguf import GGUFReader

    return {name: field.contents() for name, field in GGUFReader(str(path)).fields.items()}


def test_the_planners_writer_writes_a_llama3_model_as_the_converter_does(converted, held_out, tmp_path):
    """Llama 3 rotary scaling is written by the planner's writer (no converter process: seconds a candidate at 1 B
    instead of half a minute): the file holds the converter's tensors byte for byte, rope_freqs among them, the
    same model and vocabulary settings, and runs in llama.cpp as in transformers."""
    from gguf import GGUFReader

    from targets.llamacpp.writer import HAND_WRITTEN, write

    model, tokenizer, info = converted["llama3-rope"]
    path = tmp_path / "hand.gguf"
    assert write(model, tokenizer, path)["writer"] == HAND_WRITTEN
    ours = {t.name: t for t in GGUFReader(str(path)).tensors}
    theirs = {t.name: t for t in GGUFReader(str(info.path)).tensors}
    assert set(ours) == set(theirs) and "rope_freqs.weight" in ours
    for name, tensor in theirs.items():
        assert ours[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(ours[name].data, tensor.data), name
    factors = np.asarray(theirs["rope_freqs.weight"].data)
    assert factors[0] == 1 and factors[-1] == LLAMA3_ROPE["factor"] and len(set(factors.tolist())) > 2
    ours_fields, theirs_fields = _fields(path), _fields(info.path)
    # the pre-tokenizer's name aside: the converter names SmolLM2's by its tokens' hash ("smollm"), the writer
    # by its tokenizer.json (plain byte-level, "gpt-2"); on this vocabulary both split text alike (below)
    compared = [k for k in theirs_fields if k.startswith(("llama.", "tokenizer.ggml.")) and k != "tokenizer.ggml.pre"]
    assert "llama.rope.freq_base" in compared and "tokenizer.ggml.merges" in compared
    assert {k: ours_fields.get(k) for k in compared} == {k: theirs_fields[k] for k in compared}
    ids = tokenizer(held_out, add_special_tokens=False)["input_ids"]
    with loaded(path, WINDOW, 2) as llm:
        assert tokenize(llm, held_out) == ids
    expected, actual = _torch_logits(model, ids[:WINDOW]), _llama_cpp_logits(path, ids[:WINDOW])
    assert np.abs(actual - expected).max() < LOGIT_TOLERANCE, np.abs(actual - expected).max()


def test_a_recipe_measured_on_the_converters_file_ships_the_converters_file(converted, tmp_path):
    """A study made before the planner wrote Llama 3 models recorded the converter (`metrics.runtime.writer`):
    `apply` ships that writer's file, whose metadata bytes (and so the recipe's recorded size) are its own."""
    from targets.llamacpp.target import LLAMA_CPP
    from targets.llamacpp.writer import CONVERTER, HAND_WRITTEN

    model, tokenizer, _ = converted["llama3-rope"]
    pre = {}
    for recorded in (CONVERTER, HAND_WRITTEN, None):
        (out := tmp_path / str(recorded)).mkdir()
        artifact = LLAMA_CPP.ship(model, tokenizer, [], out, runtime={"writer": recorded})
        pre[recorded] = _fields(artifact)["tokenizer.ggml.pre"]
    # the converter names SmolLM2's pre-tokenizer by its tokens' hash, the planner's writer by tokenizer.json
    assert pre == {CONVERTER: "smollm", HAND_WRITTEN: "gpt-2", None: "gpt-2"}
