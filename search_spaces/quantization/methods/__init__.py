"""Quantization methods, one module each (registered by search_spaces/quantization/__init__.py, in the order of
their hand-picked presets; a deployment target's own methods through the registry's entry points)."""
from search_spaces.quantization.methods.base import QUANT_METHODS, QuantMethod, register_method

__all__ = ["QUANT_METHODS", "QuantMethod", "register_method"]
