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

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from search_spaces.quantization.constants import DEFAULT_GRID, FLOAT_BITS, GROUP_SIZES
from search_spaces.quantization.methods.base import QUANT_METHODS, QuantMethod
from search_spaces.quantization.schemes import STORAGE_SCHEMES, StorageScheme, scheme_named
from search_spaces.specs import (DictSpec, SpecError, check_bool, check_choices, check_float, check_fraction,
                                 check_int, check_member, is_one_of, shown)

NO_QUANTIZATION = "none"  # a space choice: the trial skips the quantization stage
GROUPS = ("attn", "mlp", "head")
REQUIRED_GROUPS = ("attn", "mlp")
BNB_4BIT_TYPES = ("nf4", "fp4")
BNB_MODES = ("int8",) + BNB_4BIT_TYPES


def _fail(where: str, message: str):
    raise SpecError(f"{where}: {message}")


def method_named(name: str) -> QuantMethod:
    return QUANT_METHODS[name]


def known_bits() -> tuple[int, ...]:
    """Every bit-width some registered method builds (16, float, included)."""
    return tuple(sorted(set().union(*(m.bits for m in QUANT_METHODS.values()))))


def known_group_sizes() -> tuple[int | None, ...]:
    """Every group size some registered storage scheme holds (None: per output channel)."""
    return tuple(dict.fromkeys(GROUP_SIZES + tuple(g for s in STORAGE_SCHEMES.values() for g in s.group_sizes)))


@dataclass(frozen=True)
class LayerOverride(DictSpec):
    pattern: str  # fnmatch glob on the qualified module name, e.g. "model.layers.0.*"
    bits: int

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            _fail("LayerOverride.pattern", "must be a non-empty glob such as 'model.layers.0.*'")
        check_member(known_bits())("LayerOverride.bits", self.bits)


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


# Which GGML types a per-tensor allocation may choose from (methods that store each tensor in a runtime's own
# type, e.g. llama.cpp's quantizer): every type, the 32-wide legacy ones only (the fastest to decode on a CPU),
# or the 256-wide K-quants (with Q8_0).
ALLOCATION_TYPES = ("all", "legacy", "k")


@dataclass(frozen=True)
class AllocationSettings(DictSpec):
    bpw: float = 5.0  # bits per weight over the tensors allocated (what the bytes may reach, never more)
    types: str = "all"  # ALLOCATION_TYPES
    # Weight of the predicted decode time against the predicted KL (KL per unit of decode ratio): 0 spends the
    # bytes on accuracy alone; higher values buy speed with accuracy (faster types where they cost little).
    speed: float = 0.0
    exclude: tuple[str, ...] = ()  # type names never chosen (e.g. the grids a model's weights came from)
    samples: int = 16  # calibration windows for the importance matrix and the sensitivities
    seq_len: int = 256
    # The fraction of the study's memory budget the allocation aims at (None: `bpw` as sampled). The planner
    # resolves `bpw` from it on the candidate's own shapes before building (`Technique.aim`): the most bits per
    # weight whose stored bytes stay within fill x the budget. A recipe holds both; a rebuild uses `bpw`.
    fill: float | None = None
    # The decode ratio (to the candidate's own float GGUF) the allocation's predicted decode must stay within: the
    # planner sets it from a latency budget. The decode term's weight is raised from `speed` until it does.
    decode: float | None = None
    # The type per GGUF tensor of the file that was measured ([[tensor, type], ...]; written into a recipe from
    # what was read back from that file): a rebuild quantizes to exactly these instead of solving the allocation
    # again, which on another machine (another cache, other decode costs) could choose other types.
    pinned: tuple[tuple[str, str], ...] = ()
    # Whether a tensor may take a type with error-compensated (GPTQ) codes, ``<type>+gptq``, where its tables
    # predict less KL than llama.cpp's own rounding in the same bytes (targets/llamacpp/compensated.py). It adds
    # about 1.2x the tables' own time per candidate shape (docs/benchmarks.md section 12).
    compensate: bool = True
    # At most this many measured moves refining the allocation by KL on calibration windows (0: none; each is
    # a forward pass from the first layer a move changes: targets/llamacpp/refine.py).
    refine: int = 0

    def __post_init__(self):
        check_float(1.0, 32.0)("AllocationSettings.bpw", self.bpw)
        check_bool("AllocationSettings.compensate", self.compensate)
        check_int(0)("AllocationSettings.refine", self.refine)
        if not all(len(pair) == 2 and all(isinstance(v, str) and v for v in pair) for pair in self.pinned):
            _fail("AllocationSettings.pinned", "expected a list of [tensor name, type name] pairs")
        if self.fill is not None:
            check_fraction("AllocationSettings.fill", self.fill)
        if self.decode is not None:
            check_float(0.0, 1e6, low_open=True)("AllocationSettings.decode", self.decode)
        check_float(0.0, 1e6)("AllocationSettings.speed", self.speed)
        if not isinstance(self.exclude, tuple) or not all(isinstance(k, str) and k for k in self.exclude):
            _fail("AllocationSettings.exclude", "expected a list of type names, e.g. ['Q4_1']")
        check_member(ALLOCATION_TYPES)("AllocationSettings.types", self.types)
        check_int(1)("AllocationSettings.samples", self.samples)
        check_int(8)("AllocationSettings.seq_len", self.seq_len)


@dataclass(frozen=True)
class AllocationSpace(DictSpec):
    """The allocation's knobs a study searches: its byte target, the type family it chooses from, and how much
    predicted decode time weighs against predicted KL."""

    bpw: tuple[float, ...] = (4.5, 4.75, 5.0, 5.25, 5.5, 6.0, 6.5, 7.0)
    types: tuple[str, ...] = ALLOCATION_TYPES
    speed: tuple[float, ...] = (0.0, 0.1, 1.0)
    compensate: tuple[bool, ...] = (True,)  # [false] or [true, false]: compensated codes may be chosen
    refine: tuple[int, ...] = (0,)  # measured moves after the allocation (AllocationSettings.refine)
    exclude: tuple[str, ...] = ()  # not searched: every candidate leaves these types out
    samples: int = 16
    seq_len: int = 256
    # Under a memory budget the byte target is a fraction of the budget (what is left of it after the stages
    # before is the candidate's own business: `aim` resolves it on its shapes), sampled in place of `bpw`:
    # the quantization-only answer to "weights <= B" is the first seed. Empty: `bpw` is sampled regardless.
    fill: tuple[float, ...] = (1.0, 0.9, 0.8)
    budgeted: bool = False  # set by the planner when the study has a memory budget (Technique.fit_budget)
    decode_budget: float | None = None  # set by the planner from a latency budget: every allocation's `decode`

    def __post_init__(self):
        check_choices("AllocationSpace.bpw", self.bpw, check_float(1.0, 32.0))
        check_choices("AllocationSpace.fill", self.fill, check_fraction, allow_empty=True)
        check_bool("AllocationSpace.budgeted", self.budgeted)
        if self.decode_budget is not None:
            check_float(0.0, 1e6, low_open=True)("AllocationSpace.decode_budget", self.decode_budget)
        check_choices("AllocationSpace.speed", self.speed, check_float(0.0, 1e6))
        check_choices("AllocationSpace.compensate", self.compensate, check_bool)
        check_choices("AllocationSpace.refine", self.refine, check_int(0))
        check_choices("AllocationSpace.types", self.types, check_member(ALLOCATION_TYPES))
        AllocationSettings(exclude=self.exclude, samples=self.samples, seq_len=self.seq_len)


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
    allocation: AllocationSettings = field(default_factory=AllocationSettings)  # per-tensor allocating methods
    overrides: tuple[LayerOverride, ...] = ()
    # The storage scheme the grid methods round onto, by its registered name (schemes/): compressed-tensors
    # (transformers, vLLM) or gguf (llama.cpp: fixed blocks of 32, fp16 scales); the deployment target chooses it.
    grid: str = DEFAULT_GRID

    def __post_init__(self):
        check_member(tuple(QUANT_METHODS))("QuantSpec.method", self.method)
        if not isinstance(self.bits, dict):
            _fail("QuantSpec.bits", f"expected a mapping of group to bits, got {type(self.bits).__name__}")
        for group in self.bits:
            check_member(GROUPS)(f"QuantSpec.bits.{group}", group)
        for group in REQUIRED_GROUPS:
            if group not in self.bits:
                _fail(f"QuantSpec.bits.{group}", "missing (attn and mlp are required; 16 leaves them in float)")
        check_member(tuple(STORAGE_SCHEMES))("QuantSpec.grid", self.grid)
        method = self.quant_method
        self._check_rounds_onto(method)
        for group, bits in self.bits.items():
            self._check_bits(f"QuantSpec.bits.{group}", bits, method)
        if "head" in self.bits and not method.sets_head:
            _fail("QuantSpec.bits.head", f"{self.method} leaves the LM head and embedding alone")
        check_member(known_group_sizes())("QuantSpec.group_size", self.group_size)
        check_bool("QuantSpec.symmetric", self.symmetric)
        check_member(BNB_4BIT_TYPES)("QuantSpec.bnb_4bit_type", self.bnb_4bit_type)
        if not isinstance(self.gptq, GPTQSettings):
            _fail("QuantSpec.gptq", f"expected GPTQSettings, got {type(self.gptq).__name__}")
        if not isinstance(self.allocation, AllocationSettings):
            _fail("QuantSpec.allocation", f"expected AllocationSettings, got {type(self.allocation).__name__}")
        if not isinstance(self.overrides, tuple) or not all(isinstance(o, LayerOverride) for o in self.overrides):
            _fail("QuantSpec.overrides", "expected a list of {pattern, bits} overrides")
        for index, override in enumerate(self.overrides):
            self._check_bits(f"QuantSpec.overrides[{index}].bits", override.bits, method)
        if method.grid and self.integer_bits():
            self._check_grid_settings(self.storage_scheme)
        method.check(self)

    def _check_rounds_onto(self, method: QuantMethod) -> None:
        # A library method (bnb, dynamic-int8) stores its own layers: its specs keep the default grid.
        if method.accepts(self.storage_scheme):
            return
        onto = ", ".join(name for name, scheme in STORAGE_SCHEMES.items() if method.rounds_onto(scheme))
        why = f"it rounds onto {onto}" if onto else "it stores its own layers"
        _fail("QuantSpec.grid", f"{self.method} does not round onto {self.grid} grids ({why})")

    def _check_grid_settings(self, scheme: StorageScheme) -> None:
        if self.group_size not in scheme.group_sizes:
            _fail("QuantSpec.group_size", f"{self.grid} grids take group sizes {shown(scheme.group_sizes)}, "
                                          f"got {self.group_size!r}")
        if self.symmetric not in scheme.symmetric:
            _fail("QuantSpec.symmetric", f"{self.grid} grids take symmetric {shown(scheme.symmetric)}, "
                                         f"got {self.symmetric!r}")

    def _check_bits(self, where: str, bits, method: QuantMethod) -> None:
        allowed = method.bits_on(self.storage_scheme)
        if not is_one_of(bits, allowed):
            grid = f" on {self.grid} grids" if method.grid else ""
            _fail(where, f"expected one of {shown(allowed)} for {method.name}{grid}, got {bits!r}")

    @property
    def quant_method(self) -> QuantMethod:
        return QUANT_METHODS[self.method]

    @property
    def storage_scheme(self) -> StorageScheme:
        return scheme_named(self.grid)

    def integer_bits(self) -> list[int]:
        """Every bit-width below 16 that the spec uses, groups and overrides alike."""
        values = list(self.bits.values()) + [o.bits for o in self.overrides]
        return [b for b in values if b < FLOAT_BITS]

    def bits_label(self, name: Callable[[int], str] = str) -> str:
        """'4/4/h16': attn/mlp(/head) bits, each written by `name` (a scheme may name its grids, 'Q4_0')."""
        label = "/".join(name(self.bits[g]) for g in REQUIRED_GROUPS)
        return label + (f"/h{name(self.bits['head'])}" if "head" in self.bits else "")

    def summary(self, grid_fallback: bool = False) -> str:
        """A short label such as 'quant(gptq 4/4/h16 g128)' or 'quant(rtn Q4_0/Q8_0/hF16)' for tables and logs;
        `grid_fallback` marks a group size some layers cannot use ('g128*': those use another)."""
        method = self.quant_method
        grid = self.storage_scheme.spec_label(self, grid_fallback) if method.grid else method.storage_label(self)
        parts = [self.method, *method.mode_label(self), *grid]
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
    bits: tuple[int, ...] = STORAGE_SCHEMES[DEFAULT_GRID].stored_bits  # grid-method choices for attn and mlp
    mixed: bool = True  # attn and mlp bits chosen independently (else one choice for both)
    head_bits: tuple[int | None, ...] = (None, FLOAT_BITS, 8, 4)  # None leaves head and embedding untouched
    group_sizes: tuple[int | None, ...] = GROUP_SIZES
    # Symmetric only by default: an asymmetric candidate exports only when all its quantized layers share
    # one format (see export); add False to search asymmetric grids too.
    symmetric: tuple[bool, ...] = (True,)
    bnb_modes: tuple[str, ...] = BNB_MODES
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    allocation: AllocationSpace = field(default_factory=AllocationSpace)
    grid: str = DEFAULT_GRID  # the storage scheme; set by the deployment target (fit_to_scheme), not searched

    def __post_init__(self):
        check_bool("QuantSpace.enabled", self.enabled)
        check_member(tuple(STORAGE_SCHEMES))("QuantSpace.grid", self.grid)
        check_choices("QuantSpace.methods", self.methods, check_member((NO_QUANTIZATION,) + tuple(QUANT_METHODS)))
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            _fail("QuantSpace.device", f"{self.device!r} is not a torch device (cpu, cuda, cuda:N)")
        storage = scheme_named(self.grid)
        bits = storage.stored_bits
        check_choices("QuantSpace.bits", self.bits, check_member(bits))
        check_choices("QuantSpace.head_bits", self.head_bits, check_member((None,) + bits), allow_empty=True)
        check_choices("QuantSpace.group_sizes", self.group_sizes, check_member(known_group_sizes()))
        check_choices("QuantSpace.symmetric", self.symmetric, check_bool)
        for name, given, held in (("group_sizes", self.group_sizes, storage.group_sizes),
                                  ("symmetric", self.symmetric, storage.symmetric)):
            outside = [v for v in given if v not in held]
            if outside:
                _fail(f"QuantSpace.{name}", f"the {self.grid} grid holds {shown(tuple(held))}, not "
                                            f"{shown(tuple(outside))}")
        check_choices("QuantSpace.bnb_modes", self.bnb_modes, check_member(BNB_MODES))
        check_bool("QuantSpace.mixed", self.mixed)


def method_runs_on(method: str, device: str) -> bool:
    """Whether a method can build and run a candidate on a device (checked before any trial)."""
    return QUANT_METHODS[method].runs_on(device)


def available_methods(space: QuantSpace) -> tuple[str, ...]:
    """The space's methods that can run on its device and store on its grid, in the space's order ("none"
    always can)."""
    scheme = scheme_named(space.grid)
    return tuple(m for m in space.methods if m == NO_QUANTIZATION
                 or (method_runs_on(m, space.device) and QUANT_METHODS[m].accepts(scheme)))


def fit_to_scheme(space: QuantSpace, scheme: str) -> QuantSpace:
    """`space` reduced to what a target storing on `scheme` deploys: "none" and the methods that round onto the
    scheme (`QuantMethod.rounds_onto`), and the bits, head bits, group sizes and symmetries it holds (the
    scheme's own where none of the space's does). What deployment targets call: they never name methods."""
    storage = scheme_named(scheme)

    def kept(given: tuple, allowed: tuple) -> tuple:
        return tuple(c for c in given if c in allowed) or tuple(allowed)

    methods = tuple(m for m in space.methods if m == NO_QUANTIZATION or QUANT_METHODS[m].rounds_onto(storage))
    return replace(space, methods=methods or (NO_QUANTIZATION,), bits=kept(space.bits, storage.stored_bits),
                   head_bits=tuple(b for b in space.head_bits if b is None or b in storage.stored_bits),
                   group_sizes=kept(space.group_sizes, storage.group_sizes),
                   symmetric=kept(space.symmetric, storage.symmetric), grid=storage.name)


def scheme_space_defaults(scheme: str) -> dict:
    """The QuantSpace fields a target storing on `scheme` starts a study file from (the file may narrow them):
    every bit-width and group size the scheme holds, the default head bits and symmetry it holds."""
    storage, default = scheme_named(scheme), QuantSpace()
    return {"grid": storage.name, "bits": list(storage.stored_bits), "group_sizes": list(storage.group_sizes),
            "head_bits": [b for b in default.head_bits if b is None or b in storage.stored_bits],
            "symmetric": [s for s in default.symmetric if s in storage.symmetric] or list(storage.symmetric)}
