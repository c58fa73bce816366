import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import SAMPLE_TEXT, make_tiny_llama, make_tiny_tokenizer
from evaluators.corpus import CorpusError, Document
from evaluators.perplexity import PerplexityProtocol, measure_perplexity, score_ids, window_spans


class UniformLogits(torch.nn.Module):
    """A 'model' whose logits are all equal: every token has probability 1/V."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=4096)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.config.vocab_size))


class ByteTokenizer:
    """One token per UTF-8 byte: bits-per-byte is then bits-per-token, easy to compute by hand."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="ignore")


def test_uniform_logits_give_perplexity_equal_to_vocabulary_size():
    tokenizer = make_tiny_tokenizer()
    vocab = len(tokenizer)
    docs = [Document("a", SAMPLE_TEXT * 3), Document("b", SAMPLE_TEXT * 2)]
    result = measure_perplexity(UniformLogits(vocab), tokenizer, docs, PerplexityProtocol(16, 8, None))
    assert result.perplexity == pytest.approx(vocab, rel=1e-5)
    assert result.nll_per_token == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.documents == 2


def test_sliding_windows_score_every_token_but_the_first_exactly_once():
    for n, ctx, stride in [(100, 16, 15), (100, 16, 5), (7, 16, 8), (33, 8, 1)]:
        scored = []
        for begin, end, first in window_spans(n, ctx, stride):
            assert end - begin <= ctx and begin < first <= end
            if begin > 0:  # a sliding window keeps ctx - stride tokens of context
                assert first - begin >= max(1, ctx - stride)
            scored += range(first, end)
        assert sorted(scored) == list(range(1, n)), (n, ctx, stride)


def test_stride_equal_to_context_is_chunked_evaluation():
    model = make_tiny_llama(vocab_size=64)
    ids = torch.randint(0, 64, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    nll, count = score_ids(model, ids, context_length=16, stride=16, device="cpu")
    # Chunked by hand: independent 16-token chunks, each predicting its own tokens 1..end.
    expected_nll, expected_count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 16):
            chunk = torch.tensor(ids[start:start + 16])
            if len(chunk) < 2:
                continue
            logits = model(input_ids=chunk[None]).logits[0]
            expected_nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
            expected_count += len(chunk) - 1
    assert count == expected_count == 70 - 5
    assert nll == pytest.approx(expected_nll, rel=1e-5)


def test_overlapping_windows_score_more_tokens_with_more_context():
    model = make_tiny_llama(vocab_size=64)
    ids = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    _, chunked = score_ids(model, ids, 16, 16, "cpu")
    _, strided = score_ids(model, ids, 16, 4, "cpu")
    assert (chunked, strided) == (60, 63)


def test_bits_per_byte_matches_hand_computation():
    # Byte tokenizer over 256 ids, uniform logits: every byte costs exactly 8 bits.
    docs = [Document("ascii", "abcdefgh" * 8), Document("utf8", "é" * 32)]
    result = measure_perplexity(UniformLogits(256), ByteTokenizer(), docs, PerplexityProtocol(16, 16, None))
    assert result.tokens_evaluated == 64 + 64 and result.bytes_evaluated == 128
    assert result.tokens_scored == 2 * (64 - 4)
    assert result.bits_per_byte == pytest.approx(8.0)
    # Two tokens per character ('é' is two bytes) changes nothing per byte, but a skewed model does:
    # with p(correct) = 1/2 on every token, bits per byte is 1.
    class Halving(UniformLogits):
        def forward(self, input_ids):
            logits = torch.full((*input_ids.shape, 256), -1e9)
            nxt = torch.roll(input_ids, -1, dims=-1)
            logits.scatter_(-1, nxt.unsqueeze(-1), 0.0)
            logits[..., 0] = 0.0  # a rival with the same logit: probability 1/2 for the right byte
            return SimpleNamespace(logits=logits)

    halved = measure_perplexity(Halving(256), ByteTokenizer(), [Document("a", "abcdefgh" * 8)], PerplexityProtocol(16, 16, None))
    assert halved.perplexity == pytest.approx(2.0, rel=1e-6)
    assert halved.bits_per_byte == pytest.approx(1.0, rel=1e-6)


def test_max_tokens_caps_and_spreads_over_documents():
    tokenizer = make_tiny_tokenizer()
    docs = [Document(str(i), SAMPLE_TEXT * 20) for i in range(4)]
    result = measure_perplexity(UniformLogits(len(tokenizer)), tokenizer, docs, PerplexityProtocol(32, 32, 256))
    assert result.documents == 4
    assert 4 * 60 <= result.tokens_evaluated <= 256


def test_too_short_and_empty_held_out_text_are_refused():
    tokenizer = make_tiny_tokenizer()
    with pytest.raises(CorpusError, match="fewer than one window"):
        measure_perplexity(UniformLogits(len(tokenizer)), tokenizer, [Document("x", "Shall I")], PerplexityProtocol(64, 32, None))
    with pytest.raises(CorpusError, match="empty"):
        measure_perplexity(UniformLogits(len(tokenizer)), tokenizer, [], PerplexityProtocol(64, 32, None))


@pytest.mark.parametrize("kwargs, message", [
    ({"context_length": 1}, "at least 2"),
    ({"context_length": 16, "stride": 17}, "stride"),
    ({"context_length": 16, "stride": 0}, "stride"),
    ({"context_length": 64, "stride": 32, "max_tokens": 10}, "at least one window"),
])
def test_bad_protocols_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerplexityProtocol(**kwargs)


def test_protocol_round_trips_through_a_dict():
    protocol = PerplexityProtocol(256, 128, None)
    assert PerplexityProtocol.from_dict(protocol.to_dict()) == protocol


def test_real_tiny_model_result_is_recorded_with_its_protocol():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tokenizer))
    result = measure_perplexity(model, tokenizer, [Document("a", SAMPLE_TEXT * 4)], PerplexityProtocol(32, 16, None))
    data = result.to_dict()
    assert data["protocol"] == {"context_length": 32, "stride": 16, "max_tokens": None}
    assert data["device"] == "cpu" and data["dtype"] == "float32"
    # A random model is near-uniform: perplexity within a factor of two of the vocabulary size.
    assert len(tokenizer) / 2 < result.perplexity < len(tokenizer) * 2
