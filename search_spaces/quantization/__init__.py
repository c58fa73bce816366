"""Quantization as a search space: mixed bit-widths per layer group, four methods, exact memory, export.

Methods (``QuantSpec.method``):
- ``rtn``: group-wise round to nearest on compressed-tensors' integer grid;
- ``gptq``: GPTQ (error-compensating rounding) on calibration text from the training split;
- ``bnb``: bitsandbytes LLM.int8 / nf4 / fp4 through transformers' integration;
- ``dynamic-int8``: torch's dynamic int8 linear layers (CPU).
Each method is a registered `QuantMethod` (methods/, one module each). rtn/gptq round onto a storage grid
(grid.StorageGrid, chosen per layer by plan.plan_layers) of a registered storage scheme (schemes/, one
module each: compressed-tensors, gguf; a deployment target fits the space to its scheme with
`fit_to_scheme`), and are evaluated in float with exactly the weights
their packed checkpoint decodes to, reporting the packed size (see modules); `estimate_weight_bytes` gives
that size before building; `export` writes the deployable checkpoint (see export for each method's format).

`apply` builds rtn/gptq and dynamic-int8 candidates in place and returns the model; bnb returns a new
model (the float one is left unchanged). Everything is deterministic for a given context.seed.
"""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from search_spaces.base import BuildContext, Params, Technique, register
from search_spaces.quantization.methods import QUANT_METHODS
from search_spaces.quantization.export import ExportError, ExportResult, export, export_blocker
from search_spaces.quantization.memory import estimate_weight_bytes
from search_spaces.quantization.plan import plan_layers
from search_spaces.quantization.schemes import STORAGE_SCHEMES, StorageScheme, register_scheme
from search_spaces.quantization.spec import (
    GROUP_SIZES, NO_QUANTIZATION, GPTQSettings, LayerOverride, QuantSpace, QuantSpec, available_methods,
    fit_to_scheme, method_runs_on, scheme_space_defaults,
)
from search_spaces.specs import SpecError
# the methods, registered in the order of their hand-picked presets (after spec: they build on it)
from search_spaces.quantization.methods import rtn, gptq, bnb, dynamic_int8  # noqa: E402,F401,I001

__all__ = [
    "GROUP_SIZES", "QUANT_METHODS", "STORAGE_SCHEMES", "ExportError", "ExportResult", "GPTQSettings", "LayerOverride",
    "QuantSpace", "QuantSpec", "StorageScheme", "apply", "available_methods", "estimate_weight_bytes", "export",
    "export_blocker", "fit_to_scheme", "presets", "register_scheme", "scheme_space_defaults", "shape_presets",
    "smallest", "suggest",
]


# Storage note: {layer name: the group size it uses instead of the requested one}.
GROUP_SIZE_FALLBACKS = "group_size_fallbacks"


def apply(model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
    device = next(model.parameters()).device
    if not method_runs_on(spec.method, str(device)):
        raise SpecError(f"QuantSpec.method: {spec.method} cannot run on {device}")
    return spec.quant_method.build(model, spec, context)


class Quantization(Technique):
    name, order, spec_type, space_type = "quantization", 30, QuantSpec, QuantSpace

    def _record(self, trial, name: str, choices):
        # Every quantization choice is recorded, a single one too (the sampler's history stays comparable
        # with studies made before the technique contract).
        return trial.suggest_categorical(self.param(name), list(choices))

    def space_defaults_for(self, given: dict) -> dict:
        """A study file naming a grid starts from that grid's own bit-widths, group sizes and symmetry."""
        grid = given.get("grid")
        return scheme_space_defaults(grid) if isinstance(grid, str) and grid in STORAGE_SCHEMES else {}

    def suggest(self, trial, space: QuantSpace) -> QuantSpec | None:
        """A spec sampled from `space`, or None when the stage is off (disabled, or the trial drew "none").

        Only methods that run on the space's device are offered, and each method draws its settings from its
        own parameters (e.g. ``quantization.rtn.attn_bits``, ``quantization.bnb.mode``), so no incompatible
        combination can be drawn.
        """
        if not space.enabled:
            return None
        methods = available_methods(space)
        if not methods:
            raise SpecError(f"QuantSpace.methods: none of {', '.join(space.methods)} runs on {space.device}")
        method = self._record(trial, "method", methods)
        if method == NO_QUANTIZATION:
            return None
        return QUANT_METHODS[method].suggest(trial, space, self._record)

    def apply(self, model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
        return apply(model, spec, context)

    def fit_space(self, space: QuantSpace, model: nn.Module) -> QuantSpace:
        """Methods that cannot run where candidates are built are left out up front (`available_methods`)."""
        return replace(space, device=next(model.parameters()).device.type)

    def describe(self, spec: QuantSpec, notes: dict | None = None) -> str:
        return spec.summary(grid_fallback=bool((notes or {}).get(GROUP_SIZE_FALLBACKS)))

    def storage_notes(self, model: nn.Module, spec: QuantSpec) -> dict:
        """Quantized layers whose input width the requested group size does not divide, with the group size they
        really use (grid.effective_group_size: halved down to 32, else per channel; None = per channel), or "F16"
        where the scheme holds no group size that fits (GGUF: a width that is not a whole number of blocks)."""
        if not spec.quant_method.grid or spec.group_size is None:
            return {}
        layers = plan_layers(model, spec).layers
        fallbacks = {p.name: p.fmt.label if p.width_fallback else p.fmt.group_size for p in layers
                     if p.width_fallback or (p.quantized and p.fmt.group_size != spec.group_size)}
        return {GROUP_SIZE_FALLBACKS: fallbacks} if fallbacks else {}

    def weight_bytes(self, model: nn.Module, spec: QuantSpec) -> int:
        return estimate_weight_bytes(model, spec)

    def fit_budget(self, space: QuantSpace, memory_limit: float | None,
                   decode_ratio: float | None = None) -> QuantSpace:
        """Allocations sample their share of a memory budget (`fill`) and predict their decode within a latency
        budget (`decode_budget`)."""
        budgeted = memory_limit is not None and bool(space.allocation.fill)
        return replace(space, allocation=replace(space.allocation, budgeted=budgeted, decode_budget=decode_ratio))

    def aim(self, spec: QuantSpec, model: nn.Module, memory_limit: float) -> QuantSpec:
        return spec.quant_method.aim(spec, lambda s: estimate_weight_bytes(model, s), memory_limit)

    def pin(self, spec: QuantSpec, measurements: dict) -> QuantSpec:
        return spec.quant_method.pin(spec, measurements)

    def _methods(self, space: QuantSpace):
        """The space's methods that run on its device, in registry order."""
        available = available_methods(space)
        return [m for name, m in QUANT_METHODS.items() if name in available]

    def _with_method(self, method, params: list[Params]) -> list[Params]:
        return [{"method": method.name, **p} for p in params]

    def off(self, space: QuantSpace) -> Params:
        return {"method": NO_QUANTIZATION} if space.enabled and NO_QUANTIZATION in available_methods(space) else {}

    def presets(self, space: QuantSpace) -> list[Params]:
        """What a user would try by hand: one bit-width everywhere (rtn 8 and 4, gptq 4), dynamic int8."""
        if not space.enabled:
            return []
        return [p for m in self._methods(space) for p in self._with_method(m, m.presets(space))]

    def shape_presets(self, space: QuantSpace) -> list[Params]:
        """On every reduced shape: the most accurate 4-bit grid method the space holds (gptq, else rtn: the later
        one in registry order) and the library methods' presets (dynamic int8: the fastest on a CPU)."""
        if not space.enabled:
            return []
        methods = self._methods(space)
        grid = [p for m in methods if m.grid for p in self._with_method(m, m.shape_presets(space))]
        return grid[-1:] + [p for m in methods if not m.grid for p in self._with_method(m, m.shape_presets(space))]

    def smallest(self, space: QuantSpace) -> list[Params]:
        if not space.enabled:
            return [{}]
        return [p for m in self._methods(space) for p in self._with_method(m, m.smallest(space))] or [{}]

    def applied_at_load(self, spec: QuantSpec) -> bool:
        return spec.quant_method.applied_at_load

    def keeps_weights(self, spec: QuantSpec) -> bool:
        return spec.quant_method.keeps_weights

    def save(self, model: nn.Module, spec: QuantSpec, folder) -> None:
        export(model, spec, folder)


TECHNIQUE = register(Quantization())
suggest, presets, shape_presets, smallest = TECHNIQUE.suggest, TECHNIQUE.presets, TECHNIQUE.shape_presets, TECHNIQUE.smallest
