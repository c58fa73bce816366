"""KL(base || candidate) and top-1 agreement against a stored reference of the base's distributions."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import SAMPLE_TEXT, make_tiny_llama, make_tiny_tokenizer
from evaluators.corpus import Document
from evaluators.kl import DEFAULT_TOP_K, KLResult, coarse_kl, ReferenceDistributions, measure_kl, measure_perplexity_and_kl
from evaluators.perplexity import PerplexityProtocol, measure_perplexity, scored_windows

PROTOCOL = PerplexityProtocol(context_length=32, stride=16, max_tokens=None)
DOCS = [Document("a", SAMPLE_TEXT * 2), Document("b", "Work two. " + SAMPLE_TEXT)]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    # Larger initial weights than the default 0.02, whose near-uniform outputs keep their argmax under
    # almost any perturbation: here agreement falls from 0.83 to 0.19 as the noise grows from 5 % to 50 %.
    model = make_tiny_llama(vocab_size=len(tokenizer), initializer_range=0.1)
    return model, tokenizer


def perturbed(model, scale: float, seed: int = 1):
    """A copy with Gaussian noise of `scale` x each weight's std added to every decoder-layer weight."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in out.named_parameters():
            if ".layers." in name and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * param.std() * scale)
    return out


def full_logprobs(model, tokenizer, documents, protocol):
    """Float32 log-probs (positions, vocab) at every scored position, straight from the model."""
    from evaluators.perplexity import check_protocol

    rows = []
    with torch.no_grad():
        for ids, _ in check_protocol(model, tokenizer, documents, protocol):
            for logits, _ in scored_windows(model, ids, protocol.context_length, protocol.stride, "cpu"):
                rows.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(rows)


def exact_kl(base_logp, cand_logp) -> torch.Tensor:
    """Full-vocabulary KL(base || candidate) per position, in float64."""
    p, q = base_logp.double(), cand_logp.double()
    return (p.exp() * (p - q)).sum(-1)


def test_kl_of_a_model_against_itself_is_zero_with_full_agreement(tiny):
    model, tokenizer = tiny
    reference = ReferenceDistributions.compute(model, tokenizer, DOCS, PROTOCOL, top_k=16, identity="base")
    result = measure_kl(model, tokenizer, DOCS, PROTOCOL, reference)
    assert abs(result.kl_mean) < 1e-6 and abs(result.kl_p99) < 1e-6
    assert result.top1_agreement == 1.0
    assert result.tokens_scored == reference.tokens_scored == sum(len(ids) - 1 for ids in
                                                                   (tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in DOCS))
    assert result.top_k == 16 and result.protocol == PROTOCOL and result.device == "cpu"
    data = result.to_dict()
    assert data["protocol"] == PROTOCOL.to_dict() and data["kl_mean"] == result.kl_mean
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.kl_mean = 1.0


def test_kl_grows_with_the_perturbation_and_agreement_falls(tiny):
    model, tokenizer = tiny
    reference = ReferenceDistributions.compute(model, tokenizer, DOCS, PROTOCOL, top_k=16)
    mild = measure_kl(perturbed(model, 0.05), tokenizer, DOCS, PROTOCOL, reference)
    strong = measure_kl(perturbed(model, 0.5), tokenizer, DOCS, PROTOCOL, reference)
    assert 0 < mild.kl_mean < strong.kl_mean
    assert mild.kl_mean <= mild.kl_p99 and strong.kl_mean <= strong.kl_p99
    assert strong.top1_agreement < 0.5
    assert mild.top1_agreement > strong.top1_agreement


def test_top1_agreement_counts_positions_where_the_argmaxes_agree(tiny):
    model, tokenizer = tiny
    reference = ReferenceDistributions.compute(model, tokenizer, DOCS, PROTOCOL, top_k=4)
    candidate = perturbed(model, 0.1)
    base = full_logprobs(model, tokenizer, DOCS, PROTOCOL)
    cand = full_logprobs(candidate, tokenizer, DOCS, PROTOCOL)
    expected = (base.argmax(-1) == cand.argmax(-1)).double().mean().item()
    assert 0.2 < expected < 0.95  # a test that can tell
    assert measure_kl(candidate, tokenizer, DOCS, PROTOCOL, reference).top1_agreement == pytest.approx(expected)


def test_full_vocabulary_reference_gives_the_exact_kl_and_a_small_k_a_lower_bound(tiny):
    model, tokenizer = tiny
    vocab = len(tokenizer)
    candidate = perturbed(model, 0.5)
    exact = exact_kl(full_logprobs(model, tokenizer, DOCS, PROTOCOL), full_logprobs(candidate, tokenizer, DOCS, PROTOCOL))

    full = ReferenceDistributions.compute(model, tokenizer, DOCS, PROTOCOL, top_k=10 * vocab)  # capped at V
    assert full.top_k == vocab and torch.all(full.tail_logprob == float("-inf"))
    result = measure_kl(candidate, tokenizer, DOCS, PROTOCOL, full)
    assert result.kl_mean == pytest.approx(exact.mean().item(), rel=1e-4)
    assert result.kl_p99 == pytest.approx(torch.quantile(exact, 0.99).item(), rel=1e-4)

    coarse = []
    for k in (1, 8, 64):
        small = ReferenceDistributions.compute(model, tokenizer, DOCS, PROTOCOL, top_k=k)
        # The tail bin holds the rest of the base's mass.
        total = torch.logsumexp(torch.cat([small.top_logprobs, small.tail_logprob[:, None]], -1), -1)
        assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)
        coarse.append(measure_kl(candidate, tokenizer, DOCS, PROTOCOL, small).kl_mean)
    # Each top-k partition refines the one before, so the coarse KL can only grow with k, up to the exact KL.
    assert 0 < coarse[0] <= coarse[1] <= coarse[2] <= exact.mean().item() * (1 + 1e-6), (coarse, exact.mean())
    assert coarse[2] < exact.mean().item() * (1 - 1e-3)  # strictly below: k = 64 of 300 loses something


def test_compact_kl_matches_a_hand_computation_with_the_tail_bin(tiny):
    model, tokenizer = tiny
    reference = ReferenceDistributions.compute(model, tokenizer, DOCS, PROTOCOL, top_k=4)
    base = full_logprobs(model, tokenizer, DOCS, PROTOCOL)
    # Coarse-grained KL by hand, with the tail bin: p's top-4 plus the rest, q summed over the same bins.
    cand_logp = full_logprobs(perturbed(model, 0.5), tokenizer, DOCS, PROTOCOL)
    ids = reference.top_ids.long()
    p_top, q_top = base.gather(-1, ids).double(), cand_logp.gather(-1, ids).double()
    p_tail = torch.log1p(-p_top.exp().sum(-1).clamp(max=1 - 1e-12))
    q_tail = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-12))
    by_hand = ((p_top.exp() * (p_top - q_top)).sum(-1) + p_tail.exp() * (p_tail - q_tail)).clamp_min(0)
    result = measure_kl(perturbed(model, 0.5), tokenizer, DOCS, PROTOCOL, reference)
    assert result.kl_mean == pytest.approx(by_hand.mean().item(), rel=1e-4)


def test_rounding_never_makes_the_kl_negative():
    # Identical bins except that the stored tail came out a hair low, as float32 rounding can leave it:
    # the raw sum is then slightly negative, and a KL below 0 would read as "better than the base".
    q = torch.log_softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), -1)
    top_logp, top_ids = q.topk(5, -1)
    tail = q.scatter(-1, top_ids, float("-inf")).logsumexp(-1) - 1e-4
    assert torch.equal(coarse_kl(top_logp, tail, q, top_ids), torch.zeros(3))
    # ...while a real difference stays positive, and an empty tail bin (k = V) adds nothing.
    assert torch.all(coarse_kl(top_logp, tail + 0.1, q, top_ids) > 0)
    all_logp, all_ids = q.topk(50, -1)
    full = coarse_kl(all_logp, torch.full((3,), float("-inf")), q, all_ids)
    assert torch.all(full >= 0) and torch.all(full < 1e-6)


def test_save_and_load_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    reference = ReferenceDistributions.compute(model, tokenizer, DOCS, PROTOCOL, top_k=8, identity="model@abc")
    path = tmp_path / "reference.safetensors"
    reference.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["reference.safetensors"]  # no temporary file left
    loaded = ReferenceDistributions.load(path, protocol=PROTOCOL, identity="model@abc")
    for name in ("top_ids", "top_logprobs", "tail_logprob", "targets"):
        assert torch.equal(getattr(loaded, name), getattr(reference, name)), name
    assert loaded.top_ids.dtype == torch.int32 and loaded.top_logprobs.dtype == torch.float32
    assert (loaded.protocol, loaded.identity, loaded.top_k, loaded.tokens_scored, loaded.vocab_size) == \
        (PROTOCOL, "model@abc", 8, reference.tokens_scored, reference.vocab_size)
    assert loaded.nbytes == reference.nbytes == reference.tokens_scored * (8 * 8 + 4 + 4)
    candidate = perturbed(model, 0.3)
    a = measure_kl(candidate, tokenizer, DOCS, PROTOCOL, reference)
    b = measure_kl(candidate, tokenizer, DOCS, PROTOCOL, loaded)
    assert (a.kl_mean, a.kl_p99, a.top1_agreement) == (b.kl_mean, b.kl_p99, b.top1_agreement)
    # Saving again replaces the file in place.
    reference.save(path)
    assert torch.equal(ReferenceDistributions.load(path).top_ids, reference.top_ids)


def test_a_reference_from_another_protocol_or_layout_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    reference = ReferenceDistributions.compute(model, tokenizer, DOCS, PROTOCOL, top_k=8, identity="base")
    path = tmp_path / "reference.safetensors"
    reference.save(path)
    other = PerplexityProtocol(context_length=32, stride=32, max_tokens=None)
    with pytest.raises(ValueError) as info:
        ReferenceDistributions.load(path, protocol=other)
    assert str(PROTOCOL) in str(info.value) and str(other) in str(info.value)
    with pytest.raises(ValueError, match="'base'.*'other'"):
        ReferenceDistributions.load(path, identity="other")
    # Measuring under another protocol, or over other text with the same protocol, is refused too.
    with pytest.raises(ValueError, match="stride=32"):
        measure_kl(model, tokenizer, DOCS, other, reference)
    with pytest.raises(ValueError, match="positions"):
        measure_perplexity_and_kl(model, tokenizer, DOCS[:1], PROTOCOL, reference)
    with pytest.raises(ValueError, match="scored tokens differ"):  # same positions, other order
        measure_kl(model, tokenizer, DOCS[::-1], PROTOCOL, reference)
    # A file that is not a reference.
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a KL reference"):
        ReferenceDistributions.load(tmp_path / "other.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ReferenceDistributions.load(tmp_path / "truncated.safetensors")


def test_one_pass_gives_the_same_perplexity_and_kl_as_each_alone(tiny):
    model, tokenizer = tiny
    candidate = perturbed(model, 0.3)
    reference = ReferenceDistributions.compute(model, tokenizer, DOCS, PROTOCOL, top_k=8)
    ppl, kl = measure_perplexity_and_kl(candidate, tokenizer, DOCS, PROTOCOL, reference)
    alone = measure_perplexity(candidate, tokenizer, DOCS, PROTOCOL)
    assert ppl.perplexity == pytest.approx(alone.perplexity, rel=1e-6)
    assert ppl.bits_per_byte == pytest.approx(alone.bits_per_byte, rel=1e-6)
    skip = {"seconds"}
    assert {k: v for k, v in ppl.to_dict().items() if k not in skip} == \
        {k: v for k, v in alone.to_dict().items() if k not in skip}
    kl_alone = measure_kl(candidate, tokenizer, DOCS, PROTOCOL, reference)
    assert isinstance(kl, KLResult)
    assert (kl.kl_mean, kl.kl_p99, kl.top1_agreement, kl.tokens_scored) == \
        (kl_alone.kl_mean, kl_alone.kl_p99, kl_alone.top1_agreement, kl_alone.tokens_scored)


# --- the built-in model ---------------------------------------------------------------------------

BUILTIN_PROTOCOL = PerplexityProtocol(context_length=256, stride=256, max_tokens=512)


def round_to_nearest(model, bits: int, group_size: int = 64):
    """A copy whose decoder-layer nn.Linear weights are rounded symmetrically per group of `group_size`
    input columns of each row to `bits` bits (then stored back in float)."""
    out = copy.deepcopy(model)
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, module in out.named_modules():
            if ".layers." in name and isinstance(module, torch.nn.Linear):
                w = module.weight
                groups = w.float().reshape(w.shape[0], -1, group_size)
                scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
                q = (groups / scale).round().clamp(-qmax - 1, qmax) * scale
                w.copy_(q.reshape(w.shape).to(w.dtype))
    return out


@pytest.mark.builtin
def test_builtin_8_bit_rounding_diverges_less_than_4_bit():
    from planner.sources import DataSource, ModelSource, load_corpus, load_model

    model, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m"), torch.device("cpu"))
    documents = load_corpus(DataSource.parse("builtin:shakespeare")).eval
    reference = ReferenceDistributions.compute(model, tokenizer, documents, BUILTIN_PROTOCOL)
    assert reference.top_k == DEFAULT_TOP_K
    # The planner's own rtn candidates (quantization technique, same group size), not a stand-in rounding.
    from search_spaces import BuildContext
    from search_spaces.quantization import QuantSpec, apply

    def rtn(bits):
        spec = QuantSpec(method="rtn", bits={"attn": bits, "mlp": bits}, group_size=64)
        return apply(copy.deepcopy(model), spec, BuildContext(tokenizer=tokenizer, calibration=()))

    eight = measure_kl(rtn(8), tokenizer, documents, BUILTIN_PROTOCOL, reference)
    four = measure_kl(rtn(4), tokenizer, documents, BUILTIN_PROTOCOL, reference)
    assert 0 < eight.kl_mean < four.kl_mean, (eight, four)
    assert eight.top1_agreement > four.top1_agreement
    assert eight.top1_agreement > 0.9
