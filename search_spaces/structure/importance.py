"""Importance scores from calibration text: which layers, key/value groups, MLP neurons and input features matter.

Everything is gathered with hooks during forward passes over calibration batches (the training split):
- layer: 1 - cos(block input, block output), averaged over tokens (the "block influence" of ShortGPT):
  a block that barely turns the residual stream is the cheapest to drop;
- key/value group: the mean squared norm of what each query head adds to the attention output (its slice
  of the output projection applied to its slice of the input), summed over the group's query heads;
- MLP neuron: RMS of its activation times the norm of its output-projection column, i.e. the typical
  size of what it writes into the residual stream;
- input features of any linear layer: ||X_j||_2 over calibration tokens, Wanda's activation norm.
Higher is more important everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.runtime import inference_eval, model_device
from search_spaces.compute import float32_compute
from search_spaces.layers import decoder_layers, text_config, weight_out_in
from search_spaces.structure.anatomy import attention_parts, head_layout, mlp_parts

MICRO_BATCH = 4  # calibration windows per forward: bounds activation memory


@dataclass(frozen=True)
class Importance:
    layers: torch.Tensor  # (num_layers,)
    kv_groups: dict[int, torch.Tensor]  # layer -> (kv_heads,)
    neurons: dict[int, torch.Tensor]  # layer -> (intermediate,)


class SquareSums:
    """Per-feature sums of squares of a linear layer's input over calibration tokens (a pre-hook)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sums = x.square().sum(dim=0)
        self.sums = sums if self.sums is None else self.sums + sums
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sums.sqrt()

    def rms(self) -> torch.Tensor:
        return (self.sums / max(self.tokens, 1)).sqrt()


class BlockTurn:
    """Mean 1 - cos(input, output) of a decoder block over calibration tokens (a forward hook)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, (tuple, list)) else output
        cos = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
        self.total += (1.0 - cos).sum().item()
        self.tokens += cos.numel()

    def score(self) -> float:
        return self.total / max(self.tokens, 1)


class HeadContribution:
    """Per query head, the summed squared norm of its share of the attention output (a pre-hook on the output
    projection). ||x_h W_h^T||^2 = x_h (W_h^T W_h) x_h^T, so a small head_dim x head_dim Gram matrix per head
    replaces a full projection."""

    def __init__(self, output_projection: nn.Module, heads: int, head_dim: int) -> None:
        weight = weight_out_in(output_projection).detach().double()  # (hidden, heads * head_dim)
        per_head = weight.reshape(weight.shape[0], heads, head_dim)
        self.gram = torch.einsum("ohd,ohe->hde", per_head, per_head)
        self.heads, self.head_dim = heads, head_dim
        self.sums = torch.zeros(heads, dtype=torch.float64, device=weight.device)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, self.heads, self.head_dim).double()
        self.sums += torch.einsum("nhd,hde,nhe->h", x, self.gram, x)

    def group_scores(self, kv_heads: int) -> torch.Tensor:
        return self.sums.reshape(kv_heads, self.heads // kv_heads).sum(dim=1)


def calibrate(model: nn.Module, batches: torch.Tensor, pre_hooks: Iterable[tuple[nn.Module, Callable]] = (),
              block_hooks: Iterable[tuple[nn.Module, Callable]] = ()) -> None:
    """Run the decoder (no LM head: nothing here needs logits) over `batches` with hooks installed, then remove them.

    `pre_hooks` see a module's inputs (forward pre-hooks); `block_hooks` see inputs and output (forward hooks
    with keyword arguments, as decoder blocks take hidden_states by keyword in some models).
    """
    handles = [m.register_forward_pre_hook(h) for m, h in pre_hooks]
    handles += [m.register_forward_hook(h, with_kwargs=True) for m, h in block_hooks]
    body = getattr(model, "base_model", model)
    device = model_device(model)
    try:
        with inference_eval(model), float32_compute(model):
            for start in range(0, batches.shape[0], MICRO_BATCH):
                body(input_ids=batches[start:start + MICRO_BATCH].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def structural_importance(model: nn.Module, batches: torch.Tensor, *, layers: bool = True, heads: bool = True,
                          neurons: bool = True) -> Importance:
    """Layer, key/value-group and MLP-neuron scores from one calibration pass (only the kinds asked for)."""
    _, blocks = decoder_layers(model)
    layout = head_layout(text_config(model))
    turns = {i: BlockTurn() for i in range(len(blocks))} if layers else {}
    contributions, activations, pre_hooks = {}, {}, []
    for i in range(len(blocks)):
        if heads:
            output = attention_parts(model, i).output.module
            contributions[i] = HeadContribution(output, layout.heads, layout.head_dim)
            pre_hooks.append((output, contributions[i]))
        if neurons:
            output = mlp_parts(model, i).output.module
            activations[i] = (output, SquareSums())  # the output projection's input is the activation
            pre_hooks.append(activations[i])
    calibrate(model, batches, pre_hooks, [(blocks[i], turn) for i, turn in turns.items()])
    return Importance(
        layers=torch.tensor([turns[i].score() for i in sorted(turns)], dtype=torch.float64),
        kv_groups={i: c.group_scores(layout.kv_heads).cpu() for i, c in contributions.items()},
        neurons={i: (sums.rms() * weight_out_in(out).detach().double().norm(dim=0)).cpu()
                 for i, (out, sums) in activations.items()},
    )


def input_feature_norms(model: nn.Module, modules: dict[str, nn.Module],
                        batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """||X_j||_2 of each named linear layer's input features over the calibration tokens (Wanda)."""
    sums = {name: SquareSums() for name in modules}
    calibrate(model, batches, [(module, sums[name]) for name, module in modules.items()])
    return {name: s.norms() for name, s in sums.items()}
