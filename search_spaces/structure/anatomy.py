"""Which linear layers of a decoder block carry attention heads and MLP neurons, and which config fields count them.

Found from module types, shapes and the config, not from one model's attribute names: in a block's
attention group (see `layers.linear_sites`) the output projection is the last linear mapping
heads x head_dim features back to the hidden size, and every other linear must produce query heads
(heads x head_dim rows), key/value heads (kv_heads x head_dim rows) or all three packed as [q; k; v]
(Phi-3's `qkv_proj`). In the MLP group the output projection is the one linear that maps back to the
hidden size; its input width is the intermediate size, and every other MLP linear must produce that many
neurons, or a whole multiple of it: a fused [gate; up] projection (Phi-3, GLM-4) holding each part's
neurons as one block of rows. Shapes alone cannot tell a contiguous packing from one interleaved per head
(GPT-NeoX's `query_key_value` is [heads, 3, head_dim]), so `fused_layout_blocker` checks the layout on a
forward pass before any fused projection is sliced. Anything else (mixtures of experts, cross-attention)
is reported as unsupported instead of being guessed at.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from search_spaces.specs import SpecError
from search_spaces.layers import decoder_layers, linear_sites, text_config, weight_out_in

# Config fields naming the MLP width, with the multiple of the hidden size a None value stands for
# (GPT-2's n_inner=None means 4 x n_embd).
INTERMEDIATE_FIELDS = {"intermediate_size": None, "n_inner": 4, "ffn_dim": None}


class UnsupportedArchitecture(ValueError):
    """The model cannot take a structured surgery; the message says what was found, `field` names the keep
    ratio at fault (depth_keep, mlp_keep, heads_keep) when one is."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def spec_error(self, spec_name: str) -> SpecError:
        """The same complaint as a SpecError naming the spec field at fault."""
        return SpecError(f"{spec_name}.{self.field}: {self}" if self.field else f"{spec_name}: {self}")


@dataclass(frozen=True)
class Projection:
    name: str  # qualified module name, for replacing it
    module: nn.Module
    parts: int = 1  # a fused MLP input ([gate; up]) stacks this many blocks of rows, one per part

    def rows(self, neurons: torch.Tensor, width: int) -> torch.Tensor:
        """The rows holding `neurons` in every part (each part keeps the same neurons)."""
        return torch.cat([neurons + part * width for part in range(self.parts)])

    @property
    def out_features(self) -> int:
        return weight_out_in(self.module).shape[0]

    @property
    def in_features(self) -> int:
        return weight_out_in(self.module).shape[1]


@dataclass(frozen=True)
class HeadLayout:
    heads: int  # query heads
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads sharing one key/value head (grouped-query attention)."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class AttentionParts:
    owner: nn.Module  # the attention module (some cache head counts as attributes)
    queries: tuple[Projection, ...]  # rows are query heads
    key_values: tuple[Projection, ...]  # rows are key/value heads
    output: Projection  # columns are query heads
    packed: tuple[Projection, ...] = ()  # rows are [q; k; v], each contiguous (Phi-3's qkv_proj)


@dataclass(frozen=True)
class MlpParts:
    owner: nn.Module
    inputs: tuple[Projection, ...]  # rows are neurons (up, gate / c_fc)
    output: Projection  # columns are neurons (down / c_proj)

    @property
    def width(self) -> int:
        return self.output.in_features


def hidden_size(model: nn.Module) -> int:
    return text_config(model).hidden_size


def head_layout(config) -> HeadLayout:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadLayout(heads, kv_heads, head_dim)


def intermediate_field(config) -> str:
    for name in INTERMEDIATE_FIELDS:
        if hasattr(config, name):
            return name
    raise UnsupportedArchitecture(f"{type(config).__name__} names no MLP width ({', '.join(INTERMEDIATE_FIELDS)})")


def intermediate_size(config) -> int:
    name = intermediate_field(config)
    value = getattr(config, name)
    if value is None:
        multiple = INTERMEDIATE_FIELDS[name]
        if multiple is None:
            raise UnsupportedArchitecture(f"{type(config).__name__}.{name} is not set")
        return multiple * config.hidden_size
    return value


def _owner(model: nn.Module, projections: list[Projection]) -> nn.Module:
    """The innermost module holding all the projections (their longest common name prefix)."""
    parts = [p.name.split(".")[:-1] for p in projections]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return model.get_submodule(".".join(common))


def _layer_sites(model: nn.Module, layer: int, group: str) -> list[Projection]:
    return [Projection(s.name, s.module) for s in linear_sites(model, include_head=False)
            if s.layer == layer and s.group == group]


def attention_parts(model: nn.Module, layer: int) -> AttentionParts:
    layout = head_layout(text_config(model))
    hidden = hidden_size(model)
    sites = _layer_sites(model, layer, "attn")
    q_width, kv_width = layout.heads * layout.head_dim, layout.kv_heads * layout.head_dim
    outputs = [p for p in sites if p.out_features == hidden and p.in_features == q_width]
    if not outputs:
        raise UnsupportedArchitecture(f"layer {layer}: no attention output projection ({q_width} -> {hidden})")
    output = outputs[-1]  # registered last; in plain multi-head attention q is hidden -> hidden as well
    queries, key_values, packed = [], [], []
    for p in sites:
        if p is output:
            continue
        if p.in_features == hidden and p.out_features == q_width:
            queries.append(p)
        elif p.in_features == hidden and p.out_features == kv_width:
            key_values.append(p)
        elif p.in_features == hidden and p.out_features == q_width + 2 * kv_width:
            packed.append(p)  # taken as [q; k; v]: fused_layout_blocker checks that before any cut
        else:
            raise UnsupportedArchitecture(
                f"layer {layer}: cannot tell which heads {p.name} ({p.in_features} -> {p.out_features}) "
                f"projects (cross-attention?)"
            )
    if not (queries or packed) or (not (key_values or packed) and layout.kv_heads != layout.heads):
        raise UnsupportedArchitecture(f"layer {layer}: no query and key/value projections")
    return AttentionParts(_owner(model, sites), tuple(queries), tuple(key_values), output, tuple(packed))


def mlp_parts(model: nn.Module, layer: int) -> MlpParts:
    hidden = hidden_size(model)
    sites = _layer_sites(model, layer, "mlp")
    outputs = [p for p in sites if p.out_features == hidden]
    if not outputs:
        raise UnsupportedArchitecture(f"layer {layer}: no MLP output projection (-> {hidden})")
    output = outputs[-1]  # registered last; an input maps hidden -> hidden too once the width is the hidden size
    width = output.in_features
    inputs = [Projection(p.name, p.module, p.out_features // width) for p in sites
              if p is not output and p.in_features == hidden and p.out_features % width == 0]
    if len(inputs) + 1 != len(sites) or not inputs:
        raise UnsupportedArchitecture(f"layer {layer}: MLP is not input projections feeding one output projection "
                                      f"(experts?)")
    return MlpParts(_owner(model, sites), tuple(inputs), output)


def derived_head_width(config) -> str | None:
    """Why this config cannot describe fewer heads of the same width (None when it can)."""
    if getattr(config, "head_dim", None) is None:
        return f"{config.model_type} derives the head width from hidden size / heads, so fewer heads cannot be saved"
    return None


def mlp_pruning_blocker(model: nn.Module) -> str | None:
    """Why MLP neurons cannot be removed from this model (None when they can): every decoder layer's MLP must
    be input projections (fused ones contiguous) feeding one output projection."""
    return _first_refusal(model, mlp_parts) or fused_layout_blocker(model, "mlp")


def _first_refusal(model: nn.Module, parts) -> str | None:
    """The first decoder layer's reason `parts(model, layer)` cannot find what a cut slices (None: none)."""
    for layer in range(len(decoder_layers(model)[1])):
        try:
            parts(model, layer)
        except UnsupportedArchitecture as exc:
            return str(exc)
    return None


def head_pruning_blocker(model: nn.Module) -> str | None:
    """Why whole heads cannot be removed from this model (None when they can).

    The config must state head_dim on its own: where it is derived as hidden / heads (GPT-2), a config
    with fewer heads describes wider heads, not fewer, and the saved model would not reload.
    """
    return (derived_head_width(text_config(model)) or _first_refusal(model, attention_parts)
            or fused_layout_blocker(model, "attn"))


class _Stop(Exception):
    """Ends the probe's forward pass once every output projection has been read."""


def _fused(model: nn.Module, group: str) -> list[tuple[int, Projection, slice, Projection]]:
    """(layer, fused projection, the rows its last parts take, the output projection reading them)."""
    layout, found = head_layout(text_config(model)), []
    v_rows = slice(-layout.kv_heads * layout.head_dim, None)  # the last block of [q; k; v]
    for layer in range(len(decoder_layers(model)[1])):
        if group == "attn":
            parts = attention_parts(model, layer)
            found += [(layer, p, v_rows, parts.output) for p in parts.packed]
        else:
            parts = mlp_parts(model, layer)
            found += [(layer, p, slice(parts.width, None), parts.output) for p in parts.inputs if p.parts > 1]
    return found


def fused_layout_blocker(model: nn.Module, group: str) -> str | None:
    """Why a fused projection of `group` ("attn", "mlp") is not laid out as the contiguous blocks the surgery
    slices (None when it is, or there is none).

    One forward pass with the rows the contiguous layout gives to v (or to every MLP part but the first, up
    in [gate; up]) zeroed: the output projection must then read exact zeros, since heads with v = 0 output 0
    and neurons with up = 0 do too. A layout interleaved per head or per neuron leaves others' values in
    place and is refused. (q before k is assumed: with v placed, only their order could still differ.)
    """
    fused = _fused(model, group)
    if not fused:
        return None
    outputs = {o.name: o for *_, o in fused}
    read: dict[str, bool] = {}  # output projection -> whether it read only zeros

    def zero_rows(rows):
        def hook(module, args, output):
            output = output.clone()
            output[..., rows] = 0
            return output
        return hook

    def reader(name):
        def hook(module, args):
            read[name] = not args[0].detach().any()
            if len(read) == len(outputs):
                raise _Stop
        return hook

    handles = [p.module.register_forward_hook(zero_rows(rows)) for _, p, rows, _ in fused]
    handles += [o.module.register_forward_pre_hook(reader(name)) for name, o in outputs.items()]
    ids = torch.arange(4, device=model.get_input_embeddings().weight.device)[None]
    try:
        with torch.no_grad():
            getattr(model, "base_model", model)(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    except Exception as exc:  # noqa: BLE001 - any failure leaves the layout unproven
        reason = str(exc).strip().partition("\n")[0] or type(exc).__name__
        return f"cannot check how {fused[0][1].name} packs its parts: {reason}"
    finally:
        for handle in handles:
            handle.remove()
    for layer, projection, _, output in fused:
        if not read.get(output.name):
            return (f"layer {layer}: {projection.name} does not hold its parts as contiguous blocks "
                    f"(interleaved?), so it cannot be sliced")
    return None
