"""The llama.cpp target on the built-in model (SmolLM2-135M): a GPTQ candidate's GGUF holds bit for bit the
evaluated weights, llama.cpp scores it as torch does, tokenizes as transformers does, and answers a prompt."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from evaluators.memory import weight_bytes
from evaluators.perplexity import PerplexityProtocol, PerplexityScorer, check_protocol, measure_perplexity
from evaluators.scoring import score_windows
from search_spaces.base import BuildContext
from search_spaces.quantization import GPTQSettings, QuantSpec, apply, estimate_weight_bytes

import llama_cpp  # noqa: F401  (required: a broken install fails here)
from gguf import GGUFReader, quants

from targets.llamacpp.gguf_file import gguf_tensors, write_gguf
from targets.llamacpp.runtime import loaded, tokenize, window_logits

pytestmark = pytest.mark.builtin

PROTOCOL = PerplexityProtocol(context_length=256, stride=256, max_tokens=1024)


@pytest.fixture(scope="module")
def gptq_gguf(tmp_path_factory):
    from planner.sources import DataSource, ModelSource, load_corpus, load_model

    model, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m"), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    spec = QuantSpec(method="gptq", bits={"attn": 4, "mlp": 8}, group_size=32, grid="gguf",
                     gptq=GPTQSettings(samples=4, seq_len=128))
    candidate = copy.deepcopy(model)
    estimate = estimate_weight_bytes(candidate, spec)
    candidate = apply(candidate, spec, BuildContext(tokenizer, corpus.train, seed=0))
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    write_gguf(candidate, tokenizer, path)
    return candidate, tokenizer, corpus, path, estimate


def test_the_gguf_holds_exactly_the_evaluated_weights(gptq_gguf):
    candidate, _, _, path, estimate = gptq_gguf
    reader = GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    expected = gguf_tensors(candidate)  # the candidate's own tensors, q/k rows in llama.cpp's order
    assert len(stored) == len(expected) == 30 * 9 + 2
    for name, data, kind in expected:
        tensor = stored[name]
        assert tensor.tensor_type == kind, name
        assert np.array_equal(quants.dequantize(tensor.data, tensor.tensor_type), quants.dequantize(data, kind)), name
    types = {t.tensor_type.name for t in reader.tensors if ".attn_q." in t.name} | \
        {t.tensor_type.name for t in reader.tensors if ".ffn_up." in t.name}
    assert types == {"Q4_0", "Q8_0"}
    # the file's tensor bytes are the candidate's stored bytes, and the spec's estimate
    assert sum(int(t.n_bytes) for t in reader.tensors) == weight_bytes(candidate).total_bytes == estimate
    # read back and un-permuted, a projection equals the weights torch evaluated
    down = quants.dequantize(stored["blk.3.ffn_down.weight"].data, stored["blk.3.ffn_down.weight"].tensor_type)
    assert np.array_equal(down, candidate.model.layers[3].mlp.down_proj.weight.detach().numpy())


def test_llama_cpp_perplexity_matches_torch_within_one_percent(gptq_gguf):
    candidate, tokenizer, corpus, path, _ = gptq_gguf
    torch_ppl = measure_perplexity(candidate, tokenizer, corpus.eval, PROTOCOL).perplexity
    encoded = check_protocol(candidate, tokenizer, corpus.eval, PROTOCOL)
    with loaded(path, PROTOCOL.context_length, 2, logits_all=True) as llm:
        [runtime] = score_windows(window_logits(llm, PROTOCOL.context_length, PROTOCOL.stride), encoded, PROTOCOL,
                                  [PerplexityScorer()], "cpu", "gguf", 0.0)
    assert runtime.tokens_scored == sum(len(ids) - 1 for ids, _ in encoded)
    assert abs(runtime.perplexity / torch_ppl - 1) < 0.01, (runtime.perplexity, torch_ppl)


def test_llama_cpp_tokenizes_held_out_text_as_transformers_and_answers_a_prompt(gptq_gguf):
    _, tokenizer, corpus, path, _ = gptq_gguf
    with loaded(path, 256, 2) as llm:
        for document in corpus.eval:
            text = document.text[:20000]
            assert tokenize(llm, text) == tokenizer(text, add_special_tokens=False)["input_ids"], document.name
        answer = llm.create_completion("ROMEO: What light through yonder window", max_tokens=12, temperature=0.0)
    text = answer["choices"][0]["text"]
    assert answer["usage"]["completion_tokens"] >= 1 and text.strip() and sum(c.isalpha() for c in text) >= 3
