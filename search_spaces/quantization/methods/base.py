"""The quantization-method contract and its registry.

A method is a rounding algorithm or a library's quantized layer: it says which bit-widths it builds, where it
runs, how a trial samples its settings (parameters named `quantization.<method>.<name>`), how it builds a
candidate, and how a planned layer is stored once built (for the exact size before building). Methods that
round onto a storage grid (`GridMethod`: rtn, gptq) leave the grid itself (bits, group size, symmetric or
offset, scale dtype: `schemes.StorageGrid`) to the layer plan and its storage scheme, and say which schemes
they round onto (`rounds_onto`): deployment targets keep the methods that round onto their scheme
(`spec.fit_to_scheme`), never a list of names.

Adding a method: one module in this folder with a subclass registered by `register_method`, and its name in
the methods' import line of `quantization/__init__.py`; from a target's folder or a package of your own, an
entry point in the `planner.quantization_methods` group (see search_spaces/README.md).
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

from search_spaces.base import Registry
from search_spaces.quantization.constants import DEFAULT_GRID, FLOAT_BITS
from search_spaces.quantization.schemes import STORAGE_SCHEMES, StorageScheme

if TYPE_CHECKING:  # annotations only: the spec module validates against this registry
    from search_spaces.base import BuildContext, Params
    from search_spaces.quantization.plan import LayerPlan
    from search_spaces.quantization.spec import QuantSpace, QuantSpec


class QuantMethod(abc.ABC):
    name: ClassVar[str]
    bits: ClassVar[tuple[int, ...]]  # bit-widths it builds; 16 leaves a layer in float
    grid: ClassVar[bool] = False  # rounds onto a storage grid the packer stores (group size, symmetry apply)
    # The storage schemes a grid method rounds onto, by name; None: every registered one.
    schemes: ClassVar[tuple[str, ...] | None] = None
    sets_head: ClassVar[bool] = False  # can quantize the LM head and embedding group
    # Format of the transformers-loadable checkpoint it saves as (None: there is none).
    checkpoint: ClassVar[str | None] = None
    # Its layers cannot be saved, but it is re-applied to the loaded float checkpoint, deterministically and
    # without calibration (a checkpoint target ships the model before it, with the spec beside).
    applied_at_load: ClassVar[bool] = False
    # Its build changes no tensor of the model it is given (it may replace modules or set attributes): a candidate
    # of only such stages is built on a copy that shares the base model's tensors (candidates.build).
    keeps_weights: ClassVar[bool] = False

    def param(self, name: str) -> str:
        """The method's own trial parameter, relative to the quantization technique's prefix."""
        return f"{self.name}.{name}"

    def runs_on(self, device: str) -> bool:
        """Whether it can build and run a candidate on a device (checked before any trial)."""
        return True

    def rounds_onto(self, scheme: StorageScheme) -> bool:
        """Whether it can store a candidate on `scheme`'s grids (a library method stores its own layers: never)."""
        return self.grid and (self.schemes is None or scheme.name in self.schemes)

    def accepts(self, scheme: StorageScheme) -> bool:
        """Whether a spec of this method may name `scheme` as its grid: one it rounds onto, or the default
        for a library method (its specs keep the default grid, unused)."""
        return self.rounds_onto(scheme) or (not self.grid and scheme.name == DEFAULT_GRID)

    def bits_on(self, scheme: StorageScheme) -> tuple[int, ...]:
        """The bit-widths a spec of this method may use when `scheme` is its grid (a library method's own)."""
        return tuple(b for b in self.bits if b in scheme.stored_bits) if self.grid else self.bits

    @abc.abstractmethod
    def suggest(self, trial, space: "QuantSpace", choose) -> "QuantSpec":
        """A spec of this method; `choose(trial, local_name, choices)` records a quantization parameter."""

    @abc.abstractmethod
    def build(self, model, spec: "QuantSpec", context: "BuildContext"):
        """The quantized candidate (in place, or a new model)."""

    def presets(self, space: "QuantSpace") -> list["Params"]:
        """Settings a user would try by hand, as technique-relative parameters (without `method`)."""
        return []

    def shape_presets(self, space: "QuantSpace") -> list["Params"]:
        """Presets worth trying on every reduced shape too."""
        return []

    def smallest(self, space: "QuantSpace") -> list["Params"]:
        """The settings among which this method's smallest candidate is (without `method`)."""
        return [{}]

    def quantized_layers(self, layers: tuple["LayerPlan", ...], spec: "QuantSpec", device) -> list["LayerPlan"]:
        """The planned layers this method really changes on `device` (their stored size is `layer_bytes`)."""
        return [p for p in layers if p.quantized]

    @abc.abstractmethod
    def layer_bytes(self, plan: "LayerPlan", spec: "QuantSpec", device) -> int:
        """Exact stored bytes of one planned layer once built (weight and bias)."""

    def aim(self, spec: "QuantSpec", size_of, limit: float) -> "QuantSpec":
        """The spec with its byte target resolved against a memory budget of `limit` bytes, where the spec aims
        at one; `size_of(spec)` is the exact stored bytes of a spec on the candidate's shapes. Default: as it is."""
        return spec

    def pin(self, spec: "QuantSpec", measurements: dict) -> "QuantSpec":
        """The spec with what its build chose on the study's machine fixed from the measured artifact's
        `measurements` (Technique.pin). Default: as it is."""
        return spec

    def check(self, spec: "QuantSpec") -> None:
        """Rules of this method beyond its bit-widths; raise SpecError naming the field."""

    def mode_label(self, spec: "QuantSpec") -> list[str]:
        """Words for the spec's label after the method name (e.g. 'nf4')."""
        return []

    def storage_label(self, spec: "QuantSpec") -> list[str]:
        """Words for how a library method's candidate is stored (a grid method's come from its scheme)."""
        return [spec.bits_label()]

    def export_blocker(self, model, spec: "QuantSpec") -> str | None:
        """Why a candidate cannot be saved as a transformers-loadable checkpoint (None: it can)."""
        return None if self.checkpoint else f"{self.name} has no checkpoint format transformers loads"


def scheme_bits() -> tuple[int, ...]:
    """Every bit-width some registered storage scheme holds, 16 (float) included."""
    return tuple(sorted({b for scheme in STORAGE_SCHEMES.values() for b in scheme.stored_bits}))


# Methods a deployment target brings (e.g. targets/llamacpp's llama-quant) are this entry-point group's.
QUANT_METHODS: Registry = Registry("quantization method", plugins="planner.quantization_methods")
register_method = QUANT_METHODS.add


# Library methods (bnb, dynamic-int8) quantize either layer group or both at their one bit-width: keeping the
# MLP in float is what makes dynamic-int8 usable on the built-in model (held-out perplexity 23.8 with
# attention only vs 78 with both, float 23.2: int8 activations of down_proj carry outliers).
QUANTIZED_GROUPS = {"attn+mlp": ("attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}


class WholeGroupMethod(QuantMethod):
    """A library's quantized layer at one bit-width, applied to whole layer groups (attention, MLP or both)."""

    def groups_at(self, trial, choose, bits: int) -> dict[str, int]:
        chosen = QUANTIZED_GROUPS[choose(trial, self.param("groups"), tuple(QUANTIZED_GROUPS))]
        return {group: bits if group in chosen else FLOAT_BITS for group in ("attn", "mlp")}

    def smallest(self, space) -> list["Params"]:
        return [{self.param("groups"): "attn+mlp"}]
