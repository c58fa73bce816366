"""A rounding method: round to nearest after clipping each row to 2.5 standard deviations (a finer grid for
most weights), on the toy grid and compressed-tensors' (not gguf's)."""
from __future__ import annotations

from search_spaces.quantization.grid import round_to_nearest
from search_spaces.quantization.methods import register_method
from search_spaces.quantization.methods.weight_only import GridMethod

CLIP = 2.5  # standard deviations of the row


class ClippedRTN(GridMethod):
    name = "toy-clipped"
    schemes = ("toy-int6", "compressed-tensors")
    preset_bits = (4,)  # a study tries it by hand at 4 bits everywhere, where the space holds 4 bits

    def round_layer(self, weight, fmt, scale_dtype):
        limit = CLIP * weight.float().std(dim=1, keepdim=True)
        return round_to_nearest(weight.float().clamp(-limit, limit), fmt, scale_dtype)


CLIPPED = register_method(ClippedRTN())
