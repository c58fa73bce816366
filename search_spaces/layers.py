"""Finding the parts of a decoder by module type and config, not by one model's attribute names.

Works for transformers decoders built from `nn.Linear` projections (Llama, Qwen2, Mistral, Gemma, OPT...)
and for GPT-2's `Conv1D` (a linear layer whose weight is stored transposed, as (in, out)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # transformers' GPT-2 style linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old or very new transformers
    Conv1D = None

LINEAR_TYPES = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
ATTENTION_WORDS = ("attn", "attention")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def is_transposed(module: nn.Module) -> bool:
    """True for Conv1D, whose weight is (in_features, out_features)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), a view for Conv1D."""
    return module.weight.t() if is_transposed(module) else module.weight


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, list) of the repeated decoder blocks: the ModuleList with one block per hidden layer.

    Prefers the list whose block class transformers names in `_no_split_modules` (the decoder layer class).
    """
    count = getattr(text_config(model), "num_hidden_layers", None)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            kinds = {type(block).__name__ for block in module}
            if len(kinds) == 1:
                candidates.append((kinds.pop() in no_split, sum(p.numel() for p in module.parameters()), name, module))
    if not candidates:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (no ModuleList of {count} blocks)")
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    return candidates[0][2], candidates[0][3]


@dataclass(frozen=True)
class LinearSite:
    name: str  # qualified module name in the model
    group: str  # "attn" | "mlp" | "head"
    layer: int | None  # decoder layer index (None for the LM head)
    module: nn.Module


def _in_attention(block: nn.Module, relative_name: str) -> bool:
    """Whether a module inside a decoder block sits under its attention submodule."""
    parts = relative_name.split(".")
    owner = block
    for part in parts[:-1]:
        owner = getattr(owner, part)
        if "Attention" in type(owner).__name__ or any(w in part.lower() for w in ATTENTION_WORDS):
            return True
    return any(w in parts[-1].lower() for w in ATTENTION_WORDS) and len(parts) == 1


def linear_sites(model: nn.Module, include_head: bool = True) -> list[LinearSite]:
    """Every linear projection in the decoder blocks, grouped: attention vs MLP (anything else in a block,
    e.g. OPT's fc1/fc2 or MoE experts), plus the LM head when it is a separate linear layer."""
    prefix, blocks = decoder_layers(model)
    sites = []
    for index, block in enumerate(blocks):
        for relative, module in block.named_modules():
            if relative and is_linear(module):
                group = "attn" if _in_attention(block, relative) else "mlp"
                sites.append(LinearSite(f"{prefix}.{index}.{relative}", group, index, module))
    head = model.get_output_embeddings() if include_head and hasattr(model, "get_output_embeddings") else None
    if head is not None and is_linear(head):
        name = next(n for n, m in model.named_modules() if m is head)
        sites.append(LinearSite(name, "head", None, head))
    return sites


def head_is_tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight
