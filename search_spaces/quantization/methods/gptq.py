"""gptq: error-compensating rounding onto the layer's storage grid, on calibration text from the training
split (the algorithm is in `quantization/gptq_solver.py`). Head and embedding are rounded to nearest:
GPTQ's error compensation is for the decoder's linear layers."""
from __future__ import annotations

from torch import nn

from search_spaces.base import BuildContext
from search_spaces.calibration import calibration_batches
from search_spaces.quantization.gptq_solver import gptq_build
from search_spaces.quantization.methods.base import register_method
from search_spaces.quantization.methods.weight_only import GridMethod
from search_spaces.quantization.plan import LayerPlan
from search_spaces.quantization.spec import GPTQSettings, QuantSpace, QuantSpec


class GPTQ(GridMethod):
    name = "gptq"
    preset_bits = (4,)

    def settings(self, space: QuantSpace) -> GPTQSettings:
        return space.gptq

    def round_decoder(self, model: nn.Module, layers: list[LayerPlan], spec: QuantSpec,
                      context: BuildContext) -> list[LayerPlan]:
        if not any(p.quantized for p in layers):
            return layers
        ids = calibration_batches(context.tokenizer, context.calibration, spec.gptq.samples, spec.gptq.seq_len,
                                  context.seed)
        gptq_build(model, layers, spec.gptq, ids, progress=context.progress)
        return []


register_method(GPTQ())
