"""Structured shapes: keep ratios -> whole counts -> the smaller model's config and its exact size, unbuilt.

A `Structure` holds keep ratios (model-agnostic, so one search space serves any model). `target_shape`
turns them into whole counts for one config: layers, whole key/value groups (each with all its query
heads, so the grouped-query ratio never changes) and MLP neurons. `shaped_config` writes such counts into
a copy of the config, which is what makes `save_pretrained` / `from_pretrained` round-trip. `estimate_size`
gives the exact parameter count and stored bytes of a config by building its skeleton on the meta device
(no memory, tens of milliseconds), so the planner can reject a candidate before building it.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from search_spaces.layers import text_config
from search_spaces.structure.anatomy import (
    KV_FIELDS,
    UnsupportedArchitecture,
    depth_pruning_blocker,
    fixed_width,
    head_layout,
    head_pruning_blocker,
    intermediate_field,
    mlp_pruning_blocker,
    intermediate_size,
)
from search_spaces.specs import check_fraction

RATIO_FIELDS = ("depth_keep", "mlp_keep", "heads_keep")
# Config lists holding one entry per decoder layer, sliced with the layers kept (Gemma's sliding / full
# attention, SmolLM3's layers without rotary positions, hybrids' block kinds).
PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layers_block_type")
check_ratio = check_fraction  # a keep ratio: a fraction in (0, 1]


@dataclass(frozen=True)
class Structure:
    depth_keep: float = 1.0  # fraction of decoder layers kept
    mlp_keep: float = 1.0  # fraction of MLP neurons kept, the same in every layer
    heads_keep: float = 1.0  # fraction of key/value groups kept, each with its query heads

    def __post_init__(self) -> None:
        for name in RATIO_FIELDS:
            check_ratio(name, getattr(self, name))

    @property
    def is_identity(self) -> bool:
        return all(getattr(self, name) == 1.0 for name in RATIO_FIELDS)


def kept(total: int, ratio: float) -> int:
    """Whole units kept of `total` at `ratio`: rounded half up, at least one, at most all."""
    return max(1, min(total, math.floor(total * ratio + 0.5)))


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int | None  # None: the config names no MLP width (the architecture fixes it)


def text_config_of(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def shape_of(config) -> Shape:
    config = text_config_of(config)
    layout = head_layout(config)
    return Shape(config.num_hidden_layers, layout.heads, layout.kv_heads, layout.head_dim, intermediate_size(config))


def target_shape(config, structure: Structure) -> Shape:
    shape = shape_of(config)
    if shape.intermediate is None and structure.mlp_keep != 1.0:
        raise UnsupportedArchitecture(fixed_width(text_config_of(config)), "mlp_keep")
    groups = kept(shape.kv_heads, structure.heads_keep)
    return replace(
        shape,
        layers=kept(shape.layers, structure.depth_keep),
        heads=groups * (shape.heads // shape.kv_heads),
        kv_heads=groups,
        intermediate=shape.intermediate if shape.intermediate is None else kept(shape.intermediate,
                                                                                structure.mlp_keep),
    )


def shaped_config(config, shape: Shape, kept_layers: Sequence[int] | None = None):
    """A validated copy of `config` describing `shape`; `kept_layers` picks the per-layer entries (layer_types).

    Raises UnsupportedArchitecture (with `.field`, the keep ratio at fault) when the config cannot
    express the shape or its own validation rejects it (Llama wants the head count to divide hidden).
    """
    new = copy.deepcopy(config)
    target = text_config_of(new)
    old = shape_of(target)
    write_shape(target, shape, kept_layers)
    _validate(target, old, shape)
    return new


def write_shape(config, shape: Shape, kept_layers: Sequence[int] | None = None) -> None:
    """Write the counts of `shape` into a text config in place (unvalidated: see `shaped_config`)."""
    old = shape_of(config)
    if shape.layers != old.layers:
        _set_layers(config, old.layers, shape.layers, kept_layers)
    if (shape.heads, shape.kv_heads) != (old.heads, old.kv_heads):
        # head_dim is stated even where the config class does not declare it (Qwen2, Phi-3 read it when set);
        # whether the model honours it is `anatomy.head_count_blocker`'s question, asked before any cut
        config.num_attention_heads = shape.heads
        for name in KV_FIELDS:
            if hasattr(config, name):
                setattr(config, name, shape.kv_heads)
        config.head_dim = shape.head_dim
    if shape.intermediate != old.intermediate:
        reason = fixed_width(config)
        if reason:
            raise UnsupportedArchitecture(reason, "mlp_keep")
        setattr(config, intermediate_field(config), shape.intermediate)


def _set_layers(config, old_count: int, count: int, kept_layers: Sequence[int] | None) -> None:
    indices = list(kept_layers) if kept_layers is not None else list(range(count))
    if len(indices) != count:
        raise ValueError(f"{len(indices)} kept layers given for a {count}-layer shape")
    config.num_hidden_layers = count
    for name in PER_LAYER_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == old_count:
            setattr(config, name, [values[i] for i in indices])


def _validate(config, old: Shape, shape: Shape) -> None:
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except Exception as exc:  # noqa: BLE001 - strict-dataclass validators raise several types
        changed = [name for name, differs in (("heads_keep", shape.heads != old.heads),
                                              ("mlp_keep", shape.intermediate != old.intermediate),
                                              ("depth_keep", shape.layers != old.layers)) if differs]
        field = changed[0] if changed else None
        reason = str(exc).strip().splitlines()[-1]
        raise UnsupportedArchitecture(f"the {config.model_type} config rejects {shape}: {reason}", field) from None


def structured_config(config, structure: Structure):
    return shaped_config(config, target_shape(config, structure))


RATIO_LABELS = {"depth_keep": "depth", "mlp_keep": "mlp", "heads_keep": "heads"}


def ratio_labels(structure: Structure) -> list[str]:
    """'depth 0.8', 'mlp 0.75'... for each ratio that cuts something, for short labels."""
    return [f"{label} {getattr(structure, name):g}" for name, label in RATIO_LABELS.items()
            if getattr(structure, name) != 1.0]


@dataclass(frozen=True)
class SizeEstimate:
    parameters: int  # distinct parameters (tied embeddings counted once)
    weight_bytes: int  # as evaluators.memory.weight_bytes counts them: the state_dict, shared tensors once

    def to_dict(self) -> dict:
        return {"parameters": self.parameters, "weight_bytes": self.weight_bytes}


def estimate_size(config, like: nn.Module) -> SizeEstimate:
    """Exact size of a model of `like`'s class built from `config`, without allocating it.

    Each tensor's dtype is that of `like`'s tensor of the same name (pruned names are a subset of the
    unpruned ones), else `like`'s first floating dtype.
    """
    dtypes = {name: t.dtype for name, t in like.state_dict().items() if isinstance(t, torch.Tensor)}
    default = next((p.dtype for p in like.parameters() if p.is_floating_point()), torch.float32)
    with torch.device("meta"):
        skeleton = type(like)(copy.deepcopy(config))
    seen: set[int] = set()
    total = 0
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        dtype = dtypes.get(name, default if tensor.is_floating_point() else tensor.dtype)
        total += tensor.numel() * dtype.itemsize
    parameters = sum(p.numel() for p in skeleton.parameters())
    return SizeEstimate(parameters, total)


def cut_blocker(model: nn.Module, field: str) -> str | None:
    """Why this model cannot take any cut of `field` (None when it can): heads and MLP neurons need
    projections the surgery can slice and a config that can state the new count; depth can be cut unless
    the remaining layers depend on the count (see `anatomy.depth_pruning_blocker`)."""
    if field == "heads_keep":
        return head_pruning_blocker(model)
    if field == "mlp_keep":
        return mlp_pruning_blocker(model)
    return depth_pruning_blocker(model)


UNITS = {"depth_keep": ("decoder layer", "decoder layers"), "mlp_keep": ("MLP neuron", "MLP neurons"),
         "heads_keep": ("key/value group", "key/value groups")}


def fit_field(model: nn.Module, field: str, choices: Sequence[float]) -> tuple[tuple[float, ...], str | None]:
    """The ratios of `choices` this model can take, one per distinct resulting count (first kept), and why
    those that would cut something were left out (one line; None when none was).

    A cut is left out where the model cannot take it at all (`cut_blocker`), where its config rejects the
    count, or where the ratio rounds to keeping everything (one key/value group); if nothing is left, (1.0,).
    """
    config = text_config(model)
    blocker = cut_blocker(model, field)
    full = shape_of(config)
    fitted: dict[Shape, float] = {}
    reasons: list[str] = []
    for ratio in choices:
        try:
            if blocker and ratio != 1.0:
                raise UnsupportedArchitecture(blocker, field)
            shape = target_shape(config, Structure(**{field: ratio}))
            if shape != full:
                shaped_config(model.config, shape)
        except UnsupportedArchitecture as exc:
            reasons.append(str(exc))
            continue
        if shape not in fitted:
            fitted[shape] = ratio
        elif shape == full and ratio != 1.0:
            count = {"depth_keep": full.layers, "mlp_keep": full.intermediate, "heads_keep": full.kv_heads}[field]
            one, many = UNITS[field]
            reasons.append(f"{ratio:g} of {count} {one if count == 1 else many} rounds to all of "
                           f"{'it' if count == 1 else 'them'}: nothing to cut")
    return tuple(fitted.values()) or (1.0,), "; ".join(dict.fromkeys(reasons)) or None


def fit_choices(model: nn.Module, field: str, choices: Sequence[float]) -> tuple[float, ...]:
    """The ratios of `choices` this model can take (see `fit_field`)."""
    return fit_field(model, field, choices)[0]


def spec_config(config, structure: "Structure", spec_name: str):
    """`structured_config` for a spec: an architecture that cannot take the cut is a SpecError naming it."""
    try:
        return structured_config(config, structure)
    except UnsupportedArchitecture as exc:
        raise exc.spec_error(spec_name) from None


def off_params(space) -> dict:
    """Trial parameters of a pruning or student space's stage switched off (when the space can switch it off)."""
    return {"enabled": False} if False in space.enabled else {}


def smallest_shape(space) -> list[dict]:
    """Trial parameters of the smallest structure a pruning or student space holds: the stage on, every
    keep ratio at its least (sizes only fall with a ratio)."""
    if True not in space.enabled:
        return [{}]
    return [{"enabled": True, **{name: min(getattr(space, name)) for name in RATIO_FIELDS}}]


MAX_SHAPES = 5  # beyond this many reduced shapes, only the corners are proposed as warm starts


def reduced_shapes(space) -> list[dict]:
    """Trial parameters of the reduced shapes a space holds: every combination of its keep ratios when
    there are few, else the corners (each ratio alone at its least with every other at its largest, then all
    of them at their least). Every value is one of the space's own choices: a ratio list without 1.0 (a
    student is smaller than its teacher) has no 1.0 corner."""
    if True not in space.enabled:
        return []
    choices = {name: sorted(set(getattr(space, name)), reverse=True) for name in RATIO_FIELDS}
    combos = [dict(zip(choices, values)) for values in itertools.product(*choices.values())]
    reduced = [c for c in combos if any(v < 1.0 for v in c.values())]
    if len(reduced) > MAX_SHAPES:
        largest = {name: values[0] for name, values in choices.items()}
        least = {name: values[-1] for name, values in choices.items()}
        singles = [{**largest, name: least[name]} for name in choices if least[name] < largest[name]]
        reduced = [shape for i, shape in enumerate(singles + [least]) if shape not in (singles + [least])[:i]]
    on = {"enabled": True} if len(space.enabled) > 1 else {}
    return [{**on, **{name: value for name, value in shape.items() if len(choices[name]) > 1}} for shape in reduced]
