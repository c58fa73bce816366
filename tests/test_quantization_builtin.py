"""Quantization of the built-in model (SmolLM2-135M) judged on held-out Shakespeare.

Small evaluation budget (1024 held-out tokens in 256-token windows) and small GPTQ calibration, so the
file runs in a few minutes on 2 CPU cores; the figures are deterministic for that protocol.
"""
import copy

import pytest
import torch

from evaluators.memory import weight_bytes
from evaluators.perplexity import PerplexityProtocol, measure_perplexity
from search_spaces.base import BuildContext
from search_spaces.quantization import GPTQSettings, QuantSpec, apply, estimate_weight_bytes, export

pytestmark = pytest.mark.builtin

PROTOCOL = PerplexityProtocol(context_length=256, stride=256, max_tokens=1024)
LADDER_BITS = (16, 8, 4, 3, 2)


@pytest.fixture(scope="module")
def builtin():
    from planner.sources import DataSource, ModelSource, load_corpus, load_model

    model, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m"), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    return model, tokenizer, corpus


def _build_and_score(builtin, spec: QuantSpec):
    model, tokenizer, corpus = builtin
    context = BuildContext(tokenizer, corpus.train, seed=0, progress=False)
    candidate = copy.deepcopy(model)
    estimate = estimate_weight_bytes(candidate, spec)
    candidate = apply(candidate, spec, context)
    assert weight_bytes(candidate).total_bytes == estimate
    return candidate, measure_perplexity(candidate, tokenizer, corpus.eval, PROTOCOL).perplexity


@pytest.fixture(scope="module")
def rtn_ladder(builtin):
    """Held-out perplexity of RTN per output channel (one group size for every rung) at each bit-width."""
    return {bits: _build_and_score(builtin, QuantSpec(method="rtn", bits={"attn": bits, "mlp": bits},
                                                      group_size=None))[1]
            for bits in LADDER_BITS}


def test_rtn_perplexity_rises_as_bits_fall(rtn_ladder):
    p = rtn_ladder
    assert p[16] <= p[8] < p[4] < p[3] < p[2], p
    assert p[16] < 30  # 16-bit storage leaves the model as it was (about 24 on this protocol)


def test_gptq_beats_rtn_at_3_bits(builtin, rtn_ladder):
    spec = QuantSpec(method="gptq", bits={"attn": 3, "mlp": 3}, group_size=None,
                     gptq=GPTQSettings(samples=8, seq_len=256))
    _, gptq = _build_and_score(builtin, spec)
    assert gptq < rtn_ladder[3], (gptq, rtn_ladder[3])


def test_compressed_tensors_checkpoint_reloads_with_the_same_perplexity(builtin, tmp_path):
    from transformers import AutoModelForCausalLM

    _, tokenizer, corpus = builtin
    spec = QuantSpec(method="rtn", bits={"attn": 4, "mlp": 4, "head": 16}, group_size=128)  # groups of 64 and 128
    candidate, in_memory = _build_and_score(builtin, spec)
    export(candidate, spec, tmp_path, tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    saved = measure_perplexity(reloaded, tokenizer, corpus.eval, PROTOCOL).perplexity
    assert saved == pytest.approx(in_memory, rel=0.005)
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert weight_bytes(candidate).total_bytes <= on_disk < weight_bytes(candidate).total_bytes + 100_000  # + header
