"""`llama-quant`: llama.cpp's own quantizer with a type per tensor, chosen by an allocation under a byte target.

A candidate of this method is built in three steps:
1. here, on the candidate actually quantized (after pruning or distillation), from the study's calibration text:
   its importance matrix (imatrix.importance_matrix, what llama-imatrix collects), each tensor's error in
   every type of the spec's family (sensitivity.type_options, through llama.cpp's quantizer) and each
   tensor's KL gain (sensitivity.kl_gains); then the allocation (search_spaces.quantization.allocation) picks
   the type per tensor with the least predicted KL whose bytes stay within ``bpw`` bits per weight. The
   weights in torch are not changed: the plan rides on the model (`PLAN_ATTRIBUTE`).
2. the llama.cpp target writes the float GGUF and has llama.cpp quantize it: the planned type per tensor
   (tt_overrides), the importance matrix, llama-quantize's metadata (writer.write).
3. the target measures the written file like any candidate (latency A/B, KL, perplexity); the types read back
   from it are what the recipe and the review show.

The tied embedding is quantized in place and stays shared, as llama.cpp does. Sensitivities and importance
matrix are cached per source model, upstream stages and calibration tokens (the slow part: seconds per
tensor on a large model; every later trial of that shape reuses them); the per-type decode costs per source model
and decode thread count (a cost model shared by its shapes; they do not depend on the calibration text).
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from torch import nn

from search_spaces.base import BuildContext, Params
from search_spaces.calibration import calibration_batches
from search_spaces.quantization.allocation import Option, allocate
from search_spaces.quantization.methods.base import QuantMethod, register_method
from search_spaces.quantization.spec import AllocationSettings, QuantSpace, QuantSpec
from search_spaces.specs import SpecError
from search_spaces.quantization.plan import LayerPlan
from targets.llamacpp import sensitivity
from targets.llamacpp.carried import SourceTables, carried_from, carries
from targets.llamacpp.block_formats import COMPENSABLE
from targets.llamacpp.compensated import (FactorCache, FactorStore, base_kind, block_of, compensable,
                                          compensated_kind, compensated_round, is_compensated, layer_by_layer)
from targets.llamacpp.imatrix import CALIBRATION_DATASET, importance_matrix
from targets.llamacpp.quantize import FLOAT_TYPES, fallback_type, quant_type, type_bytes
from targets.llamacpp import writer
from targets.llamacpp.writer import PLAN_ATTRIBUTE  # the plan rides on the model under this name

NOMINAL_BITS = 4  # spec.bits of an allocation (checked like any spec; the types themselves are per tensor)
# spec.bits["head"]: the head and embedding are allocated too; 16 keeps a tied head shared in the layer plan
HEAD_BITS = 16
KL_WINDOWS = 2  # calibration windows each tensor's KL gain is measured on (one forward pass per tensor)
# the llama-quantize preset a file whose tensors are mostly of a type is named after
FILE_TYPES = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "IQ4_XS": "IQ4_XS", "Q4_0": "Q4_0", "IQ4_NL": "IQ4_NL",
              "Q4_K": "Q4_K_M", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_K": "Q5_K_M", "Q5_1": "Q5_1", "Q6_K": "Q6_K",
              "Q8_0": "Q8_0"}


@dataclass
class TypePlan:
    """What llama.cpp is asked for: a type per GGUF tensor, the importance matrix, and what was predicted."""

    types: dict[str, str]  # GGML types: what llama.cpp is asked to write
    imatrix: dict[str, np.ndarray]
    calibration_tokens: int
    chunk_size: int
    predicted_kl: float | None  # None where the types were pinned by a recipe, not chosen
    bytes: int
    predicted_decode: float | None = None  # the decode ratio to the float GGUF the cost model predicts
    dataset: str = "planner calibration windows"
    # tensors written with error-compensated codes: their blocks (rows x row bytes), in their planned type, put in
    # place of what llama.cpp wrote for them
    compensated: dict[str, np.ndarray] = field(default_factory=dict)
    refinement: dict | None = None  # what refining by measured KL did (refine.Refinement.report), if it ran
    carried: tuple[str, ...] = ()  # parts of the tables carried from the source model's (carried.py)
    carriable_seconds: float = 0.0  # what the parts a large derived candidate carries took to compute here
    tables_seconds: float = 0.0  # what this shape's sensitivity tables took here (computed, or read back)

    def ftype(self) -> str:
        """llama-quantize's file type naming the mixture (`general.file_type`): that of the type most tensors
        hold. Every quantizable tensor is named by an override, so it types nothing itself."""
        return FILE_TYPES[Counter(self.types.values()).most_common(1)[0][0]]


class LlamaQuant(QuantMethod):
    name = "llama-quant"
    bits = (NOMINAL_BITS, HEAD_BITS)
    sets_head = True
    keeps_weights = True  # the model goes out as it came in, with its type plan beside (llama.cpp rounds the file)

    def rounds_onto(self, scheme) -> bool:
        return scheme.name == "gguf"  # it writes llama.cpp's own types: only where the artifact is a GGUF

    def accepts(self, scheme) -> bool:
        return self.rounds_onto(scheme)

    def suggest(self, trial, space: QuantSpace, choose) -> QuantSpec:
        options = space.allocation
        if options.budgeted:  # a share of the memory budget; `aim` turns it into bits per weight on the shapes
            fill, bpw = choose(trial, self.param("fill"), options.fill), max(options.bpw)
        else:
            fill, bpw = None, choose(trial, self.param("bpw"), options.bpw)
        types = choose(trial, self.param("types"), options.types)
        speed = choose(trial, self.param("speed"), options.speed)
        compensate = choose(trial, self.param("compensate"), options.compensate)
        refine = choose(trial, self.param("refine"), options.refine)
        return QuantSpec(method=self.name, bits={"attn": NOMINAL_BITS, "mlp": NOMINAL_BITS, "head": HEAD_BITS},
                         grid=space.grid, group_size=32,
                         allocation=AllocationSettings(bpw=bpw, types=types, speed=speed, exclude=options.exclude,
                                                       samples=options.samples, seq_len=options.seq_len, fill=fill,
                                                       decode=options.decode_budget, compensate=compensate,
                                                       refine=refine))

    def _size(self, space: QuantSpace, bpw: float | None = None, fill: float | None = None) -> Params:
        """The parameter naming an allocation's byte target: its share of the budget in a budgeted space, else bpw."""
        if space.allocation.budgeted:
            return {self.param("fill"): max(space.allocation.fill) if fill is None else fill}
        return {self.param("bpw"): bpw}

    def presets(self, space: QuantSpace) -> list[Params]:
        """Under a memory budget, the whole budget spent: the answer to "weights <= B" from quantization alone,
        first (a smaller share is the sampler's: where the weights need less, e.g. on their own grid, it is the same
        file). Otherwise allocations at the sizes of llama.cpp's Q4_K_M and Q5_K_M on a 576-wide model (about 6.2
        and 6.6 bits per weight) and of Q4_0 (4.5): the presets a llama.cpp user compares against."""
        options, chosen = space.allocation, []
        sizes = ([self._size(space, fill=max(options.fill))] if options.budgeted
                 else [self._size(space, bpw=min(options.bpw, key=lambda b: abs(b - t))) for t in (4.5, 5.5, 6.5)])
        for size in sizes:
            params = {**size, self.param("types"): options.types[0], self.param("speed"): min(options.speed),
                      self.param("compensate"): options.compensate[0], self.param("refine"): options.refine[0]}
            if params not in chosen:
                chosen.append(params)
        return chosen

    def smallest(self, space: QuantSpace) -> list[Params]:
        """The least bpw (or share of the budget) in each type family; in a budgeted space only the widest family
        where the space holds it ("all": its smallest types are the least of every family's), so a shape seeded
        with its smallest candidates is seeded with one allocation, not one per family."""
        options = space.allocation
        size = self._size(space, bpw=min(options.bpw), fill=min(options.fill) if options.budgeted else None)
        families = ("all",) if options.budgeted and "all" in options.types else options.types
        return [{**size, self.param("types"): t, self.param("speed"): min(options.speed),
                 self.param("compensate"): options.compensate[0], self.param("refine"): options.refine[0]}
                for t in families]

    def mode_label(self, spec: QuantSpec) -> list[str]:
        settings = spec.allocation
        speed = [f"speed {settings.speed:g}"] if settings.speed else []
        speed += [f"decode<={settings.decode:g}x"] if settings.decode is not None else []
        rounding = ["gptq"] if settings.compensate else []  # compensated codes allowed: beside the type family
        exclude = [f"-{','.join(settings.exclude)}"] if settings.exclude else []
        exclude += [f"refine {settings.refine}"] if settings.refine else []
        size = (f"{settings.bpw:.2f}bpw={settings.fill:.0%}budget" if settings.fill is not None
                else f"{settings.bpw:g}bpw")
        return [size, settings.types, *rounding, *exclude, *speed]

    def aim(self, spec: QuantSpec, size_of, limit: float) -> QuantSpec:
        """`bpw` resolved from `fill`: the most bits per weight (to 1/1000) whose exact stored bytes on the
        candidate's shapes stay within fill x `limit`; the smallest allowed when even that is over (the spec is
        then over the budget, and rejected unbuilt like any other)."""
        settings = spec.allocation
        if settings.fill is None:
            return spec

        def at(bpw: float) -> QuantSpec:
            return replace(spec, allocation=replace(settings, bpw=bpw))

        target, low, high = settings.fill * limit, 1000, 32000  # thousandths of a bit per weight
        if size_of(at(high / 1000)) <= target:
            return at(high / 1000)
        while high - low > 1:  # size_of is non-decreasing in bpw: the largest bpw whose bytes fit
            middle = (low + high) // 2
            if size_of(at(middle / 1000)) <= target:
                low = middle
            else:
                high = middle
        return at(low / 1000)

    def pin(self, spec: QuantSpec, measurements: dict) -> QuantSpec:
        """The types read back from the measured file, per tensor (`measurements.runtime.tensor_types`)."""
        runtime = measurements.get("runtime") or {}
        written = runtime.get("tensor_types")
        if not written:
            return spec
        compensated = set(runtime.get("compensated_tensors") or ())
        pinned = {n: compensated_kind(k) if n in compensated else k for n, k in written.items()}
        return replace(spec, allocation=replace(spec.allocation, pinned=tuple(sorted(pinned.items()))))

    def check(self, spec: QuantSpec) -> None:
        if not menu_of(spec.allocation):
            raise SpecError(f"QuantSpec.allocation.exclude: leaves no type of the {spec.allocation.types} family")

    def storage_label(self, spec: QuantSpec) -> list[str]:
        return []  # the types are per tensor, read back from the written file (measurements.runtime)

    def quantized_layers(self, layers: tuple[LayerPlan, ...], spec: QuantSpec, device) -> list[LayerPlan]:
        """Every decoder linear layer, the head and the embedding: llama.cpp quantizes them all."""
        return [p for p in layers if p.group in ("attn", "mlp", "head", "embed")]

    def layer_bytes(self, plan: LayerPlan, spec: QuantSpec, device) -> int:
        """At most ``bpw`` bits per weight (the allocation's byte target), and never less than the family's
        smallest type: an upper bound of the bytes written, so a memory budget rejects nothing that fits
        for a reason other than this bound. A tied head is the embedding: counted once."""
        if plan.shared_with is not None:
            return 0
        shape = (plan.out_features, plan.in_features)
        smallest = min(type_bytes(fallback_type(k, shape[1]), shape) for k in menu_of(spec.allocation))
        return max(int(np.ceil(spec.allocation.bpw * shape[0] * shape[1] / 8)), smallest) + plan.bias_bytes

    def export_blocker(self, model, spec: QuantSpec) -> str | None:
        return "llama-quant stores llama.cpp types, which only a GGUF holds"

    def build(self, model: nn.Module, spec: QuantSpec, context: BuildContext) -> nn.Module:
        settings = spec.allocation
        windows = calibration_batches(context.tokenizer, context.calibration, settings.samples, settings.seq_len,
                                      context.seed)
        if settings.pinned:
            setattr(model, PLAN_ATTRIBUTE, pinned_plan(model, settings, windows, context))
            return model
        started = time.perf_counter()
        tables = sensitivity_tables(model, windows, context, settings.compensate)
        tables_seconds = time.perf_counter() - started
        weights = sum(t["size"] for t in tables["tensors"].values())
        costs = decode_costs(model, context) if settings.speed or settings.decode else None
        byte_target = settings.bpw * weights / 8
        chosen = choose_types(tables, menu_of(settings), byte_target, costs, settings.speed,
                              settings.exclude, settings.decode, settings.compensate)
        compensator = CompensatedBlocks(model, windows, context, tables["imatrix"])
        refinement = None
        if settings.refine:
            refinement = refined(model, tables, chosen, byte_target, windows, compensator, settings, costs)
            chosen = refinement.chosen
        kinds = {name: o.kind for name, o in chosen.items()}
        setattr(model, PLAN_ATTRIBUTE, TypePlan(
            types={name: base_kind(k) for name, k in kinds.items()}, imatrix=tables["imatrix"],
            compensated=compensator.of(kinds), calibration_tokens=int(windows.numel()), chunk_size=settings.seq_len,
            predicted_kl=float(sum(tables_kl(tables, chosen))), bytes=sum(o.bytes for o in chosen.values()),
            predicted_decode=None if costs is None else predicted_decode(tables, chosen, costs),
            dataset=CALIBRATION_DATASET.format(samples=settings.samples, seq_len=settings.seq_len),
            refinement=None if refinement is None else refinement.report(), carried=tuple(tables["carried"]),
            carriable_seconds=tables["carriable_seconds"], tables_seconds=tables_seconds))
        return model


def pinned_plan(model: nn.Module, settings: AllocationSettings, windows, context: BuildContext) -> TypePlan:
    """The plan of a recipe's pinned types: each quantizable tensor in the type the measured file held, with the
    importance matrix of the same calibration tokens; no allocation solved, no decode costs timed. A pinned name
    the candidate does not quantize must be a float one (its norms); a quantizable tensor must be pinned."""
    imatrix = cached_imatrix(model, windows, context)
    tensors = {t.gguf_name: t for t in sensitivity.quantizable(model, imatrix)}
    pinned = dict(settings.pinned)
    missing = sorted(set(tensors) - set(pinned))
    stray = sorted(n for n, kind in pinned.items() if n not in tensors and kind not in FLOAT_TYPES)
    problems = ([f"no type for {missing[0]}"] if missing else []) + ([f"{stray[0]} is not quantized here"] if stray
                                                                     else [])
    if problems:
        raise SpecError(f"QuantSpec.allocation.pinned: {'; '.join(problems)} (the types of another model's shape)")
    kinds = {name: pinned[name] for name in tensors}
    types = {name: base_kind(kind) for name, kind in kinds.items()}
    for name, kind in types.items():
        quant_type(kind)  # a type llama.cpp knows, or its error
        if is_compensated(kinds[name]) and (name == "token_embd.weight" or not compensable(kind)):
            raise SpecError(f"QuantSpec.allocation.pinned: {name} cannot be {kinds[name]} (compensated codes are "
                            f"written for matmul weights in {', '.join(COMPENSABLE)})")
    return TypePlan(types=types, imatrix=imatrix, compensated=CompensatedBlocks(model, windows, context, imatrix).of(kinds), calibration_tokens=int(windows.numel()), chunk_size=settings.seq_len,
                    predicted_kl=None, bytes=sum(type_bytes(types[n], t.shape) for n, t in tensors.items()),
                    dataset=CALIBRATION_DATASET.format(samples=settings.samples, seq_len=settings.seq_len))


def menu_of(settings: AllocationSettings) -> list[str]:
    """The types an allocation chooses from: its family's, less those excluded."""
    return [k for k in sensitivity.MENUS[settings.types] if k not in settings.exclude]


# The largest weight of predicted decode against predicted KL a decode target may push the choice to.
MOST_SPEED = 1e6


def choose_types(tables: dict, menu, byte_target: float, costs: dict[str, float] | None = None,
                 speed: float = 0.0, exclude=(), decode_target: float | None = None,
                 compensate: bool = True) -> dict[str, Option]:
    """Per tensor the option (type written, bytes, score) of the least predicted KL + `speed` x predicted
    decode ratio within `byte_target` bytes, among `menu`'s types as llama.cpp writes them on each tensor's
    row width, less the `exclude`d types also where llama.cpp would fall back to them (Q5_K is written as
    Q5_1 on 576-wide rows); a tensor left with no type keeps its written ones. `costs`: the decode ratio of
    the whole model in each type (decode_costs); a tensor's share of it is its share of the weights. Without
    `compensate`, options with error-compensated codes (``<type>+gptq``) are left out.

    With `decode_target` (a decode ratio to the candidate's float GGUF), the weight of the decode term is raised
    from `speed` (a bisection) to the least that brings the predicted decode within it: the least accurate
    choice that is fast enough, not the fastest. Where even the fastest types are not, the fastest choice."""
    def _weighed(*args):
        return _weighed_options(*args, compensate)

    chosen = _weighed(tables, menu, byte_target, costs, speed, exclude)
    if decode_target is None or costs is None or predicted_decode(tables, chosen, costs) <= decode_target:
        return chosen
    low, high = speed, max(speed, 1e-3)
    while True:
        fast = _weighed(tables, menu, byte_target, costs, high, exclude)
        if predicted_decode(tables, fast, costs) <= decode_target or high >= MOST_SPEED:
            break
        low, high = high, high * 4
    for _ in range(40):  # the least weight whose choice is within the target
        middle = (low + high) / 2
        candidate = _weighed(tables, menu, byte_target, costs, middle, exclude)
        if predicted_decode(tables, candidate, costs) <= decode_target:
            high, fast = middle, candidate
        else:
            low = middle
    return fast


def _weighed_options(tables: dict, menu, byte_target: float, costs: dict[str, float] | None, speed: float,
                     exclude, compensate: bool) -> dict[str, Option]:
    return allocate(allowed_options(tables, menu, costs, speed, exclude, compensate), byte_target)


def allowed_options(tables: dict, menu, costs: dict[str, float] | None = None, speed: float = 0.0, exclude=(),
                    compensate: bool = True) -> dict[str, list[Option]]:
    """Per tensor the options an allocation chooses among (see choose_types), each scored by its predicted KL +
    `speed` x its share of the predicted decode ratio."""
    total = sum(t["size"] for t in tables["tensors"].values())
    allowed = {}
    for name, opts in tables["options"].items():
        written = {fallback_type(kind, tables["tensors"][name]["width"]) for kind in menu}
        written = (written - set(exclude)) or written
        share = tables["tensors"][name]["size"] / total
        # a type never timed (F16, on a row width no block fits) adds nothing: it is the only choice there
        allowed[name] = [Option(o.kind, o.bytes, o.error + speed * share * (costs or {}).get(base_kind(o.kind), 0.0))
                         for o in opts if base_kind(o.kind) in written and (compensate or not is_compensated(o.kind))]
    return allowed


def tables_kl(tables: dict, chosen: dict[str, Option]) -> list[float]:
    """The predicted KL of each chosen option (without the decode term the choice may have weighed)."""
    kl = {(n, o.kind): o.error for n, opts in tables["options"].items() for o in opts}
    return [kl[(n, o.kind)] for n, o in chosen.items()]


def predicted_decode(tables: dict, chosen: dict[str, Option], costs: dict[str, float]) -> float:
    total = sum(t["size"] for t in tables["tensors"].values())
    return float(sum(tables["tensors"][n]["size"] / total * costs.get(base_kind(o.kind), 1.0) for n, o in chosen.items()))


# What the per-type decode costs are timed with: short, a few rounds (a cost model, not a verdict).
COST_PROTOCOL = dict(prompt_tokens=32, new_tokens=16, warmup=1, repeats=3, seed=0, prefills=1)  # decode costs only
# A large model's decode costs are timed on a copy with only its first decoder layers (the files are zeroed, so
# only the shapes matter): at most this many parameters where the layers allow, at least COST_LEAST_LAYERS layers.
# On a 1.24 B Llama, 4 of 16 layers: the files and their timing 2.4x smaller. A type's cost is per weight (its
# kernel's), so it moves little with the depth (bench/decode_cost_depth.py measures how little).
COST_PARAMETERS = 400_000_000
COST_LEAST_LAYERS = 4


def cost_layers(model: nn.Module) -> int | None:
    """How many of the model's first decoder layers its decode costs are timed on; None: all of them."""
    from search_spaces.layers import decoder_layers

    _, blocks = decoder_layers(model)
    per_layer = sum(p.numel() for p in blocks[0].parameters())
    rest = sum(p.numel() for p in model.parameters()) - per_layer * len(blocks)
    keep = max(COST_LEAST_LAYERS, int((COST_PARAMETERS - rest) // per_layer))
    return None if keep >= len(blocks) else keep


def first_layers(model: nn.Module, count: int) -> nn.Module:
    """A copy of the model with only its first `count` decoder layers, sharing the model's tensors."""
    from search_spaces.structure.surgery import copy_modules, drop_layers

    shallow = copy_modules(model)
    drop_layers(shallow, range(count))
    return shallow


def decode_costs(model: nn.Module, context: BuildContext, layers: int | str | None = "auto") -> dict[str, float]:
    """{type: decode ratio to the float GGUF of the model with every quantizable tensor in that type, where it is
    written as that type (`written_type_costs`)}, from files timed A/B in llama.cpp with every quantizable tensor
    asked for in one type. Types llama.cpp writes as the same file on these rows (Q4_K as Q5_0 on 576-wide rows)
    are timed once. Each file is the float GGUF retyped with zeroed blocks
    (gguf_header.write_zeroed: the same tensors, types and bytes llama-quantize writes, without quantizing: the
    kernels' work does not depend on the values). A cost model: timed on the first shape of a source model that
    asks, per decode thread count, and used for every shape of it (a type's ratio to float moves little with the
    depth or width cut: the work per weight is the type's). `layers`: how many of the first decoder layers the
    files hold (`cost_layers` by default: all, but a large model's first few; None: all)."""
    import tempfile

    from evaluators.latency import LatencyProtocol
    from targets.llamacpp.gguf_header import read_header, write_zeroed
    from targets.llamacpp.runtime import serving_threads, time_many

    # timed with the runtime's default decode threads (a study's own `threads` is not known at build time); the
    # cost of a type differs with the thread count, so each count has its own cached file
    threads = serving_threads().decode
    depth = cost_layers(model) if layers == "auto" else layers
    folder = _cache_file(replace(context, upstream=()), {"costs": sorted(sensitivity.MENUS["all"]), "files": "zeroed",
                                                         "protocol": COST_PROTOCOL, "per": "type written",
                                                         **({} if depth is None else {"layers": depth})})
    cached = None if folder is None else folder / f"decode-{threads}-threads.json"
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text())
    model = model if depth is None else first_layers(model, depth)
    tensors = sensitivity.quantizable(model, {})
    widths = {t.gguf_name: t.shape[1] for t in tensors}

    def written(kind: str) -> str:  # the type llama.cpp writes for every tensor when asked for `kind`
        return json.dumps({n: fallback_type(kind, w) for n, w in widths.items()}, sort_keys=True)

    files = {}  # what is written -> the type it is timed as (one file for the types written alike)
    for kind in sensitivity.MENUS["all"]:
        files.setdefault(written(kind), kind)
    with tempfile.TemporaryDirectory(prefix="planner-decode-costs-") as work:
        source = Path(work) / "float.gguf"
        writer.write(model, context.tokenizer, source)  # built before the plan is set: written in float
        header = read_header(source)
        paths = []
        for types, kind in files.items():
            paths.append(Path(work) / f"{kind}.gguf")
            write_zeroed(source, paths[-1], json.loads(types), header)
        timings = time_many(paths, source, LatencyProtocol(**COST_PROTOCOL, threads=threads))
    timed = {types: timing.decode_ratio for types, timing in zip(files, timings)}
    costs = written_type_costs({kind: timed[written(kind)] for kind in sensitivity.MENUS["all"]},
                               {kind: json.loads(written(kind)) for kind in sensitivity.MENUS["all"]},
                               {t.gguf_name: t.size for t in tensors})
    if cached is not None:
        folder.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(costs))
    return costs


def written_type_costs(ratios: dict[str, float], written: dict[str, dict[str, str]],
                       sizes: dict[str, int]) -> dict[str, float]:
    """Per type, the decode ratio of a model all in that type where it is written: `ratios` are whole-model files'
    (type asked for -> ratio), `written` what each file held per tensor. A K-quant asked for on a model whose rows
    do not take its blocks (576-wide) is written as its fallback on most tensors (Q4_K -> Q5_0), so its file's
    ratio is mostly the fallback's; the allocation's options are types as written, and charging a Q4_K tensor
    Q5_0's time misjudged the presets' mixes by 5-10% (measured head to head). The model is linear in the tensors'
    shares of the weights (as `predicted_decode`): a file's ratio = sum of share x its written type's cost, so a
    type's own cost is its file's ratio less its fallbacks' part (each fallback's cost from its own file, which
    falls back nowhere), over its own share."""
    total = sum(sizes.values())
    costs = dict(ratios)
    for kind, types in written.items():
        own = sum(sizes[n] for n, t in types.items() if t == kind) / total
        others = {t for t in types.values() if t != kind}
        if own == 0 or not others or not all(t in ratios and set(written.get(t, {}).values()) == {t} for t in others):
            continue  # written nowhere as itself, or as something not timed on its own: the file's ratio stands
        rest = sum(sizes[n] / total * ratios[t] for n, t in types.items() if t != kind)
        costs[kind] = (ratios[kind] - rest) / own
    return costs


def _cache_file(context: BuildContext, depends: dict) -> Path | None:
    """The cache folder of what was computed on the candidate's shapes (the source model and the stages before:
    `upstream`) from `depends` (what else it was computed from)."""
    if context.cache_dir is None or not context.model_id:
        return None
    key = json.dumps({"model": context.model_id, "upstream": list(context.upstream), **depends, "version": 4},
                     sort_keys=True, default=str)
    return Path(context.cache_dir) / "llama-sensitivity" / hashlib.sha256(key.encode()).hexdigest()[:24]


def _calibration_key(windows) -> dict:
    """What the importance matrix and the sensitivities are computed from: the very calibration tokens (so another
    corpus, seed or sample count is another entry), the menu and the probe."""
    tokens = hashlib.sha256(np.ascontiguousarray(windows.cpu().numpy()).tobytes()).hexdigest()
    return {"calibration": tokens, "shape": list(windows.shape), "menu": sensitivity.MENUS["all"],
            "probe": sensitivity.PROBE}


def cached_imatrix(model: nn.Module, windows, context: BuildContext) -> dict:
    """The importance matrix of the candidate's shape on these calibration tokens: computed once, then read from
    the cache (the presets a study compares against are quantized with the one its llama-quant trials use)."""
    folder = _cache_file(context, _calibration_key(windows))
    if folder is not None and (folder / "imatrix.npz").is_file():
        with np.load(folder / "imatrix.npz") as stored:
            return {name: stored[name] for name in stored.files}
    imatrix = importance_matrix(model, windows, head=True)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "imatrix.npz", **imatrix)
    return imatrix


def _options_to_json(options: dict[str, list[Option]]) -> dict:
    return {n: [[o.kind, o.bytes, o.error] for o in opts] for n, opts in options.items()}


def _options_from_json(raw: dict) -> dict[str, list[Option]]:
    return {n: [Option(*o) for o in opts] for n, opts in raw.items()}


def sensitivity_tables(model: nn.Module, windows, context: BuildContext, compensate: bool = False) -> dict:
    """{"imatrix", "options" (predicted-KL options per tensor, every type of the full menu; with `compensate`, each
    compensable type's ``<type>+gptq`` option too), "tensors" (row width and size)}: computed once per candidate
    shape and calibration text, then read from the cache (the compensated options in a file of their own: only
    allocations that may choose them pay for them). A large derived candidate carries the KL gains and the
    compensated ratios of the source model's cached tables where they are there (carried.py: what was carried is
    noted in the folder's carried.json); its errors are always its own. "carriable_seconds": what computing those
    two parts took here, on a large source model (its derived candidates will not spend them; 0 otherwise)."""
    folder = _cache_file(context, _calibration_key(windows))
    imatrix = cached_imatrix(model, windows, context)
    spent = [0.0]  # seconds of the parts a large derived candidate carries, computed here

    def carriable(compute):
        started = time.perf_counter()
        try:
            return compute()
        finally:
            spent[0] += time.perf_counter() - started

    @functools.cache
    def source() -> SourceTables | None:  # read only where something is computed that it could carry
        return (SourceTables.read(_cache_file(replace(context, upstream=()), _calibration_key(windows)))
                if carries(model, context.upstream) else None)

    tensors, carried = None, set(_carried_parts(folder))
    if folder is not None and (folder / "table.json").is_file():
        table = json.loads((folder / "table.json").read_text())
        options = _options_from_json(table["options"])
        info, gains = table["tensors"], {n: tuple(g) for n, g in table["gains"].items()}
        errors = _options_from_json(table["errors"]) if "errors" in table else None
    else:
        tensors = sensitivity.quantizable(model, imatrix)
        errors = sensitivity.type_options(model, tensors, sensitivity.MENUS["all"])  # the probe (Q4_0) among them
        gains = source().carried_gains(list(errors)) if source() else None
        if gains is not None:
            carried.add(_note_carried(folder, source(), "gains"))
        else:
            gains = carriable(lambda: sensitivity.kl_gains(model, tensors, windows[:KL_WINDOWS]))
        options = sensitivity.predicted_kl_options(errors, gains)
        info = {t.gguf_name: {"width": t.shape[1], "size": t.size} for t in tensors}
        if folder is not None:
            (folder / "table.json").write_text(json.dumps({
                "options": _options_to_json(options), "tensors": info, "gains": gains,
                "errors": _options_to_json(errors)}))
    if compensate:
        file = None if folder is None else folder / "compensated.json"
        if file is not None and file.is_file():
            raw = _options_from_json(json.loads(file.read_text()))
        else:
            tensors = tensors or sensitivity.quantizable(model, imatrix)
            names = [t.gguf_name for t in tensors if t.gguf_name != "token_embd.weight"]  # compensable_inputs'
            raw = source().carried_compensated(errors, names) if source() and errors else None
            if raw is not None:
                carried.add(_note_carried(folder, source(), "compensated"))
            else:
                raw = carriable(lambda: _compensated_options(model, tensors, windows, folder))
            if file is not None:
                file.write_text(json.dumps(_options_to_json(raw)))
        for name, extra in sensitivity.predicted_kl_options(raw, gains).items():
            options[name] = options[name] + extra
    return {"imatrix": imatrix, "options": options, "tensors": info,
            "carried": sorted(carried if compensate else carried - {"compensated"}),
            "carriable_seconds": spent[0] if carried_from(model, context.upstream) else 0.0}


def _compensated_options(model: nn.Module, tensors, windows, folder: Path | None) -> dict:
    raw, store = {}, FactorStore(None if folder is None else factor_folder(folder))
    for covariances in sensitivity.compensable_inputs(model, tensors, windows):  # a few blocks' at a time
        raw.update(sensitivity.compensated_options(model, tensors, sensitivity.MENUS["all"], covariances, store=store))
        del covariances
    return raw


def _carried_parts(folder: Path | None) -> list[str]:
    """What the tables in `folder` carried from the source model's (carried.json), [] for tables of their own."""
    note = None if folder is None else folder / "carried.json"
    return json.loads(note.read_text())["parts"] if note is not None and note.is_file() else []


def _note_carried(folder: Path | None, source: SourceTables, part: str) -> str:
    """`part`, noted in the tables' carried.json as carried from the source model's tables."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        parts = sorted({*_carried_parts(folder), part})
        (folder / "carried.json").write_text(json.dumps({"from": source.folder.name, "parts": parts}))
    return part


def factor_folder(folder: Path) -> Path:
    """Where a shape's Hessian factors are kept (`FactorStore`), beside its compensated blocks."""
    return folder / "compensated" / "factors"


def refined(model: nn.Module, tables: dict, chosen: dict[str, Option], byte_target: float, windows,
            compensator: "CompensatedBlocks", settings: AllocationSettings, costs: dict[str, float] | None):
    """The allocation refined by measured KL (refine.py) among the same options, on the calibration windows after
    those the KL gains were measured on, within the byte target and any decode target."""
    from targets.llamacpp import ggml_quants
    from targets.llamacpp.refine import WINDOWS, refine

    allowed = allowed_options(tables, menu_of(settings), costs, settings.speed, settings.exclude, settings.compensate)
    # the allocation's choice among these options (under a decode target it was scored with another speed weight)
    chosen = {name: next(o for o in allowed[name] if o.kind == option.kind) for name, option in chosen.items()}
    kl = {(n, o.kind): o.error for n, opts in tables["options"].items() for o in opts}
    widths = {n: t["width"] for n, t in tables["tensors"].items()}
    if settings.compensate:
        compensator.prepare()  # from the float weights, before refine puts decoded ones in their place

    def decoded(name: str, kind: str, weight: np.ndarray) -> np.ndarray:
        if is_compensated(kind):
            return ggml_quants.dequantize(base_kind(kind), compensator(name, base_kind(kind), weight), widths[name])
        if kind in FLOAT_TYPES:
            return weight
        return ggml_quants.roundtrip(kind, weight, tables["imatrix"].get(name))[0]

    def fits(choice: dict[str, Option]) -> bool:
        return settings.decode is None or costs is None or predicted_decode(tables, choice, costs) <= settings.decode

    held_out = windows[KL_WINDOWS:KL_WINDOWS + WINDOWS] if len(windows) > KL_WINDOWS else windows
    return refine(model, allowed, chosen, byte_target, held_out, decoded, lambda n, o: kl[(n, o.kind)],
                  settings.refine, seed=0, fits=fits)


class CompensatedBlocks:
    """Each tensor's blocks with error-compensated codes in a type, rounded on the whole tensor with the input
    covariance of the calibration tokens (deterministic: a rebuild from the same tokens writes the same blocks) and
    kept in the cache beside the tables, so the trials of a shape that choose a tensor's type again read it back.
    The covariances are computed from the model as it is when first needed (`prepare` computes them all up front,
    before anything changes its weights)."""

    def __init__(self, model: nn.Module, windows, context: BuildContext, imatrix: dict[str, np.ndarray]):
        self.model, self.windows = model, windows
        self.tensors = {t.gguf_name: t for t in sensitivity.quantizable(model, imatrix)}
        folder = _cache_file(context, _calibration_key(windows))
        self.folder = None if folder is None else folder / "compensated"
        self.covariances: dict[str, np.ndarray] = {}
        self.factors = FactorCache()
        # the factors the tables computed (or an earlier trial): a tensor whose factor is stored needs no covariance
        self.store = FactorStore(None if folder is None else factor_folder(folder))

    def prepare(self, names=None) -> None:
        """The input covariances of `names` (every compensable tensor by default), from the model as it is now."""
        wanted = [self.tensors[n] for n in (names or self.tensors) if n not in self.covariances]
        if wanted:
            for chunk in sensitivity.compensable_inputs(self.model, wanted, self.windows):
                self.covariances.update(chunk)

    def __call__(self, name: str, kind: str, weight: np.ndarray | None = None) -> np.ndarray:
        """The blocks of tensor `name` in GGML type `kind`, rounded from `weight` (the model's, by default)."""
        file = self._file(name, kind)
        if self._cached(name, kind):
            return np.load(file)
        covariance, factor = self._factor(name)
        if weight is None:
            weight = sensitivity.weights_of(self.model, [self.tensors[name]])[name].detach().float().cpu().numpy()
        importance = self.tensors[name].importance
        if covariance is None and importance is None:  # compensated_round then weighs by the covariance's diagonal
            covariance = self._covariance(name)
        blocks = compensated_round(weight, covariance, kind, importance, factor=factor)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            np.save(file, blocks)
        return blocks

    def _file(self, name: str, kind: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{name}.{kind}.npy"

    def _cached(self, name: str, kind: str) -> bool:
        file = self._file(name, kind)
        return file is not None and file.is_file()

    def _covariance(self, name: str) -> np.ndarray:
        self.prepare([name])
        return self.covariances[name]

    def _factor(self, name: str) -> tuple[np.ndarray | None, tuple]:
        """(the input covariance of tensor `name`, None where its factor was stored; its `hessian_factor`: shared by
        the tensors reading one input), the factor stored for the trials after."""
        stored = self.store.load(name)
        if stored is not None:
            return None, stored
        covariance = self._covariance(name)
        factor = self.factors(covariance)
        self.store.save(name, factor)
        return covariance, factor

    def of(self, kinds: dict[str, str]) -> dict[str, np.ndarray]:
        """{GGUF name: blocks} of the tensors whose kind is ``<type>+gptq``, a decoder block's side by side, one
        block at a time (its inputs' factors held only while it is rounded)."""
        wanted = {name: base_kind(kind) for name, kind in kinds.items() if is_compensated(kind)}
        blocks: dict[str, np.ndarray] = {}

        def rounded(items: list) -> None:
            blocks.update(zip((name for name, _ in items), layer_by_layer(
                lambda item: self(*item), items, lambda item: block_of(item[0]), done=self.factors.clear,
                size=lambda item: self.tensors[item[0]].size)))

        # the covariances a group of blocks at a time (none for blocks in the cache), rounded and freed before the next
        missing = [self.tensors[n] for n, kind in wanted.items()
                   if not self._cached(n, kind) and n not in self.covariances and not self.store.has(n)]
        for chunk in sensitivity.compensable_inputs(self.model, missing, self.windows) if missing else ():
            self.covariances.update(chunk)
            rounded([(n, kind) for n, kind in wanted.items() if n in chunk])
            for name in chunk:
                del self.covariances[name]
        rounded([(n, kind) for n, kind in wanted.items() if n not in blocks])
        return {name: blocks[name] for name in wanted}


METHOD = register_method(LlamaQuant())
