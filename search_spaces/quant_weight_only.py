"""Building rtn and GPTQ candidates: integer weight-only quantization, evaluated in float."""
from __future__ import annotations

from torch import nn

from search_spaces.base import BuildContext
from search_spaces.calibration import calibration_batches
from search_spaces.gptq import gptq_build
from search_spaces.quant_modules import install_layer, untie_head
from search_spaces.quant_plan import plan_layers
from search_spaces.quant_spec import GPTQ, QuantSpec


def build_weight_only(model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
    """Quantize `model` in place: decoder layers by GPTQ (method gptq) or rounding; head and embedding
    by rounding (GPTQ's error compensation is for the decoder's linear layers)."""
    plan = plan_layers(model, spec)
    if plan.untie_head:
        untie_head(model)
    modules = dict(model.named_modules())
    in_blocks = [p for p in plan.layers if p.layer is not None]
    if spec.method == GPTQ and any(p.quantized for p in in_blocks):
        ids = calibration_batches(context.tokenizer, context.calibration, spec.gptq.samples, spec.gptq.seq_len,
                                  context.seed)
        gptq_build(model, in_blocks, spec.gptq, ids, progress=context.progress)
        rest = [p for p in plan.layers if p.layer is None]
    else:
        rest = list(plan.layers)
    for layer in rest:
        install_layer(modules[layer.name], layer)
    return model
