"""Numbers every part of quantization shares (specs, grids, storage schemes, methods); imports nothing, so any
module may import it."""
from __future__ import annotations

FLOAT_BITS = 16  # "not quantized": the layer is stored as a 16-bit float
GROUP_SIZES = (32, 64, 128, None)  # group sizes a spec may ask for; None: one scale per output channel
MIN_GROUP_SIZE = 32  # a requested group size is halved down to this one, no further, to fit a layer's width
DEFAULT_GRID = "compressed-tensors"  # the storage scheme of a spec that names none (transformers, vLLM)
