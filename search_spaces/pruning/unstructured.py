"""Unstructured and 2:4 semi-structured sparsity: magnitude or Wanda scores, the lowest weights zeroed in place.

Honest accounting: the zeros are stored densely and multiplied by dense kernels, so on their own they save
neither memory nor time, and the evaluators measure them as they are. The 2:4 pattern (two of every four
consecutive inputs of each output row are zero) is what NVIDIA sparse tensor cores (Ampere and newer) run
about twice as fast once packed with `torch.sparse.to_sparse_semi_structured`, and what sparse
compressed-tensors checkpoints store compactly; on a CPU it buys nothing either.

Scores: magnitude |W| compared across the whole matrix (classic layer-wise magnitude pruning); Wanda
|W_ij| * ||X_j||_2 (input-feature norms from calibration text) compared within each output row, as the
Wanda paper does. 2:4 keeps the two best-scored weights of each group of four with either score.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from search_spaces.layers import linear_sites, weight_out_in

GROUPS = ("attn", "mlp")
METHODS = ("magnitude", "wanda")
PATTERNS = ("unstructured", "2:4")
SEMI_STRUCTURED_SPARSITY = 0.5  # 2 of every 4


def sparsified_modules(model: nn.Module, sparsity: Mapping[str, float]) -> dict[str, nn.Module]:
    """The decoder's linear layers in the groups given a sparsity above zero (the LM head is never pruned)."""
    return {s.name: s.module for s in linear_sites(model, include_head=False) if sparsity.get(s.group, 0.0) > 0}


def weight_scores(weight: torch.Tensor, method: str, input_norms: torch.Tensor | None) -> torch.Tensor:
    """Per-weight importance of a (out, in) weight."""
    scores = weight.detach().abs().float()
    if method == "wanda":
        if input_norms is None:
            raise ValueError("Wanda needs the input-feature norms of every pruned layer")
        scores = scores * input_norms.to(scores.device, torch.float32)[None, :]
    return scores


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: str, per_row: bool) -> torch.Tensor:
    """Boolean (out, in) mask of weights kept: exactly floor(sparsity * n) lowest-scored weights dropped per
    comparison group (the whole matrix, each row, or each group of four inputs for 2:4)."""
    out_features, in_features = scores.shape
    if pattern == "2:4":
        if in_features % 4:
            raise ValueError(f"2:4 sparsity needs input features divisible by 4, got {in_features}")
        groups = scores.reshape(out_features, in_features // 4, 4)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(-1, groups.topk(2, dim=-1).indices, True)
        return mask.reshape(out_features, in_features)
    rows = scores if per_row else scores.reshape(1, -1)
    dropped = math.floor(rows.shape[1] * sparsity)
    mask = torch.ones_like(rows, dtype=torch.bool)
    if dropped:
        mask.scatter_(-1, rows.argsort(dim=-1)[:, :dropped], False)
    return mask.reshape(out_features, in_features)


def sparsify(model: nn.Module, sparsity: Mapping[str, float], method: str, pattern: str,
             input_norms: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Zero the lowest-scored weights of every linear layer in each group at that group's sparsity, in place.

    Returns the sparsity achieved per group (zeros / weights over the group's linear layers).
    """
    sites = linear_sites(model, include_head=False)
    with torch.no_grad():
        for site in sites:
            if sparsity.get(site.group, 0.0) <= 0:
                continue
            weight = weight_out_in(site.module)  # a view: writing through it updates Conv1D's (in, out) storage
            norms = input_norms.get(site.name) if input_norms is not None else None
            mask = keep_mask(weight_scores(weight, method, norms), sparsity[site.group], pattern,
                             per_row=method == "wanda")
            weight.mul_(mask.to(weight.device, weight.dtype))
    zeros, totals = {g: 0 for g in GROUPS}, {g: 0 for g in GROUPS}
    for site in sites:
        weight = weight_out_in(site.module)
        zeros[site.group] += int((weight == 0).sum())
        totals[site.group] += weight.numel()
    return {g: zeros[g] / totals[g] for g in GROUPS if totals[g]}
