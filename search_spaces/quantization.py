"""Quantization as a search space: mixed bit-widths per layer group, four methods, exact memory, export.

Methods (``QuantSpec.method``):
- ``rtn``: group-wise round to nearest on compressed-tensors' integer grid;
- ``gptq``: GPTQ (error-compensating rounding) on calibration text from the training split;
- ``bnb``: bitsandbytes LLM.int8 / nf4 / fp4 through transformers' integration;
- ``dynamic-int8``: torch's dynamic int8 linear layers (CPU).
rtn/gptq candidates are evaluated in float with exactly the weights their packed checkpoint decodes
to, and report the packed size (see quant_modules); `estimate_weight_bytes` gives that size before
building; `export` writes the deployable checkpoint (see quant_export for which format each gets).

`apply` builds rtn/gptq and dynamic-int8 candidates in place and returns the model; bnb returns a new
model (the float one is left unchanged). Everything is deterministic for a given context.seed.
"""
from __future__ import annotations

from torch import nn

from search_spaces.base import BuildContext, SpecError, Technique, register
from search_spaces.quant_bnb import build_bnb
from search_spaces.quant_dynamic import build_dynamic
from search_spaces.quant_export import ExportError, ExportResult, export, export_blocker
from search_spaces.quant_memory import estimate_weight_bytes
from search_spaces.quant_spec import (
    BITS, BNB, DYNAMIC_INT8, FLOAT_BITS, GPTQ, GROUP_SIZES, METHODS, NO_QUANTIZATION, RTN, GPTQSettings,
    LayerOverride, QuantSpace, QuantSpec, available_methods, method_runs_on,
)
from search_spaces.quant_weight_only import build_weight_only

__all__ = [
    "BITS", "GROUP_SIZES", "METHODS", "ExportError", "ExportResult", "GPTQSettings", "LayerOverride", "QuantSpace",
    "QuantSpec", "apply", "available_methods", "estimate_weight_bytes", "export", "export_blocker", "presets",
    "shape_presets", "smallest", "suggest",
]

PARAM = "quantization."
_BUILDERS = {RTN: build_weight_only, GPTQ: build_weight_only, BNB: build_bnb, DYNAMIC_INT8: build_dynamic}


def apply(model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
    device = next(model.parameters()).device
    if not method_runs_on(spec.method, str(device)):
        raise SpecError(f"QuantSpec.method: {spec.method} cannot run on {device}")
    return _BUILDERS[spec.method](model, spec, context)


# ---------------------------------------------------------------------------------------------------
# Sampling a spec (the only code that talks to Optuna for quantization)
# ---------------------------------------------------------------------------------------------------


def _param(method: str, name: str) -> str:
    return f"{PARAM}{method}.{name}"


def _group_bits_params(space: QuantSpace) -> tuple[str, ...]:
    """Names of the attn and mlp bits parameters: one each, or one shared when the space is not mixed."""
    return ("attn_bits", "mlp_bits") if space.mixed else ("bits", "bits")


def _weight_only(trial, space: QuantSpace, method: str) -> QuantSpec:
    choose = lambda name, choices: trial.suggest_categorical(_param(method, name), list(choices))  # noqa: E731
    bits = {group: choose(name, space.bits) for group, name in zip(("attn", "mlp"), _group_bits_params(space))}
    if space.head_bits:
        head = choose("head_bits", space.head_bits)
        if head is not None:
            bits["head"] = head
    defaults = QuantSpec()
    if any(b < FLOAT_BITS for b in bits.values()):  # the grid settings matter only when something is quantized
        group_size, symmetric = choose("group_size", space.group_sizes), choose("symmetric", space.symmetric)
    else:
        group_size, symmetric = defaults.group_size, defaults.symmetric
    gptq = space.gptq if method == GPTQ else defaults.gptq
    return QuantSpec(method=method, bits=bits, group_size=group_size, symmetric=symmetric, gptq=gptq)


# bnb and dynamic-int8 quantize either layer group or both (at their one bit-width): keeping the MLP in
# float is what makes dynamic-int8 usable on the built-in model (held-out perplexity 23.8 with attention
# only vs 78 with both, float 23.2: int8 activations of down_proj carry outliers).
QUANTIZED_GROUPS = {"attn+mlp": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}


def _groups_at(trial, method: str, bits: int) -> dict[str, int]:
    chosen = QUANTIZED_GROUPS[trial.suggest_categorical(_param(method, "groups"), list(QUANTIZED_GROUPS))]
    return {group: bits if group in chosen else FLOAT_BITS for group in ("attn", "mlp")}


def _bnb(trial, space: QuantSpace, method: str) -> QuantSpec:
    mode = trial.suggest_categorical(_param(method, "mode"), list(space.bnb_modes))
    bits = _groups_at(trial, method, 8 if mode == "int8" else 4)
    return QuantSpec(method=BNB, bits=bits, bnb_4bit_type=QuantSpec().bnb_4bit_type if mode == "int8" else mode)


def _dynamic_int8(trial, space: QuantSpace, method: str) -> QuantSpec:
    return QuantSpec(method=DYNAMIC_INT8, bits=_groups_at(trial, method, 8))


_SUGGESTERS = {RTN: _weight_only, GPTQ: _weight_only, BNB: _bnb, DYNAMIC_INT8: _dynamic_int8}


def suggest(trial, space: QuantSpace) -> QuantSpec | None:
    """A spec sampled from `space`, or None when the stage is off (disabled, or the trial drew "none").

    Only methods that run on the space's device are offered, and each method draws bits from its own
    parameters (e.g. ``quantization.rtn.attn_bits``, ``quantization.bnb.mode``), so no incompatible
    combination can be drawn.
    """
    if not space.enabled:
        return None
    methods = available_methods(space)
    if not methods:
        raise SpecError(f"QuantSpace.methods: none of {', '.join(space.methods)} runs on {space.device}")
    method = trial.suggest_categorical(PARAM + "method", list(methods))
    if method == NO_QUANTIZATION:
        return None
    return _SUGGESTERS[method](trial, space, method)


def presets(space: QuantSpace) -> list[dict]:
    """The stage off, then what a user would try by hand: one bit-width everywhere (8, then 4) with
    round-to-nearest, the same 4 bits with GPTQ, and torch's dynamic int8. Only choices the space holds."""
    if not space.enabled:
        return [{}]
    methods = available_methods(space)
    off = {PARAM + "method": NO_QUANTIZATION} if NO_QUANTIZATION in methods else {}
    picks = []
    for method, bits in ((RTN, 8), (RTN, 4), (GPTQ, 4)):
        if method in methods and bits in space.bits:
            picks.append({PARAM + "method": method, **{_param(method, n): bits for n in _group_bits_params(space)}})
    if DYNAMIC_INT8 in methods:
        picks.append({PARAM + "method": DYNAMIC_INT8, _param(DYNAMIC_INT8, "groups"): "attn+mlp"})
    return [off, *picks]


def shape_presets(space: QuantSpace) -> list[dict]:
    """The presets worth trying on every reduced shape too: the most accurate 4-bit method the space holds
    (GPTQ, else RTN) and dynamic int8 (the fastest on a CPU)."""
    picks = presets(space)[1:]
    four_bit = [p for p in picks if p.get(PARAM + "method") in (GPTQ, RTN)
                and all(v == 4 for k, v in p.items() if k.endswith("bits"))]
    dynamic = [p for p in picks if p.get(PARAM + "method") == DYNAMIC_INT8]
    return four_bit[-1:] + dynamic


def smallest(space: QuantSpace) -> list[dict]:
    """Per method, its smallest settings: least bits, symmetric grids (no zero points), 4-bit bnb modes and
    every quantized group. Head bits and group sizes are all listed: which is smallest depends on the model
    (a quantized head unties the embedding; a grid's scales depend on the layer widths)."""
    if not space.enabled:
        return [{}]
    corners = []
    for method in available_methods(space):
        if method in (RTN, GPTQ):
            base = {PARAM + "method": method, **{_param(method, n): min(space.bits) for n in _group_bits_params(space)},
                    _param(method, "symmetric"): True if True in space.symmetric else False}
            for head in space.head_bits or (None,):
                for group_size in space.group_sizes:
                    corners.append({**base, _param(method, "head_bits"): head, _param(method, "group_size"): group_size})
        elif method == BNB:
            four_bit = [m for m in space.bnb_modes if m != "int8"] or list(space.bnb_modes)
            corners.append({PARAM + "method": method, _param(method, "mode"): four_bit[0],
                            _param(method, "groups"): "attn+mlp"})
        elif method == DYNAMIC_INT8:
            corners.append({PARAM + "method": method, _param(method, "groups"): "attn+mlp"})
    return corners or [{}]


def _save(model: nn.Module, spec: QuantSpec, folder) -> None:
    export(model, spec, folder)


register(Technique(name="quantization", order=30, spec_type=QuantSpec, space_type=QuantSpace, suggest=suggest,
                   apply=apply, weight_bytes=estimate_weight_bytes, presets=presets, smallest=smallest,
                   shape_presets=shape_presets, save=_save))
