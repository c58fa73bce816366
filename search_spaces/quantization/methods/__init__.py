"""Quantization methods, one module each; importing this package registers them in this order (which is
also the order of their hand-picked presets)."""
from search_spaces.quantization.methods.base import QUANT_METHODS, QuantMethod, register_method
from search_spaces.quantization.methods import rtn, gptq, bnb, dynamic_int8  # noqa: E402,F401  (registers them)

__all__ = ["QUANT_METHODS", "QuantMethod", "register_method"]
