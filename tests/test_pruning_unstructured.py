"""Unstructured and 2:4 sparsity: which weights go, exact fractions, and honest (unchanged) storage."""
from __future__ import annotations

import torch
from conftest import SAMPLE_TEXT, make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer

from evaluators.corpus import Document
from evaluators.memory import weight_bytes
from search_spaces.base import BuildContext
from search_spaces.layers import linear_sites, weight_out_in
from search_spaces.pruning import PruneSpec, apply, estimate
from search_spaces.pruning.unstructured import keep_mask, sparsify, weight_scores


def context(tokenizer) -> BuildContext:
    return BuildContext(tokenizer=tokenizer, calibration=[Document("sonnet", SAMPLE_TEXT * 20)], progress=False)


def test_keep_mask_drops_the_lowest_scores_per_comparison_group():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    per_row = keep_mask(scores, 0.5, "unstructured", per_row=True)
    assert per_row.tolist() == [[False, False, True, True], [True, True, False, False]]
    whole = keep_mask(torch.tensor([[1.0, 5.0], [2.0, 6.0]]), 0.5, "unstructured", per_row=False)
    assert whole.tolist() == [[False, True], [False, True]]
    semi = keep_mask(torch.tensor([[9.0, 1.0, 8.0, 2.0, 0.0, 3.0, 4.0, 5.0]]), 0.5, "2:4", per_row=True)
    assert semi.tolist() == [[True, False, True, False, False, False, True, True]]


def test_wanda_weighs_magnitudes_by_input_norms():
    weight = torch.tensor([[2.0, -1.0]])
    norms = torch.tensor([1.0, 10.0])
    magnitude = keep_mask(weight_scores(weight, "magnitude", None), 0.5, "unstructured", per_row=True)
    wanda = keep_mask(weight_scores(weight, "wanda", norms), 0.5, "unstructured", per_row=True)
    assert magnitude.tolist() == [[True, False]]
    assert wanda.tolist() == [[False, True]]


def test_magnitude_sparsity_is_exact_per_group_and_stores_the_same_bytes():
    model = make_tiny_llama()
    before = weight_bytes(model).total_bytes
    achieved = sparsify(model, {"mlp": 0.5}, "magnitude", "unstructured")
    assert achieved == {"attn": 0.0, "mlp": 0.5}
    for site in linear_sites(model, include_head=False):
        weight = weight_out_in(site.module)
        zeros = weight == 0
        if site.group == "mlp":
            assert int(zeros.sum()) == weight.numel() // 2
            assert weight[~zeros].abs().min() >= weight.abs()[zeros].max()  # the smallest half went
        else:
            assert int(zeros.sum()) == 0
    assert weight_bytes(model).total_bytes == before  # dense zeros cost the same


def test_wanda_apply_prunes_every_row_by_activation_weighted_scores():
    tokenizer = make_tiny_tokenizer()
    spec = PruneSpec(sparsity={"attn": 0.25, "mlp": 0.5}, method="wanda", calibration_samples=4,
                     calibration_seq_len=16)
    wanda_model = make_tiny_llama(vocab_size=len(tokenizer))
    expected = estimate(wanda_model, spec)
    apply(wanda_model, spec, context(tokenizer))
    magnitude_model = make_tiny_llama(vocab_size=len(tokenizer))
    sparsify(magnitude_model, {"attn": 0.25, "mlp": 0.5}, "magnitude", "unstructured")
    assert wanda_model.pruning_report.sparsity == {"attn": 0.25, "mlp": 0.5}
    assert weight_bytes(wanda_model).total_bytes == expected.weight_bytes  # estimate counts zeros as stored
    differs = False
    for wanda_site, magnitude_site in zip(linear_sites(wanda_model, False), linear_sites(magnitude_model, False)):
        weight = weight_out_in(wanda_site.module)
        fraction = 0.5 if wanda_site.group == "mlp" else 0.25
        assert ((weight == 0).sum(dim=1) == int(weight.shape[1] * fraction)).all()  # per output row
        differs |= not torch.equal(weight == 0, weight_out_in(magnitude_site.module) == 0)
    assert differs  # calibration activations changed the choice


def test_semi_structured_2_4_on_gpt2_conv1d_weights():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_gpt2(vocab_size=len(tokenizer))
    apply(model, PruneSpec(sparsity={"mlp": 0.5}, method="magnitude", pattern="2:4"), context(tokenizer))
    for site in linear_sites(model, include_head=False):
        groups = (weight_out_in(site.module) == 0).reshape(weight_out_in(site.module).shape[0], -1, 4).sum(-1)
        if site.group == "mlp":
            assert (groups == 2).all()
        else:
            assert (groups == 0).all()
