"""Structured surgery: remove MLP neurons, key/value groups (with their query heads) and whole layers for real.

Each operation replaces linear layers by smaller ones holding the kept rows / columns (a fused projection
keeps them in each of its parts: [gate; up], [q; k; v]), then writes the new counts into the live config
object (every submodule holding a reference sees them), so the result is a plain transformers model:
`save_pretrained` then `from_pretrained` gives identical logits.
`check_reloadable` proves that by comparing every tensor shape with a skeleton built from the config.
All operations work in place on the model they are given.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Sequence

import torch
from torch import nn

from search_spaces.structure.importance import Importance
from search_spaces.layers import Conv1D, decoder_layers, is_transposed, text_config, weight_out_in
from search_spaces.structure.anatomy import (
    UnsupportedArchitecture,
    attention_parts,
    depth_pruning_blocker,
    head_layout,
    head_pruning_blocker,
    mlp_parts,
    mlp_pruning_blocker,
)
from search_spaces.structure.shape import Shape, Structure, shape_of, shaped_config, target_shape, write_shape

# Per-module copies of head counts some attention implementations keep (Llama's reads them from the config).
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads")
KV_COUNT_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads")
WIDTH_ATTRIBUTES = ("intermediate_size",)


def _new_linear(module: nn.Module, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An nn.Linear, or of the model's own subclass of it (Falcon's computes x @ W.T + b): the reloaded model
    builds that class again, so the cut one keeps it and computes the very same numbers."""
    kind = type(module)
    if kind is not nn.Linear and issubclass(kind, nn.Linear) and kind.__module__.startswith("transformers.models."):
        try:
            return kind(in_features, out_features, bias=bias)
        except TypeError:  # a constructor of its own: the plain layer computes the same product
            pass
    return nn.Linear(in_features, out_features, bias=bias)


def slice_linear(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Module:
    """A new linear layer (nn.Linear or Conv1D, like `module`) holding only the given output rows / input columns."""
    weight = weight_out_in(module).detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    bias = module.bias.detach() if module.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows.to(bias.device))
    out_features, in_features = weight.shape
    with torch.device("meta"):  # shapes only: the weights are assigned below, no init cost
        if is_transposed(module):
            new = Conv1D(out_features, in_features)
        else:
            new = _new_linear(module, in_features, out_features, bias is not None)
    stored = weight.t() if is_transposed(module) else weight
    new.weight = nn.Parameter(stored.clone(memory_format=torch.contiguous_format),
                              requires_grad=module.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
    new.train(module.training)
    return new


def _set_present(module: nn.Module, names: Sequence[str], value: int) -> None:
    for name in names:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, value)


def _uniform(keep: Mapping[int, Sequence[int] | torch.Tensor], layers: int, what: str) -> int:
    if sorted(keep) != list(range(layers)):
        raise ValueError(f"{what}: give kept indices for every layer 0..{layers - 1}, got layers {sorted(keep)}")
    counts = {len(v) for v in keep.values()}
    if len(counts) != 1:
        raise ValueError(f"{what}: every layer must keep the same number (the config holds one), got {sorted(counts)}")
    return counts.pop()


def _indices(values: Sequence[int] | torch.Tensor, limit: int, what: str) -> torch.Tensor:
    index = torch.as_tensor(list(map(int, values)), dtype=torch.long).sort().values
    if index.numel() == 0 or index.unique().numel() != index.numel() or index[0] < 0 or index[-1] >= limit:
        raise ValueError(f"{what}: kept indices must be distinct and within 0..{limit - 1}")
    return index


def _apply_shape(model: nn.Module, shape: Shape, kept_layers: Sequence[int] | None = None) -> None:
    """Validate the new counts on a copy of the config first, then write them into the live config."""
    shaped_config(model.config, shape, kept_layers)
    write_shape(text_config(model), shape, kept_layers)


def prune_mlp(model: nn.Module, keep: Mapping[int, Sequence[int] | torch.Tensor]) -> None:
    """Keep only the given intermediate neurons of every layer's MLP (the same count in each layer)."""
    shape = shape_of(text_config(model))
    width = _uniform(keep, shape.layers, "MLP neurons")
    new_shape = replace(shape, intermediate=width)
    shaped_config(model.config, new_shape)  # fail before touching any weight
    if reason := mlp_pruning_blocker(model):
        raise UnsupportedArchitecture(reason, "mlp_keep")
    for layer, values in keep.items():
        parts = mlp_parts(model, layer)
        index = _indices(values, parts.width, f"layer {layer} MLP neurons")
        for projection in parts.inputs:
            rows = projection.rows(index, parts.width)
            model.set_submodule(projection.name, slice_linear(projection.module, rows=rows))
        model.set_submodule(parts.output.name, slice_linear(parts.output.module, cols=index))
        _set_present(parts.owner, WIDTH_ATTRIBUTES, width)
    _apply_shape(model, new_shape)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def packed_rows(q_rows: torch.Tensor, kv_rows: torch.Tensor, q_width: int, kv_width: int) -> torch.Tensor:
    """The rows of a packed [q; k; v] projection holding the given query rows and key/value rows."""
    return torch.cat([q_rows, q_width + kv_rows, q_width + kv_width + kv_rows])


def prune_heads(model: nn.Module, keep_groups: Mapping[int, Sequence[int] | torch.Tensor]) -> None:
    """Keep only the given key/value groups of every layer, each with all the query heads that read it.

    Whole groups keep grouped-query attention valid: heads / kv_heads stays what it was.
    """
    config = text_config(model)
    layout, shape = head_layout(config), shape_of(config)
    groups = _uniform(keep_groups, shape.layers, "key/value groups")
    new_shape = replace(shape, heads=groups * layout.group_size, kv_heads=groups)
    shaped_config(model.config, new_shape)
    if reason := head_pruning_blocker(model):
        raise UnsupportedArchitecture(reason, "heads_keep")
    q_width, kv_width = layout.heads * layout.head_dim, layout.kv_heads * layout.head_dim
    for layer, values in keep_groups.items():
        kv = _indices(values, layout.kv_heads, f"layer {layer} key/value groups")
        queries = (kv[:, None] * layout.group_size + torch.arange(layout.group_size)).reshape(-1)
        q_rows, kv_rows = _head_rows(queries, layout.head_dim), _head_rows(kv, layout.head_dim)
        qkv_rows = packed_rows(q_rows, kv_rows, q_width, kv_width)
        parts = attention_parts(model, layer)
        for projection in parts.queries:
            model.set_submodule(projection.name, slice_linear(projection.module, rows=q_rows))
        for projection in parts.key_values:
            model.set_submodule(projection.name, slice_linear(projection.module, rows=kv_rows))
        for projection in parts.packed:
            model.set_submodule(projection.name, slice_linear(projection.module, rows=qkv_rows))
        model.set_submodule(parts.output.name, slice_linear(parts.output.module, cols=q_rows))
        _set_present(parts.owner, HEAD_COUNT_ATTRIBUTES, new_shape.heads)
        _set_present(parts.owner, KV_COUNT_ATTRIBUTES, new_shape.kv_heads)
    _apply_shape(model, new_shape)


def copy_modules(model: nn.Module) -> nn.Module:
    """A copy of the model's modules holding the very same parameter and buffer tensors: a stage may replace its
    modules or set attributes without touching the original, but must not write into a tensor."""
    return copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})


def drop_layers(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep only the given decoder layers, renumbered 0..n-1 (their attention's `layer_idx` indexes the KV cache)."""
    config = text_config(model)
    if reason := depth_pruning_blocker(model):
        raise UnsupportedArchitecture(reason, "depth_keep")
    prefix, blocks = decoder_layers(model)
    index = _indices(keep, len(blocks), "kept layers").tolist()
    new_shape = replace(shape_of(config), layers=len(index))
    shaped_config(model.config, new_shape, index)
    kept = nn.ModuleList(blocks[i] for i in index)
    for position, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    model.set_submodule(prefix, kept)
    _apply_shape(model, new_shape, index)


def check_reloadable(model: nn.Module) -> None:
    """Raise UnsupportedArchitecture unless a model built from the config has exactly this model's tensor shapes."""
    with torch.device("meta"):
        skeleton = type(model)(copy.deepcopy(model.config))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            raise UnsupportedArchitecture(
                f"after pruning, {name} has shape {actual.get(name)} but the config describes {expected.get(name)}"
            )


def top(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` highest scores, in ascending index order."""
    return sorted(torch.topk(scores, count).indices.tolist())


@dataclass(frozen=True)
class StructureReport:
    shape: Shape
    kept_layers: tuple[int, ...]  # indices in the model before pruning
    kept_kv_groups: dict[int, tuple[int, ...]]  # layer (before dropping layers) -> kept key/value groups

    def to_dict(self) -> dict:
        return {"shape": asdict(self.shape), "kept_layers": list(self.kept_layers),
                "kept_kv_groups": {str(k): list(v) for k, v in self.kept_kv_groups.items()}}


def needed_scores(model: nn.Module, structure: Structure) -> dict[str, bool]:
    """Which importance kinds `restructure` needs for this structure (keywords of `structural_importance`)."""
    old, new = shape_of(text_config(model)), target_shape(text_config(model), structure)
    return {"layers": new.layers != old.layers, "heads": new.kv_heads != old.kv_heads,
            "neurons": new.intermediate != old.intermediate}


def check_structure(model: nn.Module, structure: Structure) -> None:
    """Raise UnsupportedArchitecture (naming the keep ratio at fault) unless `restructure` can take this
    structure: cheap, so callers check before spending time on calibration."""
    needs = needed_scores(model, structure)
    shaped_config(model.config, target_shape(text_config(model), structure))
    if needs["heads"] and (reason := head_pruning_blocker(model)):
        raise UnsupportedArchitecture(reason, "heads_keep")
    if needs["neurons"] and (reason := mlp_pruning_blocker(model)):
        raise UnsupportedArchitecture(reason, "mlp_keep")
    if needs["layers"] and (reason := depth_pruning_blocker(model)):
        raise UnsupportedArchitecture(reason, "depth_keep")


def restructure(model: nn.Module, structure: Structure, scores: Importance | None) -> StructureReport:
    """Shrink `model` in place to `structure`, keeping the most important neurons, groups and layers.

    `scores` may be None only when nothing is cut. Widths are cut first, while layer indices still
    match the scores; layers are dropped last.
    """
    check_structure(model, structure)
    config = text_config(model)
    old, new = shape_of(config), target_shape(config, structure)
    if new.intermediate != old.intermediate:
        prune_mlp(model, {i: top(scores.neurons[i], new.intermediate) for i in range(old.layers)})
    groups = {i: tuple(range(old.kv_heads)) for i in range(old.layers)}
    if new.kv_heads != old.kv_heads:
        groups = {i: tuple(top(scores.kv_groups[i], new.kv_heads)) for i in range(old.layers)}
        prune_heads(model, groups)
    layers = list(range(old.layers))
    if new.layers != old.layers:
        layers = top(scores.layers, new.layers)
        drop_layers(model, layers)
    check_reloadable(model)
    return StructureReport(new, tuple(layers), {i: groups[i] for i in layers})
