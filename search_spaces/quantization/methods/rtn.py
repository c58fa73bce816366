"""rtn: group-wise round to nearest on the layer's storage grid (no calibration, seconds)."""
from __future__ import annotations

from search_spaces.quantization.methods.base import register_method
from search_spaces.quantization.methods.weight_only import GridMethod


class RoundToNearest(GridMethod):
    name = "rtn"
    preset_bits = (8, 4)


register_method(RoundToNearest())
