"""KL divergence of a candidate's next-token distributions from the base model's, plus top-1 agreement.

The fidelity metric of llama.cpp's `--kl-divergence`: over the same held-out positions that perplexity
scores (the same documents, windows and scored positions, see evaluators/perplexity.py), the mean of
KL(base || candidate) of the next-token distributions, its 99th percentile over positions, and the
fraction of positions where the candidate's most likely token is the base's.

The base's distributions are computed once (per study) as a `ReferenceDistributions` and stored
compactly: per scored position the base's top-k token ids (int32) and their log-probs (float32), plus the
log of the remaining mass (the tail bin). The KL measured against it is the KL between the coarse-grained
distributions over k + 1 bins (the base's top-k tokens one by one, everything else in one bin; the
candidate's probabilities summed over the same bins). Coarse-graining is a deterministic map applied to
both distributions, so by the data-processing inequality this is a lower bound of the exact KL; it is
exact when k is the vocabulary size.

Choice of k = 512, measured by `nice -n 10 .venv/bin/python bench/kl_bound.py` (10 min on 2 busy cores;
raw output in bench/results/kl_bound.txt) on the built-in SmolLM2-135M (vocabulary 49152) over held-out
Shakespeare at the search protocol (context 512, stride 512, max_tokens 2048: 2038 scored positions).
Candidates are the planner's RTN (every linear layer of the decoder blocks rounded to nearest,
symmetrically, per group of 64 along the input dimension); "exact" is the full-vocabulary KL in float64
over the same positions:

    k      8-bit RTN: KL, rel. error    4-bit RTN: KL, rel. error    3-bit RTN: KL, rel. error    reference bytes
           (exact 0.002257 nats)        (exact 0.6676 nats)          (exact 2.4209 nats)
    32     0.001780  -21.1 %            0.5485  -17.8 %              1.9788  -18.3 %              538,032
    64     0.001916  -15.1 %            0.5828  -12.7 %              2.0985  -13.3 %              1,059,760
    128    0.002021  -10.4 %            0.6090   -8.8 %              2.1960   -9.3 %              2,103,216
    256    0.002101   -6.9 %            0.6291   -5.8 %              2.2721   -6.1 %              4,190,128
    512    0.002160   -4.3 %            0.6437   -3.6 %              2.3283   -3.8 %              8,363,952
    1024   0.002201   -2.5 %            0.6539   -2.1 %              2.3678   -2.2 %              16,711,600

This model's next-token distributions are broad (on average 8.3 % of the base's mass lies outside its
top 128 tokens, 3.4 % outside its top 512), so the KL hidden inside the tail bin is not negligible at
small k; the error roughly halves for every 4x in k. It is always an underestimate and nearly the same
fraction for a mild and a strong perturbation, so it hardly affects how candidates rank, but at k = 512
it stays under 5 % for a reference of about 8 MB per 2048 scored positions (n x (8k + 8) bytes), and
the extra work per window (a gather of k columns next to the log-softmax of the full vocabulary) is
negligible beside the forward pass. Pass top_k to trade size for accuracy.
The mean over positions is accumulated in float64; log-softmax is computed in float32.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from evaluators.corpus import Document
from evaluators.perplexity import (
    PerplexityProtocol,
    PerplexityResult,
    PerplexityScorer,
    check_protocol,
    scored_windows,
    window_spans,
)
from evaluators.runtime import inference_eval, model_device, model_dtype
from evaluators.scoring import ScoringSetup, WindowScorer, score_windows

DEFAULT_TOP_K = 512
FORMAT = "planner-kl-reference/1"


@dataclass(frozen=True)
class KLResult:
    protocol: PerplexityProtocol
    kl_mean: float  # nats per scored position
    kl_p99: float  # nats; 99th percentile over scored positions
    top1_agreement: float  # 0..1
    tokens_scored: int
    top_k: int  # bins of the reference: the base's top-k tokens plus one tail bin
    device: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)  # the protocol nests as a plain dict

    def figures(self) -> dict:
        return {"kl": self.kl_mean, "top1_agreement": self.top1_agreement}


def _scored_targets(encoded: list[tuple[list[int], int]], protocol: PerplexityProtocol) -> torch.Tensor:
    """The token id predicted at each scored position, in scoring order, without running a model."""
    out = []
    for ids, _ in encoded:
        for _, end, first in window_spans(len(ids), protocol.context_length, protocol.stride):
            out.extend(ids[first:end])
    return torch.tensor(out, dtype=torch.int32)


def _top_k_and_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits (n, V) -> top-k ids (n, k), their log-probs (n, k), log of the rest of the mass (n)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_logp, top_ids = torch.topk(logp, k, dim=-1, sorted=True)
    return top_ids, top_logp, _log_complement(logp, top_ids)


def _log_complement(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `ids` per row: a logsumexp over the complement, which stays
    accurate where 1 - sum(p_top) would cancel. -inf when `ids` covers the whole vocabulary."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)


def coarse_kl(p_top: torch.Tensor, p_tail: torch.Tensor, q_logprobs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over k + 1 bins: the base's top-k tokens `top_ids` (n, k) with base
    log-probs `p_top` (n, k), and the tail bin with base log-mass `p_tail` (n); `q_logprobs` (n, V) are
    the candidate's full log-probs, summed over the same bins. Clamped at 0 (float rounding can push a
    KL of identical distributions a hair below)."""
    q_top = q_logprobs.gather(-1, top_ids)
    q_tail = _log_complement(q_logprobs, top_ids)
    p_bins = torch.cat([p_top, p_tail.unsqueeze(-1)], dim=-1)
    q_bins = torch.cat([q_top, q_tail.unsqueeze(-1)], dim=-1)
    p = p_bins.exp()
    # A bin with p = 0 (the empty tail when k is the vocabulary) contributes 0 whatever q is.
    terms = torch.where(p > 0, p * (p_bins - q_bins), torch.zeros_like(p))
    return terms.sum(dim=-1).clamp_min(0.0)


class ReferenceDistributions:
    """The base model's next-token distributions at every scored position of a protocol, compactly.

    top_ids (n, k) int32, top_logprobs (n, k) float32 (sorted, most likely first), tail_logprob (n)
    float32 = log(1 - sum exp(top_logprobs)), targets (n) int32 = the token actually next at each
    position (it pins the token layout: corpus, tokenizer, windows), all on the CPU.
    """

    def __init__(self, protocol: PerplexityProtocol, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                 tail_logprob: torch.Tensor, targets: torch.Tensor, vocab_size: int, identity: str = ""):
        n = targets.shape[0]
        if top_ids.shape != top_logprobs.shape or top_ids.dim() != 2 or top_ids.shape[0] != n \
                or tail_logprob.shape != (n,):
            raise ValueError(
                f"inconsistent reference shapes: top_ids {tuple(top_ids.shape)}, top_logprobs "
                f"{tuple(top_logprobs.shape)}, tail_logprob {tuple(tail_logprob.shape)}, targets {tuple(targets.shape)}"
            )
        self.protocol = protocol
        self.top_ids = top_ids.to(torch.int32).contiguous()
        self.top_logprobs = top_logprobs.to(torch.float32).contiguous()
        self.tail_logprob = tail_logprob.to(torch.float32).contiguous()
        self.targets = targets.to(torch.int32).contiguous()
        self.vocab_size = int(vocab_size)
        self.identity = identity

    @property
    def top_k(self) -> int:
        return self.top_ids.shape[1]

    @property
    def tokens_scored(self) -> int:
        return self.targets.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def __repr__(self) -> str:
        return (f"ReferenceDistributions(protocol={self.protocol}, tokens_scored={self.tokens_scored}, "
                f"top_k={self.top_k}, vocab_size={self.vocab_size}, identity={self.identity!r})")

    @classmethod
    def compute(cls, model, tokenizer, documents: Sequence[Document], protocol: PerplexityProtocol,
                top_k: int = DEFAULT_TOP_K, identity: str = "") -> "ReferenceDistributions":
        """One pass of `model` (the base) over the protocol's windows. top_k is capped at the vocabulary."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        encoded = check_protocol(model, tokenizer, documents, protocol)
        device = model_device(model)
        ids_parts, logp_parts, tail_parts, target_parts = [], [], [], []
        vocab_size = None
        with inference_eval(model):
            for ids, _ in encoded:
                for logits, targets in scored_windows(model, ids, protocol.context_length, protocol.stride, device):
                    vocab_size = logits.shape[-1]
                    top_ids, top_logp, tail = _top_k_and_tail(logits, min(top_k, vocab_size))
                    ids_parts.append(top_ids.to("cpu", torch.int32))
                    logp_parts.append(top_logp.cpu())
                    tail_parts.append(tail.cpu())
                    target_parts.append(targets.to("cpu", torch.int32))
        return cls(protocol, torch.cat(ids_parts), torch.cat(logp_parts), torch.cat(tail_parts),
                   torch.cat(target_parts), vocab_size, identity)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"top_ids": self.top_ids, "top_logprobs": self.top_logprobs,
                "tail_logprob": self.tail_logprob, "targets": self.targets}

    def save(self, path) -> None:
        """Write a safetensors file atomically (a temporary file beside it, then os.replace)."""
        path = Path(path)
        metadata = {
            "format": FORMAT,
            "protocol": json.dumps(self.protocol.to_dict(), sort_keys=True),
            "top_k": json.dumps(self.top_k),
            "vocab_size": json.dumps(self.vocab_size),
            "tokens_scored": json.dumps(self.tokens_scored),
            "identity": json.dumps(self.identity),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(self._tensors(), tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path, protocol: PerplexityProtocol | None = None, identity: str | None = None
             ) -> "ReferenceDistributions":
        """Read a file written by save(). With `protocol` (or `identity`), a file made under another
        protocol (or for another key) raises ValueError naming both."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
        except FileNotFoundError:
            raise
        except Exception as exc:  # safetensors' own error type for a truncated or foreign file
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a KL reference file (format {metadata.get('format')!r}, expected {FORMAT!r})")
        try:
            stored = PerplexityProtocol.from_dict(json.loads(metadata["protocol"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"KL reference {path} has a malformed protocol in its metadata: {exc}") from exc
        if protocol is not None and stored != protocol:
            raise ValueError(f"KL reference {path} was computed under {stored}, not the expected {protocol}")
        stored_identity = json.loads(metadata["identity"])
        if identity is not None and stored_identity != identity:
            raise ValueError(f"KL reference {path} is for {stored_identity!r}, not the expected {identity!r}")
        tensors = load_file(str(path))
        reference = cls(stored, tensors["top_ids"], tensors["top_logprobs"], tensors["tail_logprob"],
                        tensors["targets"], json.loads(metadata["vocab_size"]), stored_identity)
        if reference.top_k != json.loads(metadata["top_k"]) or reference.tokens_scored != json.loads(metadata["tokens_scored"]):
            raise ValueError(f"KL reference {path} is inconsistent: its tensors do not match its metadata")
        return reference


class _KLAccumulator:
    """Per-position KL(base || candidate) and top-1 agreement against a reference, window by window."""

    def __init__(self, reference: ReferenceDistributions, device):
        self.reference = reference
        self.device = device
        self.offset = 0
        self.kl_parts: list[torch.Tensor] = []
        self.agree = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        ref = self.reference
        n = targets.shape[0]
        lo, hi = self.offset, self.offset + n
        if logits.shape[-1] != ref.vocab_size:
            raise ValueError(f"the candidate's vocabulary ({logits.shape[-1]}) differs from the reference's ({ref.vocab_size})")
        if hi > ref.tokens_scored or not torch.equal(targets.to("cpu", torch.int32), ref.targets[lo:hi]):
            raise ValueError("the scored tokens differ from the KL reference's (another corpus, tokenizer or protocol)")
        top_ids = ref.top_ids[lo:hi].to(self.device, torch.long)
        p_logp = ref.top_logprobs[lo:hi].to(self.device)
        p_tail = ref.tail_logprob[lo:hi].to(self.device)
        q_all = torch.log_softmax(logits.float(), dim=-1)
        self.kl_parts.append(coarse_kl(p_logp, p_tail, q_all, top_ids).cpu())
        # The base's most likely token is one of the candidate's most likely tokens (ties count as agreement).
        self.agree += int((q_all.gather(-1, top_ids[:, :1])[:, 0] >= q_all.max(dim=-1).values).sum().item())
        self.offset = hi

    def result(self, protocol: PerplexityProtocol, start: float) -> KLResult:
        if self.offset != self.reference.tokens_scored:
            raise ValueError(f"the candidate scored {self.offset} positions, the KL reference {self.reference.tokens_scored}")
        kl = torch.cat(self.kl_parts).double().numpy()
        return KLResult(
            protocol=protocol,
            kl_mean=float(kl.mean()),
            kl_p99=float(np.quantile(kl, 0.99)),  # linear interpolation, like torch.quantile (no size limit)
            top1_agreement=self.agree / self.offset,
            tokens_scored=self.offset,
            top_k=self.reference.top_k,
            device=str(self.device),
            seconds=time.perf_counter() - start,
        )


def _check_reference(reference: ReferenceDistributions, protocol: PerplexityProtocol, encoded) -> None:
    if reference.protocol != protocol:
        raise ValueError(f"the KL reference was computed under {reference.protocol}, not {protocol}")
    targets = _scored_targets(encoded, protocol)
    if targets.shape != reference.targets.shape:
        raise ValueError(f"the protocol scores {targets.shape[0]} positions here, the KL reference "
                         f"{reference.tokens_scored} (another corpus or tokenizer?)")
    if not torch.equal(targets, reference.targets):
        raise ValueError("the scored tokens differ from the KL reference's (another corpus or tokenizer?)")


class KLScorer(WindowScorer):
    """KL(base || candidate) and top-1 agreement against the study's reference distributions."""

    name = "kl"

    def __init__(self, setup: ScoringSetup):
        if setup.reference is None:
            raise ValueError("kl needs the base model's reference distributions")
        self.accumulator = _KLAccumulator(setup.reference, setup.device)

    def begin(self, encoded, protocol: PerplexityProtocol) -> None:
        _check_reference(self.accumulator.reference, protocol, encoded)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.accumulator.add(logits, targets)

    def result(self, protocol, encoded, device: str, dtype: str, start: float) -> KLResult:
        return self.accumulator.result(protocol, start)


def torch_windows(model, protocol: PerplexityProtocol):
    """`score_windows`' window source for a torch model (call inside `inference_eval`)."""
    device = model_device(model)
    return lambda ids: scored_windows(model, ids, protocol.context_length, protocol.stride, device)


def _run(model, tokenizer, documents, protocol, reference, with_perplexity: bool):
    start = time.perf_counter()
    encoded = check_protocol(model, tokenizer, documents, protocol)
    device = model_device(model)
    scorers = [KLScorer(ScoringSetup(reference, device))]
    if with_perplexity:
        scorers.insert(0, PerplexityScorer())
    with inference_eval(model):
        results = score_windows(torch_windows(model, protocol), encoded, protocol, scorers, str(device),
                                str(model_dtype(model)).replace("torch.", ""), start)
    return tuple(results) if with_perplexity else results[0]


def measure_kl(model, tokenizer, documents: Sequence[Document], protocol: PerplexityProtocol,
               reference: ReferenceDistributions) -> KLResult:
    """Mean and p99 of KL(base || model) in nats and top-1 agreement over the protocol's scored
    positions. ValueError if `reference` was made under another protocol or token layout."""
    return _run(model, tokenizer, documents, protocol, reference, with_perplexity=False)


def measure_perplexity_and_kl(model, tokenizer, documents: Sequence[Document], protocol: PerplexityProtocol,
                              reference: ReferenceDistributions) -> tuple[PerplexityResult, KLResult]:
    """measure_perplexity and measure_kl from one forward pass per window (same figures as each alone)."""
    return _run(model, tokenizer, documents, protocol, reference, with_perplexity=True)
