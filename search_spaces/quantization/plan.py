"""Which layer of a model gets which storage format under a spec: the one place groups, overrides,
group-size fallbacks and tied embeddings are resolved. Reads shapes only, so it works on a model
built on the meta device (the cheap estimate) as well as on the real one (apply, export).

The vocabulary group (``bits["head"]``) covers the LM head and the input embedding:
- the input embedding is stored at 16 bits (transformers cannot load a pack-quantized nn.Embedding:
  its weight initialisation fails on the missing ``weight``, checked with transformers 5.23);
- head at 16 on a tied model: the shared matrix is stored once, at 16 bits, and stays tied;
- head below 16 on a tied model: the head is untied and quantized on its own copy, the embedding
  keeps the original matrix at 16 bits (both are counted; on small models this rarely pays, and the
  measured memory says so).
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from search_spaces.specs import SpecError
from search_spaces.layers import head_is_tied, is_transposed, linear_sites, weight_out_in
from search_spaces.quantization.constants import FLOAT_BITS
from search_spaces.quantization.schemes import StorageGrid
from search_spaces.quantization.spec import QuantSpec


@dataclass(frozen=True)
class LayerPlan:
    name: str  # qualified module name
    group: str  # "attn" | "mlp" | "head" | "embed"
    layer: int | None  # decoder layer index (None for head and embedding)
    fmt: StorageGrid
    out_features: int
    in_features: int
    bias_bytes: int  # the bias is stored as is
    dtype: torch.dtype  # the weight's float dtype
    transposed: bool = False  # GPT-2 Conv1D: weight held as (in, out)
    shared_with: str | None = None  # tied head: its weight is the one stored by this (embedding) module
    width_fallback: bool = False  # asked for an integer grid, stored in float: the grid's blocks do not fit its width

    @property
    def quantized(self) -> bool:
        return not self.fmt.is_float


@dataclass(frozen=True)
class QuantPlan:
    layers: tuple[LayerPlan, ...]
    untie_head: bool = False  # a tied head gets its own (quantized) copy of the matrix

    def by_name(self) -> dict[str, LayerPlan]:
        return {p.name: p for p in self.layers}


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _plan(name: str, group: str, layer: int | None, module: nn.Module, fmt: StorageGrid, **extra) -> LayerPlan:
    weight = module.weight if isinstance(module, nn.Embedding) else weight_out_in(module)
    bias = getattr(module, "bias", None)
    return LayerPlan(name, group, layer, fmt, weight.shape[0], weight.shape[1],
                     0 if bias is None else bias.numel() * bias.element_size(), weight.dtype,
                     is_transposed(module), **extra)


def _format(spec: QuantSpec, bits: int, in_features: int) -> StorageGrid:
    if bits >= FLOAT_BITS:
        return StorageGrid(FLOAT_BITS)
    if not spec.quant_method.grid:  # library methods (bnb, dynamic-int8) choose their own blocks and scales
        return StorageGrid(bits)
    # The scheme fits the group size to the width, or stores the layer in float (the storage notes say which).
    return spec.storage_scheme.layer_grid(bits, in_features, spec.group_size, spec.symmetric)


class _Overrides:
    """First-match-wins lookup of per-layer bits by glob; remembers which overrides matched."""

    def __init__(self, spec: QuantSpec):
        self.overrides = spec.overrides
        self.matched = [False] * len(self.overrides)

    def bits(self, name: str) -> int | None:
        for index, override in enumerate(self.overrides):
            if fnmatchcase(name, override.pattern):
                self.matched[index] = True
                return override.bits
        return None

    def check_all_matched(self, model: nn.Module) -> None:
        for index, matched in enumerate(self.matched):
            if not matched:
                raise SpecError(f"QuantSpec.overrides[{index}].pattern: {self.overrides[index].pattern!r} matches "
                                f"no linear layer of {type(model).__name__} (names look like "
                                f"{linear_sites(model)[0].name!r})")


def plan_layers(model: nn.Module, spec: QuantSpec) -> QuantPlan:
    overrides = _Overrides(spec)
    layers: list[LayerPlan] = []
    head_site, head_bits = None, None
    for site in linear_sites(model):
        bits = overrides.bits(site.name)
        if bits is None:
            bits = spec.bits.get(site.group)
        if bits is None:
            continue  # no head setting: the LM head and the embedding are left untouched
        if site.group == "head":
            head_site, head_bits = site, bits
            continue
        in_features = weight_out_in(site.module).shape[1]
        fmt = _format(spec, bits, in_features)
        layers.append(_plan(site.name, site.group, site.layer, site.module, fmt,
                            width_fallback=bits < FLOAT_BITS and fmt.is_float))
    overrides.check_all_matched(model)
    if "head" in spec.bits and head_site is None:
        raise SpecError(f"QuantSpec.bits.head: {type(model).__name__} has no separate linear LM head")
    if head_site is None:
        return QuantPlan(tuple(layers))
    if not spec.quant_method.sets_head:
        raise SpecError(f"QuantSpec.overrides: {head_site.name} is the LM head, which {spec.method} leaves alone")
    embedding = model.get_input_embeddings()
    embed_name = _module_name(model, embedding)
    layers.append(_plan(embed_name, "embed", None, embedding, StorageGrid(FLOAT_BITS)))
    tied = head_is_tied(model)
    head_in = weight_out_in(head_site.module).shape[1]
    shared = embed_name if tied and head_bits >= FLOAT_BITS else None
    head_fmt = _format(spec, head_bits, head_in)
    layers.append(_plan(head_site.name, "head", None, head_site.module, head_fmt, shared_with=shared,
                        width_fallback=head_bits < FLOAT_BITS and head_fmt.is_float))
    return QuantPlan(tuple(layers), untie_head=tied and shared is None)
