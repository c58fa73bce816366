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

import copy
from dataclasses import dataclass

import torch
from torch import nn

from search_spaces.specs import SpecError
from search_spaces.layers import decoder_layers, is_linear, linear_sites, text_config, weight_out_in

# Config fields naming the MLP width, with the multiple of the hidden size a None value stands for
# (GPT-2's n_inner=None means 4 x n_embd; Falcon's ffn_hidden_size=None too). A config naming none of them
# (Bloom, MPT: their MLP is 4 x hidden, fixed in code) has a width no config can change.
INTERMEDIATE_FIELDS = {"intermediate_size": None, "n_inner": 4, "ffn_dim": None, "ffn_hidden_size": 4}
KV_FIELDS = ("num_key_value_heads", "num_kv_heads")  # config fields counting key/value heads (Falcon's: the 2nd)
SCALED_BY_LAYER = "attention is scaled by 1 / layer index (GPT-2 option), so dropping layers would change the others"


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
    kv_heads = next((count for count in (getattr(config, name, None) for name in KV_FIELDS) if count), heads)
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv_heads = 1  # multi-query attention (Falcon-7B, GPT-BigCode): one key/value head, whatever the count
        # field says (Falcon's new_decoder_architecture ignores multi_query: Falcon-specific, no general flag)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadLayout(heads, kv_heads, head_dim)


def intermediate_field(config) -> str | None:
    """The config field naming the MLP width; None when the config names none (the architecture fixes it)."""
    return next((name for name in INTERMEDIATE_FIELDS if hasattr(config, name)), None)


def fixed_width(config) -> str | None:
    """Why this config cannot describe a narrower MLP because it names no MLP width (None when it names one)."""
    if intermediate_field(config) is None:
        return (f"{type(config).__name__} names no MLP width ({', '.join(INTERMEDIATE_FIELDS)}): the architecture "
                f"fixes it, so a narrower MLP could not be saved")
    return None


def intermediate_size(config) -> int | None:
    """The MLP width the config states, None when it names none (see `fixed_width`)."""
    name = intermediate_field(config)
    if name is None:
        return None
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


def derived_head_width(config) -> str:
    """The refusal for a model that computes its head width as hidden / heads."""
    return f"{config.model_type} derives the head width from hidden size / heads, so fewer heads cannot be saved"


def head_count_blocker(model: nn.Module) -> str | None:
    """Why a config with fewer heads would not describe what `surgery.prune_heads` leaves (None when it would).

    Proven on the meta device (no memory, no weights): the model's class built from its config with one
    key/value group left, head_dim stated, must differ from the model only in the head rows / columns of the
    attention projections the surgery slices. Where the head width is computed as hidden / heads (GPT-2,
    GPT-NeoX, StableLM) that config builds wider heads instead; where something else is sized by the head
    count (a per-head norm or scale) the surgery would leave it behind. Both are refused. Configs that do not
    declare head_dim (Qwen2, Phi-3...) pass where the model reads `config.head_dim` when it is set.
    """
    config = text_config(model)
    layout = head_layout(config)
    if layout.kv_heads < 2:
        return None  # no group can go (fitting says why)
    probe = copy.deepcopy(model.config)
    target = probe.get_text_config() if hasattr(probe, "get_text_config") else probe
    try:
        target.num_attention_heads = layout.group_size
        for name in KV_FIELDS:
            if hasattr(target, name):
                setattr(target, name, 1)
        target.head_dim = layout.head_dim
        with torch.device("meta"):
            skeleton = type(model)(probe)
    except Exception as exc:  # noqa: BLE001 - any failure means no such config describes the cut
        reason = str(exc).strip().partition("\n")[0] or type(exc).__name__
        return f"{config.model_type} cannot be built with fewer heads: {reason}"
    q_width, kv_width = layout.group_size * layout.head_dim, layout.head_dim
    expected: dict[str, tuple[int, int]] = {}  # sliced projection -> its (out, in) after the cut
    for layer in range(len(decoder_layers(model)[1])):
        parts = attention_parts(model, layer)
        expected.update({p.name: (q_width, p.in_features) for p in parts.queries})
        expected.update({p.name: (kv_width, p.in_features) for p in parts.key_values})
        expected.update({p.name: (q_width + 2 * kv_width, p.in_features) for p in parts.packed})
        expected[parts.output.name] = (parts.output.out_features, q_width)
    modules = dict(skeleton.named_modules())
    for name, rows_cols in expected.items():
        module = modules.get(name)
        if module is None or not is_linear(module) or tuple(weight_out_in(module).shape) != rows_cols:
            return derived_head_width(config)
    sliced = {f"{name}.{kind}" for name in expected for kind in ("weight", "bias")}

    def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:  # buffers too: rotary tables are not saved
        tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        return {k: tuple(v.shape) for k, v in tensors if k not in sliced}

    now, cut = shapes(model), shapes(skeleton)
    for name in sorted(set(now) | set(cut)):
        if now.get(name) != cut.get(name):
            return (f"with fewer heads {config.model_type} sizes {name} as {cut.get(name)} (now {now.get(name)}), "
                    f"which the surgery does not cut")
    return None


def mlp_pruning_blocker(model: nn.Module) -> str | None:
    """Why MLP neurons cannot be removed from this model (None when they can): the config must name the MLP
    width, and every decoder layer's MLP must be input projections (fused ones contiguous) feeding one output
    projection."""
    return (fixed_width(text_config(model)) or _first_refusal(model, mlp_parts)
            or fused_layout_blocker(model, "mlp"))


def depth_pruning_blocker(model: nn.Module) -> str | None:
    """Why whole decoder layers cannot be dropped from this model (None when they can)."""
    if getattr(text_config(model), "scale_attn_by_inverse_layer_idx", False):
        return SCALED_BY_LAYER
    return None


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

    The model must read the head width from its config's head_dim (see `head_count_blocker`): where it is
    derived as hidden / heads (GPT-2), a config with fewer heads describes wider heads, not fewer, and the
    saved model would not reload.
    """
    return (_first_refusal(model, attention_parts) or head_count_blocker(model)
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
