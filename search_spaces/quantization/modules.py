"""rtn/GPTQ layers in a built candidate: evaluated in float, sized and exported as stored.

A quantized layer keeps its own class and forward (nn.Linear, GPT-2's Conv1D, a model's own embedding
subclass...) with its weight replaced by the float values the checkpoint decodes to; its class gains the
`StoredWeights` mixin, which holds the packed tensors (non-persistent buffers) and implements
evaluators.memory's ``stored_weight_bytes`` hook from them. The export writes `stored_tensors()` as is.
"""
from __future__ import annotations

import torch
from torch import nn

from search_spaces.layers import is_transposed, text_config, weight_out_in
from search_spaces.quantization.grid import QuantizedWeight, round_to_nearest
from search_spaces.quantization.grid import StorageGrid
from search_spaces.quantization.pack import float_stored, half_dtype, pack, tensors_bytes
from search_spaces.quantization.plan import LayerPlan
from search_spaces.quantization.spec import FLOAT_BITS

PACKED, FLOAT, SHARED = "packed", "float", "shared"
BUFFER_PREFIX = "stored_"


class StoredWeights:
    """Mixin: the layer's checkpoint tensors, and their exact size for evaluators.memory."""

    stored_kind: str  # PACKED (integer grid), FLOAT (16-bit float) or SHARED (tied head: weight stored elsewhere)
    stored_format: StorageGrid
    stored_names: tuple[str, ...] = ()

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        if self.stored_kind == PACKED:
            tensors = {name: getattr(self, BUFFER_PREFIX + name) for name in self.stored_names}
        elif self.stored_kind == FLOAT:
            tensors = float_stored(self.weight)
        else:
            tensors = {}
        bias = getattr(self, "bias", None)
        if isinstance(bias, torch.Tensor):
            tensors["bias"] = bias.detach()
        return tensors

    def stored_weight_bytes(self) -> int:
        return tensors_bytes(self.stored_tensors())


_STORED_CLASSES: dict[type, type] = {}


def _stored_class(base: type) -> type:
    """`base` with the StoredWeights mixin; registered in this module so models still pickle."""
    if base not in _STORED_CLASSES:
        name = f"Stored{base.__name__}"
        while name in globals():
            name += "_"
        cls = type(name, (StoredWeights, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        _STORED_CLASSES[base] = cls
    return _STORED_CLASSES[base]


def _mark(module: nn.Module, kind: str, fmt: StorageGrid, stored: dict[str, torch.Tensor] | None = None) -> None:
    if isinstance(module, StoredWeights):
        raise ValueError(f"{type(module).__name__} is already quantized; build candidates from the float model")
    module.__class__ = _stored_class(type(module))
    module.stored_kind = kind
    module.stored_format = fmt
    module.stored_names = tuple(stored or ())
    for name, tensor in (stored or {}).items():
        module.register_buffer(BUFFER_PREFIX + name, tensor, persistent=False)


@torch.no_grad()
def install_quantized(module: nn.Module, quantized: QuantizedWeight) -> None:
    """Give the layer the weights `quantized` decodes to, and keep its packed tensors."""
    stored = pack(quantized)
    weight = quantized.dequantize().to(module.weight.dtype)
    module.weight.data = (weight.t() if is_transposed(module) else weight).contiguous()
    _mark(module, PACKED, quantized.fmt, stored)


@torch.no_grad()
def install_float(module: nn.Module) -> None:
    """Store the layer at 16 bits: its float weight is rounded to what the 16-bit copy holds."""
    weight = module.weight
    weight.data = weight.data.to(half_dtype(weight.dtype)).to(weight.dtype)
    _mark(module, FLOAT, StorageGrid(FLOAT_BITS))


def install_layer(module: nn.Module, plan: LayerPlan, quantized: QuantizedWeight | None = None) -> None:
    """Build one planned layer: rounded to nearest unless `quantized` (e.g. from GPTQ) is given."""
    if plan.shared_with is not None:
        _mark(module, SHARED, StorageGrid(FLOAT_BITS))
    elif plan.fmt.is_float:
        install_float(module)
    else:
        if quantized is None:
            quantized = round_to_nearest(weight_out_in(module), plan.fmt, module.weight.dtype)
        install_quantized(module, quantized)


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own copy of the tied matrix, and record it so nothing re-ties them."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, text_config(model))}.values():
        config.tie_word_embeddings = False
