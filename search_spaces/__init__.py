"""Compression techniques (distillation, pruning, quantization), one module each.

Each module registers a `Technique` (see `base`); importing this package fills the registry.
This package never imports `planner`.
"""
from search_spaces.base import TECHNIQUES, BuildContext, Technique, ordered, register
from search_spaces.specs import DictSpec, SpecError
from search_spaces import distillation, pruning, quantization  # noqa: E402,F401  (registers the techniques)

__all__ = ["TECHNIQUES", "BuildContext", "DictSpec", "SpecError", "Technique", "ordered", "register"]
