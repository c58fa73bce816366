"""Methods that round weights onto a storage grid (rtn, gptq): integer codes packed as the checkpoint stores
them, evaluated in float with exactly the weights the packed checkpoint decodes to.

The grid of each layer (bits, effective group size, symmetric or offset, scale dtype) comes from the layer
plan (`plan.plan_layers`) and its storage scheme; a grid method only decides how the codes are chosen
(`round_decoder` for what needs the whole model, `round_layer` for one weight at a time). It rounds onto every
registered scheme unless it names some (`QuantMethod.schemes`).
"""
from __future__ import annotations

import torch
from torch import nn

from search_spaces.base import BuildContext, Params
from search_spaces.layers import weight_out_in
from search_spaces.quantization.constants import FLOAT_BITS
from search_spaces.quantization.export import COMPRESSED_TENSORS
from search_spaces.quantization.grid import QuantizedWeight, StorageGrid, round_to_nearest
from search_spaces.quantization.methods.base import QuantMethod, scheme_bits
from search_spaces.quantization.modules import install_layer, untie_head
from search_spaces.quantization.pack import layout_bytes, stored_layout
from search_spaces.quantization.plan import LayerPlan, plan_layers
from search_spaces.quantization.spec import GPTQSettings, QuantSpace, QuantSpec


def _group_bits_params(space: QuantSpace) -> tuple[str, ...]:
    """Names of the attn and mlp bits parameters: one each, or one shared when the space is not mixed."""
    return ("attn_bits", "mlp_bits") if space.mixed else ("bits", "bits")


class GridMethod(QuantMethod):
    grid = True
    sets_head = True
    checkpoint = COMPRESSED_TENSORS
    preset_bits: tuple[int, ...] = ()  # one bit-width everywhere, as a user would try it by hand

    @property
    def bits(self) -> tuple[int, ...]:
        """Whatever a registered scheme holds: a spec's bits are checked against its own scheme (`bits_on`)."""
        return scheme_bits()

    def settings(self, space: QuantSpace) -> GPTQSettings:
        """The algorithm's own settings for a candidate of `space` (default: none besides the grid)."""
        return GPTQSettings()

    def round_decoder(self, model: nn.Module, layers: list[LayerPlan], spec: QuantSpec,
                      context: BuildContext) -> list[LayerPlan]:
        """Quantize what this algorithm handles itself; returns the layers left for plain rounding."""
        return layers

    def round_layer(self, weight: torch.Tensor, fmt: StorageGrid, scale_dtype: torch.dtype) -> QuantizedWeight:
        """Codes of one (out, in) weight on `fmt`, for the layers `round_decoder` leaves (default: nearest)."""
        return round_to_nearest(weight, fmt, scale_dtype)

    def build(self, model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
        """Quantize `model` in place: the decoder layers by the algorithm, the rest (head, embedding, and
        anything the algorithm leaves) by rounding to nearest."""
        plan = plan_layers(model, spec)
        if plan.untie_head:
            untie_head(model)
        modules = dict(model.named_modules())
        in_blocks = [p for p in plan.layers if p.layer is not None]
        left = self.round_decoder(model, in_blocks, spec, context)
        for layer in left + [p for p in plan.layers if p.layer is None]:
            module = modules[layer.name]
            rounded = None if not layer.quantized else self.round_layer(weight_out_in(module), layer.fmt,
                                                                        module.weight.dtype)
            install_layer(module, layer, rounded)
        return model

    def suggest(self, trial, space: QuantSpace, choose) -> QuantSpec:
        bits = {group: choose(trial, self.param(name), space.bits)
                for group, name in zip(("attn", "mlp"), _group_bits_params(space))}
        if space.head_bits:
            head = choose(trial, self.param("head_bits"), space.head_bits)
            if head is not None:
                bits["head"] = head
        defaults = QuantSpec()
        if any(b < FLOAT_BITS for b in bits.values()):  # the grid settings matter only when something is quantized
            group_size = choose(trial, self.param("group_size"), space.group_sizes)
            symmetric = choose(trial, self.param("symmetric"), space.symmetric)
        else:
            group_size, symmetric = defaults.group_size, defaults.symmetric
        return QuantSpec(method=self.name, bits=bits, group_size=group_size, symmetric=symmetric,
                         gptq=self.settings(space), grid=space.grid)

    def _everywhere(self, space: QuantSpace, bits: int) -> Params:
        return {self.param(n): bits for n in _group_bits_params(space)}

    def presets(self, space: QuantSpace) -> list[Params]:
        return [self._everywhere(space, bits) for bits in self.preset_bits if bits in space.bits]

    def shape_presets(self, space: QuantSpace) -> list[Params]:
        """4 bits on a reduced shape, the head too when the space can store it so: the compact, fast end, which
        is what a shape is cut for (a 16-bit head is a third of a 4-bit model's decode work in llama.cpp)."""
        if 4 not in space.bits:
            return []
        head = {self.param("head_bits"): 4} if 4 in (space.head_bits or ()) else {}
        return [{**self._everywhere(space, 4), **head}]

    def smallest(self, space: QuantSpace) -> list[Params]:
        """Least bits, symmetric grids (no zero points); head bits and group sizes all listed: which is smallest
        depends on the model (a quantized head unties the embedding; a grid's scales depend on the widths)."""
        base = {**self._everywhere(space, min(space.bits)), self.param("symmetric"): True in space.symmetric}
        return [{**base, self.param("head_bits"): head, self.param("group_size"): group_size}
                for head in space.head_bits or (None,) for group_size in space.group_sizes]

    def layer_bytes(self, plan: LayerPlan, spec: QuantSpec, device) -> int:
        if plan.shared_with is not None:  # a tied head: its weight is stored (and counted) with the embedding
            return plan.bias_bytes
        return layout_bytes(stored_layout(plan.out_features, plan.in_features, plan.fmt, plan.dtype)) + plan.bias_bytes

    def quantized_layers(self, layers, spec, device) -> list[LayerPlan]:
        return list(layers)  # every planned layer is stored anew (16-bit ones as half floats)

    def export_blocker(self, model: nn.Module, spec: QuantSpec) -> str | None:
        packed = [p for p in plan_layers(model, spec).layers if p.quantized]
        conv1d = next((p.name for p in packed if p.transposed), None)
        if conv1d is not None:
            return (f"{conv1d} is a GPT-2 style Conv1D layer: compressed-tensors checkpoints can only hold quantized "
                    "nn.Linear layers (keep such layers at 16 bits)")
        formats = {p.fmt for p in packed}
        if len(formats) > 1 and any(not f.symmetric for f in formats):
            found = ", ".join(sorted(f"{f.bits}-bit/{f.group_size or 'channel'}" for f in formats))
            return (f"asymmetric layers in several formats ({found}): transformers can load an asymmetric "
                    "pack-quantized checkpoint only when all its quantized layers share one format")
        return None
