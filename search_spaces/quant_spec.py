"""What a quantization candidate is (QuantSpec) and the ranges a study searches over (QuantSpace).

Bits are chosen per layer group: ``attn`` (attention projections), ``mlp`` (every other linear layer in
a decoder block) and, optionally, ``head``: the vocabulary group, i.e. the LM head together with the
input embedding (one group because most small models tie them). ``16`` means "not quantized":
rtn/gptq store such a layer as 16-bit float (float16 for a float32 model, else the model's own 16-bit
dtype); bnb and dynamic-int8 leave it in the model's dtype, which their runtimes compute in.

Per-layer overrides select modules by their qualified name with a shell-style glob (``fnmatch``,
case-sensitive, e.g. ``"model.layers.0.*"`` or ``"*.down_proj"``); the first matching override wins.
Fields a method does not use (e.g. ``group_size`` for bnb) are ignored by that method.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

import torch

from search_spaces.base import DictSpec, SpecError

RTN, GPTQ, BNB, DYNAMIC_INT8 = "rtn", "gptq", "bnb", "dynamic-int8"
METHODS = (RTN, GPTQ, BNB, DYNAMIC_INT8)
NO_QUANTIZATION = "none"  # a space choice: the trial skips the quantization stage
PACKED_METHODS = (RTN, GPTQ)  # integer weights packed as compressed-tensors stores them
FLOAT_BITS = 16
BITS = (2, 3, 4, 8, FLOAT_BITS)
GROUP_SIZES = (32, 64, 128, None)  # None: one scale per output channel
GROUPS = ("attn", "mlp", "head")
REQUIRED_GROUPS = ("attn", "mlp")
# Bit-widths each method can build; bnb's 8 is LLM.int8, its 4 is nf4 or fp4.
METHOD_BITS = {RTN: BITS, GPTQ: BITS, BNB: (4, 8, FLOAT_BITS), DYNAMIC_INT8: (8, FLOAT_BITS)}
BNB_4BIT_TYPES = ("nf4", "fp4")
BNB_MODES = ("int8",) + BNB_4BIT_TYPES


def _fail(where: str, message: str):
    raise SpecError(f"{where}: {message}")


def _is_one_of(value, allowed) -> bool:
    """Membership that keeps booleans and integers apart (in Python, True == 1)."""
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) and (value is None) == (a is None)
               for a in allowed)


def _choices(values) -> str:
    return ", ".join("null" if v is None else repr(v) for v in values)


class _NestedSpec(DictSpec):
    """A spec used as a field of another: its errors name the full path (QuantSpec.gptq.damp)."""

    @classmethod
    def from_dict(cls, data, where: str | None = None):
        try:
            return super().from_dict(data, where)
        except SpecError as exc:
            own = cls.__name__ + "."
            if where and str(exc).startswith(own):
                raise SpecError(f"{where}.{str(exc)[len(own):]}") from None
            raise


@dataclass(frozen=True)
class LayerOverride(_NestedSpec):
    pattern: str  # fnmatch glob on the qualified module name, e.g. "model.layers.0.*"
    bits: int

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            _fail("LayerOverride.pattern", "must be a non-empty glob such as 'model.layers.0.*'")
        if not _is_one_of(self.bits, BITS):
            _fail("LayerOverride.bits", f"{self.bits!r} is not one of {_choices(BITS)}")


@dataclass(frozen=True)
class GPTQSettings(_NestedSpec):
    samples: int = 16  # calibration windows drawn from the training split (16 x 256 tokens: ~4k)
    seq_len: int = 256  # tokens per window
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # columns updated together (lazy batch updates)
    act_order: bool = True  # round the most used input columns first (group scales fixed up front)

    def __post_init__(self):
        for name, minimum in (("samples", 1), ("seq_len", 8), ("block_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                _fail(f"GPTQSettings.{name}", f"must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            _fail("GPTQSettings.damp", f"must be a number in (0, 1), got {self.damp!r}")
        if not isinstance(self.act_order, bool):
            _fail("GPTQSettings.act_order", f"expected true or false, got {self.act_order!r}")


def _default_bits() -> dict[str, int]:
    return {"attn": 4, "mlp": 4}


@dataclass(frozen=True)
class QuantSpec(DictSpec):
    method: Literal["rtn", "gptq", "bnb", "dynamic-int8"] = RTN
    bits: dict[str, int] = field(default_factory=_default_bits)  # attn, mlp and optionally head
    group_size: int | None = 128  # rtn/gptq; None = per output channel
    symmetric: bool = True  # rtn/gptq
    bnb_4bit_type: Literal["nf4", "fp4"] = "nf4"
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    overrides: tuple[LayerOverride, ...] = ()

    def __post_init__(self):
        if not _is_one_of(self.method, METHODS):
            _fail("QuantSpec.method", f"{self.method!r} is not one of {_choices(METHODS)}")
        if not isinstance(self.bits, dict):
            _fail("QuantSpec.bits", f"expected a mapping of group to bits, got {type(self.bits).__name__}")
        allowed = METHOD_BITS[self.method]
        for group in self.bits:
            if group not in GROUPS:
                _fail(f"QuantSpec.bits.{group}", f"unknown layer group (known: {', '.join(GROUPS)})")
        for group in REQUIRED_GROUPS:
            if group not in self.bits:
                _fail(f"QuantSpec.bits.{group}", "missing (attn and mlp are required; 16 leaves them in float)")
        for group, bits in self.bits.items():
            if not _is_one_of(bits, allowed):
                _fail(f"QuantSpec.bits.{group}", f"{bits!r} is not one of {_choices(allowed)} for {self.method}")
        if "head" in self.bits and self.method not in PACKED_METHODS:
            _fail("QuantSpec.bits.head", f"{self.method} leaves the LM head and embedding alone; only rtn/gptq set them")
        if not _is_one_of(self.group_size, GROUP_SIZES):
            _fail("QuantSpec.group_size", f"{self.group_size!r} is not one of {_choices(GROUP_SIZES)}")
        if not isinstance(self.symmetric, bool):
            _fail("QuantSpec.symmetric", f"expected true or false, got {self.symmetric!r}")
        if not _is_one_of(self.bnb_4bit_type, BNB_4BIT_TYPES):
            _fail("QuantSpec.bnb_4bit_type", f"{self.bnb_4bit_type!r} is not one of {_choices(BNB_4BIT_TYPES)}")
        if not isinstance(self.gptq, GPTQSettings):
            _fail("QuantSpec.gptq", f"expected GPTQSettings, got {type(self.gptq).__name__}")
        if not isinstance(self.overrides, tuple) or not all(isinstance(o, LayerOverride) for o in self.overrides):
            _fail("QuantSpec.overrides", "expected a list of {pattern, bits} overrides")
        for index, override in enumerate(self.overrides):
            if not _is_one_of(override.bits, allowed):
                _fail(f"QuantSpec.overrides[{index}].bits",
                      f"{override.bits!r} is not one of {_choices(allowed)} for {self.method}")
        if self.method == BNB:
            quantized = set(self.integer_bits())
            if len(quantized) > 1:
                _fail("QuantSpec.bits", f"bnb quantizes every layer in one mode (8 or 4 bits), got {sorted(quantized)}")

    def integer_bits(self) -> list[int]:
        """Every bit-width below 16 that the spec uses, groups and overrides alike."""
        values = list(self.bits.values()) + [o.bits for o in self.overrides]
        return [b for b in values if b < FLOAT_BITS]

    def summary(self) -> str:
        """A short label such as 'quant(gptq 4/4/h16 g128)' (attn/mlp/head bits) for tables and logs."""
        bits = "/".join(str(self.bits[g]) for g in REQUIRED_GROUPS)
        if "head" in self.bits:
            bits += f"/h{self.bits['head']}"
        parts = [self.method, bits]
        if self.method == BNB:
            parts.insert(1, self.bnb_mode)
        if self.method in PACKED_METHODS and self.integer_bits():
            parts.append("per-channel" if self.group_size is None else f"g{self.group_size}")
            if not self.symmetric:
                parts.append("asym")
        if self.overrides:
            parts.append(f"+{len(self.overrides)} overrides")
        return f"quant({' '.join(parts)})"

    @property
    def bnb_mode(self) -> str:
        """'int8', 'nf4' or 'fp4': what bitsandbytes builds for this spec's quantized layers."""
        return "int8" if set(self.integer_bits()) == {8} else self.bnb_4bit_type


def _default_methods() -> tuple[str, ...]:
    return (NO_QUANTIZATION,) + METHODS


@dataclass(frozen=True)
class QuantSpace(DictSpec):
    """The ranges `suggest` samples from; a study file may narrow any of them."""

    enabled: bool = True
    methods: tuple[str, ...] = field(default_factory=_default_methods)  # "none" lets a trial skip the stage
    device: str = "cpu"  # where candidates are built: methods that cannot run there are left out
    bits: tuple[int, ...] = BITS  # rtn/gptq choices for attn and mlp
    mixed: bool = True  # attn and mlp bits chosen independently (else one choice for both)
    head_bits: tuple[int | None, ...] = (None, FLOAT_BITS, 8, 4)  # None leaves head and embedding untouched
    group_sizes: tuple[int | None, ...] = GROUP_SIZES
    # Symmetric only by default: an asymmetric candidate exports only when all its quantized layers share
    # one format (see quant_export); add False to search asymmetric grids too.
    symmetric: tuple[bool, ...] = (True,)
    bnb_modes: tuple[str, ...] = BNB_MODES
    gptq: GPTQSettings = field(default_factory=GPTQSettings)

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            _fail("QuantSpace.enabled", f"expected true or false, got {self.enabled!r}")
        self._subset("methods", self.methods, (NO_QUANTIZATION,) + METHODS)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            _fail("QuantSpace.device", f"{self.device!r} is not a torch device (cpu, cuda, cuda:N)")
        self._subset("bits", self.bits, BITS)
        self._subset("head_bits", self.head_bits, (None,) + BITS, allow_empty=True)
        self._subset("group_sizes", self.group_sizes, GROUP_SIZES)
        self._subset("symmetric", self.symmetric, (True, False))
        self._subset("bnb_modes", self.bnb_modes, BNB_MODES)
        if not isinstance(self.mixed, bool):
            _fail("QuantSpace.mixed", f"expected true or false, got {self.mixed!r}")

    @staticmethod
    def _subset(name: str, values, allowed, allow_empty: bool = False):
        if not isinstance(values, tuple) or (not values and not allow_empty):
            _fail(f"QuantSpace.{name}", f"expected a non-empty list drawn from {_choices(allowed)}")
        for index, value in enumerate(values):
            if not _is_one_of(value, allowed):
                _fail(f"QuantSpace.{name}[{index}]", f"{value!r} is not one of {_choices(allowed)}")
        if len(set(values)) != len(values):
            _fail(f"QuantSpace.{name}", f"repeats a value: {list(values)}")


def method_runs_on(method: str, device: str) -> bool:
    """Whether a method can build and run a candidate on a device (checked before any trial)."""
    kind = torch.device(device).type
    if method in PACKED_METHODS:
        return True
    if method == BNB:
        return kind in ("cpu", "cuda") and importlib.util.find_spec("bitsandbytes") is not None
    if method == DYNAMIC_INT8:  # torch's dynamic quantized linear kernels exist for the CPU only
        return kind == "cpu" and any(e != "none" for e in torch.backends.quantized.supported_engines)
    return False


def available_methods(space: QuantSpace) -> tuple[str, ...]:
    """The space's methods that can run on its device, in the space's order ("none" always can)."""
    return tuple(m for m in space.methods if m == NO_QUANTIZATION or method_runs_on(m, space.device))
