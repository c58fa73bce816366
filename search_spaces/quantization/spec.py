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

from dataclasses import dataclass, field

import torch

from search_spaces.quantization.grid import (COMPRESSED_TENSORS_GRID, GGUF_BITS, GGUF_BLOCK, GGUF_GRID, SCHEMES,
                                            StorageGrid)
from search_spaces.quantization.methods.base import FLOAT_BITS, QUANT_METHODS, QuantMethod
from search_spaces.specs import (DictSpec, SpecError, check_bool, check_choices, check_float, check_int,
                                 check_member, is_one_of, shown)

NO_QUANTIZATION = "none"  # a space choice: the trial skips the quantization stage
BITS = (2, 3, 4, 5, 8, FLOAT_BITS)
GRID_BITS = {COMPRESSED_TENSORS_GRID: (2, 3, 4, 8, FLOAT_BITS), GGUF_GRID: GGUF_BITS + (FLOAT_BITS,)}
GROUP_SIZES = (32, 64, 128, None)  # None: one scale per output channel
GROUPS = ("attn", "mlp", "head")
REQUIRED_GROUPS = ("attn", "mlp")
BNB_4BIT_TYPES = ("nf4", "fp4")
BNB_MODES = ("int8",) + BNB_4BIT_TYPES


def _fail(where: str, message: str):
    raise SpecError(f"{where}: {message}")


def method_named(name: str) -> QuantMethod:
    return QUANT_METHODS[name]


@dataclass(frozen=True)
class LayerOverride(DictSpec):
    pattern: str  # fnmatch glob on the qualified module name, e.g. "model.layers.0.*"
    bits: int

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            _fail("LayerOverride.pattern", "must be a non-empty glob such as 'model.layers.0.*'")
        check_member(BITS)("LayerOverride.bits", self.bits)


@dataclass(frozen=True)
class GPTQSettings(DictSpec):
    samples: int = 16  # calibration windows drawn from the training split (16 x 256 tokens: ~4k)
    seq_len: int = 256  # tokens per window
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # columns updated together (lazy batch updates)
    act_order: bool = True  # round the most used input columns first (group scales fixed up front)

    def __post_init__(self):
        for name, minimum in (("samples", 1), ("seq_len", 8), ("block_size", 1)):
            check_int(minimum)(f"GPTQSettings.{name}", getattr(self, name))
        check_float(0.0, 1.0, low_open=True, high_open=True)("GPTQSettings.damp", self.damp)
        check_bool("GPTQSettings.act_order", self.act_order)


def _default_bits() -> dict[str, int]:
    return {"attn": 4, "mlp": 4}


@dataclass(frozen=True)
class QuantSpec(DictSpec):
    method: str = "rtn"  # a registered quantization method (methods/)
    bits: dict[str, int] = field(default_factory=_default_bits)  # attn, mlp and optionally head
    group_size: int | None = 128  # grid methods (rtn, gptq); None = per output channel
    symmetric: bool = True  # grid methods
    bnb_4bit_type: str = "nf4"
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    overrides: tuple[LayerOverride, ...] = ()
    # The storage scheme the grid methods round onto: compressed-tensors (transformers, vLLM) or gguf
    # (llama.cpp: fixed blocks of 32, fp16 scales); the deployment target chooses it.
    grid: str = COMPRESSED_TENSORS_GRID

    def __post_init__(self):
        check_member(tuple(QUANT_METHODS))("QuantSpec.method", self.method)
        if not isinstance(self.bits, dict):
            _fail("QuantSpec.bits", f"expected a mapping of group to bits, got {type(self.bits).__name__}")
        for group in self.bits:
            check_member(GROUPS)(f"QuantSpec.bits.{group}", group)
        for group in REQUIRED_GROUPS:
            if group not in self.bits:
                _fail(f"QuantSpec.bits.{group}", "missing (attn and mlp are required; 16 leaves them in float)")
        check_member(SCHEMES)("QuantSpec.grid", self.grid)
        method = self.quant_method
        for group, bits in self.bits.items():
            self._check_bits(f"QuantSpec.bits.{group}", bits, method)
        if "head" in self.bits and not method.sets_head:
            _fail("QuantSpec.bits.head", f"{self.method} leaves the LM head and embedding alone")
        check_member(GROUP_SIZES)("QuantSpec.group_size", self.group_size)
        check_bool("QuantSpec.symmetric", self.symmetric)
        check_member(BNB_4BIT_TYPES)("QuantSpec.bnb_4bit_type", self.bnb_4bit_type)
        if not isinstance(self.gptq, GPTQSettings):
            _fail("QuantSpec.gptq", f"expected GPTQSettings, got {type(self.gptq).__name__}")
        if not isinstance(self.overrides, tuple) or not all(isinstance(o, LayerOverride) for o in self.overrides):
            _fail("QuantSpec.overrides", "expected a list of {pattern, bits} overrides")
        for index, override in enumerate(self.overrides):
            self._check_bits(f"QuantSpec.overrides[{index}].bits", override.bits, method)
        if self.grid == GGUF_GRID:
            self._check_gguf(method)
        method.check(self)

    def _check_gguf(self, method: QuantMethod) -> None:
        if not method.grid:
            _fail("QuantSpec.grid", f"{self.method} does not round onto a grid; gguf is for rtn and gptq")
        if self.integer_bits() and self.group_size != GGUF_BLOCK:
            _fail("QuantSpec.group_size", f"GGUF blocks hold {GGUF_BLOCK} weights, got {self.group_size!r}")

    def _check_bits(self, where: str, bits, method: QuantMethod) -> None:
        allowed = tuple(b for b in method.bits if not method.grid or b in GRID_BITS.get(self.grid, ()))
        if not is_one_of(bits, allowed):
            grid = f" on {self.grid} grids" if method.grid else ""
            _fail(where, f"expected one of {shown(allowed)} for {method.name}{grid}, got {bits!r}")

    @property
    def quant_method(self) -> QuantMethod:
        return QUANT_METHODS[self.method]

    def integer_bits(self) -> list[int]:
        """Every bit-width below 16 that the spec uses, groups and overrides alike."""
        values = list(self.bits.values()) + [o.bits for o in self.overrides]
        return [b for b in values if b < FLOAT_BITS]

    def summary(self, grid_fallback: bool = False) -> str:
        """A short label such as 'quant(gptq 4/4/h16 g128)' (attn/mlp/head bits) for tables and logs;
        `grid_fallback` marks a group size some layers cannot use ('g128*': those use a smaller one)."""
        bits = "/".join(str(self.bits[g]) for g in REQUIRED_GROUPS)
        if "head" in self.bits:
            bits += f"/h{self.bits['head']}"
        method = self.quant_method
        if self.grid == GGUF_GRID:
            return self._gguf_summary(grid_fallback)
        parts = [self.method, *method.mode_label(self), bits]
        if method.grid and self.integer_bits():
            parts.append("per-channel" if self.group_size is None else f"g{self.group_size}{'*' if grid_fallback else ''}")
            if not self.symmetric:
                parts.append("asym")
        if self.overrides:
            parts.append(f"+{len(self.overrides)} overrides")
        return f"quant({' '.join(parts)})"

    def gguf_type(self, bits: int) -> str:
        return StorageGrid(bits, GGUF_BLOCK, self.symmetric, GGUF_GRID).gguf_type

    def _gguf_summary(self, grid_fallback: bool) -> str:
        """'quant(gptq Q4_0/Q8_0/hF16)': the GGUF type of attn/mlp/head; '*' when some layers use another."""
        types = "/".join(self.gguf_type(self.bits[g]) for g in REQUIRED_GROUPS)
        if "head" in self.bits:
            types += f"/h{self.gguf_type(self.bits['head'])}"
        parts = [self.method, types + ("*" if grid_fallback else "")]
        if self.overrides:
            parts.append(f"+{len(self.overrides)} overrides")
        return f"quant({' '.join(parts)})"

    @property
    def bnb_mode(self) -> str:
        """'int8', 'nf4' or 'fp4': what bitsandbytes builds for this spec's quantized layers."""
        return "int8" if set(self.integer_bits()) == {8} else self.bnb_4bit_type


def _default_methods() -> tuple[str, ...]:
    return (NO_QUANTIZATION,) + tuple(QUANT_METHODS)


@dataclass(frozen=True)
class QuantSpace(DictSpec):
    """The ranges `suggest` samples from; a study file may narrow any of them."""

    enabled: bool = True
    methods: tuple[str, ...] = field(default_factory=_default_methods)  # "none" lets a trial skip the stage
    device: str = "cpu"  # where candidates are built: methods that cannot run there are left out
    bits: tuple[int, ...] = GRID_BITS[COMPRESSED_TENSORS_GRID]  # grid-method choices for attn and mlp
    mixed: bool = True  # attn and mlp bits chosen independently (else one choice for both)
    head_bits: tuple[int | None, ...] = (None, FLOAT_BITS, 8, 4)  # None leaves head and embedding untouched
    group_sizes: tuple[int | None, ...] = GROUP_SIZES
    # Symmetric only by default: an asymmetric candidate exports only when all its quantized layers share
    # one format (see export); add False to search asymmetric grids too.
    symmetric: tuple[bool, ...] = (True,)
    bnb_modes: tuple[str, ...] = BNB_MODES
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    grid: str = COMPRESSED_TENSORS_GRID  # the storage scheme; set by the deployment target, not searched

    def __post_init__(self):
        check_bool("QuantSpace.enabled", self.enabled)
        check_member(SCHEMES)("QuantSpace.grid", self.grid)
        check_choices("QuantSpace.methods", self.methods, check_member((NO_QUANTIZATION,) + tuple(QUANT_METHODS)))
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            _fail("QuantSpace.device", f"{self.device!r} is not a torch device (cpu, cuda, cuda:N)")
        bits = GRID_BITS.get(self.grid, BITS)
        check_choices("QuantSpace.bits", self.bits, check_member(bits))
        check_choices("QuantSpace.head_bits", self.head_bits, check_member((None,) + bits), allow_empty=True)
        check_choices("QuantSpace.group_sizes", self.group_sizes, check_member(GROUP_SIZES))
        check_choices("QuantSpace.symmetric", self.symmetric, check_bool)
        check_choices("QuantSpace.bnb_modes", self.bnb_modes, check_member(BNB_MODES))
        check_bool("QuantSpace.mixed", self.mixed)


def method_runs_on(method: str, device: str) -> bool:
    """Whether a method can build and run a candidate on a device (checked before any trial)."""
    return QUANT_METHODS[method].runs_on(device)


def available_methods(space: QuantSpace) -> tuple[str, ...]:
    """The space's methods that can run on its device, in the space's order ("none" always can)."""
    return tuple(m for m in space.methods if m == NO_QUANTIZATION or method_runs_on(m, space.device))
