"""Compression techniques (distillation, pruning, quantization), one module each.

Each technique registers a spec dataclass, a `suggest(trial, space)` and an `apply(model, spec, context)`.
The registry fills as the techniques land; this package never imports `planner`.
"""

TECHNIQUES: dict[str, object] = {}
