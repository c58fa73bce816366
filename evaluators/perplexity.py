"""Held-out perplexity with a strided sliding window, plus bits-per-byte.

Protocol: each held-out document is scored on its own (windows never span two works). A window of
`context_length` tokens slides by `stride`; only the tokens not scored by an earlier window count,
so every scored token sees at least `context_length - stride` tokens of context (except near the start
of a document). The first token of a document has no context and is never scored.
With stride == context_length this is plain chunked evaluation.

Bits-per-byte = (bits per scored token) x (tokens per UTF-8 byte of the evaluated text), which
makes figures comparable across tokenizers.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from evaluators.corpus import CorpusError, Document
from evaluators.runtime import inference_eval, max_positions, model_device, model_dtype
from evaluators.scoring import WindowScorer


@dataclass(frozen=True)
class PerplexityProtocol:
    context_length: int = 512
    stride: int = 256
    # Spread evenly over the held-out works; None scores every held-out token.
    max_tokens: int | None = 8192

    def __post_init__(self):
        for name in ("context_length", "stride") + (("max_tokens",) if self.max_tokens is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number of tokens, got {value!r}")
        if self.context_length < 2:
            raise ValueError(f"context length must be at least 2 tokens, got {self.context_length}")
        if not 1 <= self.stride <= self.context_length:
            raise ValueError(
                f"stride must be between 1 and the context length ({self.context_length}), got {self.stride}"
            )
        if self.max_tokens is not None and self.max_tokens < self.context_length:
            raise ValueError(
                f"max eval tokens ({self.max_tokens}) must be at least one window ({self.context_length} tokens)"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PerplexityProtocol":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class PerplexityResult:
    protocol: PerplexityProtocol
    perplexity: float
    bits_per_byte: float
    nll_per_token: float  # nats
    tokens_scored: int
    tokens_evaluated: int
    bytes_evaluated: int
    documents: int
    device: str
    dtype: str
    seconds: float

    def to_dict(self) -> dict:
        data = asdict(self)
        data["protocol"] = self.protocol.to_dict()
        return data

    def figures(self) -> dict:
        return {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def tokenize_documents(tokenizer, documents: Sequence[Document], max_tokens: int | None) -> list[tuple[list[int], int]]:
    """Token ids and UTF-8 byte count of the evaluated text of each document.

    With a token cap, each document contributes an equal share, taken from its start. The kept text
    is decoded back and re-tokenized, so the ids and the byte count describe exactly the same text.
    """
    share = None if max_tokens is None else max(1, max_tokens // len(documents))
    out = []
    for doc in documents:
        text = doc.text if share is None else doc.text[: share * 16]  # >= share tokens for any tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if share is not None and len(ids) > share:
            text = tokenizer.decode(ids[:share])
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:share]
        if len(ids) >= 2:
            out.append((ids, len(text.encode("utf-8"))))
    return out


def window_spans(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window over a sequence of num_tokens tokens."""
    spans = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == num_tokens:
            break
    return spans


@torch.inference_mode()
def scored_windows(model, ids: list[int], context_length: int, stride: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each window over one document: the float32 logits of its scored positions, shape
    (scored, vocab), and the token ids they predict, shape (scored,). Every evaluator that scores the
    held-out text (perplexity, KL divergence) reads the model through this one iterator."""
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    for begin, end, first in window_spans(len(ids), context_length, stride):
        logits = model(input_ids=tokens[begin:end].unsqueeze(0)).logits[0]
        yield logits[first - 1 - begin : end - 1 - begin].float(), tokens[first:end]


def window_nll(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood (nats) of one window's targets under its float32 logits."""
    return F.cross_entropy(predictions, targets, reduction="sum").item()


@torch.inference_mode()
def score_ids(model, ids: list[int], context_length: int, stride: int, device) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of scored tokens for one document."""
    nll, count = 0.0, 0
    for predictions, targets in scored_windows(model, ids, context_length, stride, device):
        nll += window_nll(predictions, targets)
        count += targets.numel()
    return nll, count


def check_protocol(model, tokenizer, documents: Sequence[Document], protocol: PerplexityProtocol):
    """The tokenized held-out documents, or the reason the protocol cannot run on them (CorpusError or
    ValueError). Cheap: a search calls it before it measures or stores anything."""
    if not documents:
        raise CorpusError("the held-out split is empty: nothing to evaluate")
    limit = max_positions(model)
    if limit and protocol.context_length > limit:
        raise ValueError(f"context length {protocol.context_length} exceeds the model's {limit} positions")
    encoded = tokenize_documents(tokenizer, documents, protocol.max_tokens)
    total_tokens = sum(len(ids) for ids, _ in encoded)
    if total_tokens < protocol.context_length:
        raise CorpusError(
            f"the held-out split has {total_tokens} tokens, fewer than one window of {protocol.context_length}; "
            "use a larger corpus or a shorter context length"
        )
    return encoded


def measure_perplexity(model, tokenizer, documents: Sequence[Document], protocol: PerplexityProtocol = PerplexityProtocol()) -> PerplexityResult:
    start = time.perf_counter()
    encoded = check_protocol(model, tokenizer, documents, protocol)
    device = model_device(model)
    nll, scored = 0.0, 0
    with inference_eval(model):
        for ids, _ in encoded:
            doc_nll, doc_count = score_ids(model, ids, protocol.context_length, protocol.stride, device)
            nll += doc_nll
            scored += doc_count
    return perplexity_result(protocol, encoded, nll, scored, str(device), str(model_dtype(model)).replace("torch.", ""),
                             start)


class PerplexityScorer(WindowScorer):
    """Summed NLL per document, then over documents: the same order of sums as `score_ids`, so a torch model
    scores the same through any runtime's windows as through `measure_perplexity`."""

    name = "perplexity"

    def __init__(self, setup=None):
        self.nll, self.scored = 0.0, 0
        self.doc_nll, self.doc_count = 0.0, 0

    def begin_document(self) -> None:
        self.doc_nll, self.doc_count = 0.0, 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.doc_nll += window_nll(logits, targets)
        self.doc_count += targets.numel()

    def end_document(self) -> None:
        self.nll += self.doc_nll
        self.scored += self.doc_count

    def result(self, protocol, encoded, device: str, dtype: str, start: float) -> PerplexityResult:
        return perplexity_result(protocol, encoded, self.nll, self.scored, device, dtype, start)


def perplexity_result(protocol: PerplexityProtocol, encoded: list[tuple[list[int], int]], nll: float,
                      scored: int, device: str, dtype: str, start: float) -> PerplexityResult:
    """The PerplexityResult of a finished pass: summed NLL (nats) over `scored` tokens of `encoded`
    (check_protocol's output), timed from the perf_counter value `start`."""
    total_tokens, total_bytes = sum(len(ids) for ids, _ in encoded), sum(n for _, n in encoded)
    nll_per_token = nll / scored
    bits_per_byte = nll_per_token / math.log(2) * total_tokens / total_bytes
    return PerplexityResult(
        protocol=protocol,
        perplexity=math.exp(nll_per_token),
        bits_per_byte=bits_per_byte,
        nll_per_token=nll_per_token,
        tokens_scored=scored,
        tokens_evaluated=total_tokens,
        bytes_evaluated=total_bytes,
        documents=len(encoded),
        device=device,
        dtype=dtype,
        seconds=time.perf_counter() - start,
    )
