"""Shared by the search-quality and uniform-baseline benchmarks: the reduced joint grid on the default target
(llama.cpp), its on-disk table of measured points, an exact 3-D hypervolume, and a replay of the planner's real
search against the table.

The grid is the planner's own search space narrowed by a study-file `space` table (GRID_SPACE), fitted by the
llama.cpp target (GGUF grids), so every point is a candidate `planner search` could sample on that target,
named by the same trial parameters and stage specs. Each point is built and measured once for real
(`search_quality.py --evaluate`: the GGUF written and measured by the target exactly as a study's trial is,
latency A/B against the uncompressed GGUF, perplexity from llama.cpp's logits, weight bytes = GGUF tensor
bytes) and stored as one JSON line keyed by its stage specs. A replay runs the planner's real study code
(spaces, seeds, sampler, `planner.trial.objective` with its duplicate check, spec-only memory rejection,
budgets as constraints, `outcome.decide`) with the build and the target injected into the workbench as
look-ups in the table (`TableTarget`, `CandidateSteps`): nothing is patched by name.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
TABLE = Path(os.environ.get("PLANNER_BENCH_TABLE", RESULTS / "grid-llamacpp.jsonl"))  # override: tests of the replay
MACHINE = TABLE.with_name(TABLE.stem + "-machine.json")  # threads, CPU capability, runtime, load

# The joint grid: demo.toml's quantization space on llama.cpp (none, or RTN onto GGUF's Q4_0 / Q5_0 / Q8_0 per
# attention / MLP group; the tied embedding + head F16 shared, or a Q8_0 / Q4_0 head of its own) crossed with
# pruning narrowed to depth {1, 0.8} x MLP {1, 0.75}, without healing or students (their training would
# dominate the cost of the grid). GPTQ is left out as demo.toml leaves it out (~35 s a trial for ~2% perplexity
# on Q4_0).
DEPTH_KEEP = [1.0, 0.8]
MLP_KEEP = [1.0, 0.75]
BITS = [4, 5, 8]
HEAD_BITS = [16, 8, 4]
METHODS = ["rtn"]
GRID_SPACE = {
    "distillation": False,
    "pruning": {"depth_keep": DEPTH_KEEP, "mlp_keep": MLP_KEEP, "heads_keep": [1.0], "calibration_samples": 16,
                "heal": [False]},
    "quantization": {"methods": ["none"] + METHODS, "bits": BITS, "head_bits": HEAD_BITS, "device": "cpu"},
}
# The fixed evaluation protocol of every point: demo.toml's (what a demo trial pays), but 1 llama.cpp thread
# where demo.toml has 2: on two cores shared with other jobs, 2 llama.cpp threads collapse whenever the cores
# are oversubscribed (a probe at load 4 timed the uncompressed GGUF at 179-579 ms/token and read a Q4_0
# candidate as 0.074x); one thread slows in proportion to its share, which the A/B ratio cancels.
GRID_EVALUATION = {
    "perplexity": {"context_length": 512, "stride": 512, "max_tokens": 1536},
    "latency": {"prompt_tokens": 64, "new_tokens": 16, "repeats": 3, "warmup": 1, "threads": 1},
}
MODEL = "builtin:smollm2-135m"
DATA = "builtin:shakespeare"
TARGET = "llama.cpp"


def grid_settings(**overrides):
    from planner.settings import StudySettings

    values = dict(model=MODEL, data=DATA, study="bench-grid", seed=0, space=GRID_SPACE, evaluation=GRID_EVALUATION,
                  target=TARGET)
    values.update(overrides)
    return StudySettings(**values)


def stage_key(stages) -> str:
    """The identity of a candidate: its stage specs as the planner stores them on a trial."""
    from planner.recipes import plain_stages

    return json.dumps(plain_stages(stages), sort_keys=True)


def grid_params() -> list[dict]:
    """Trial parameters of every grid point (several may name the same candidate; `grid_points` dedupes)."""
    prune = [{"pruning.enabled": False}] + [{"pruning.enabled": True, "pruning.depth_keep": d, "pruning.mlp_keep": m}
                                          for d, m in itertools.product(DEPTH_KEEP, MLP_KEEP)]
    quant = [{"quantization.method": "none"}]
    for method in METHODS:
        quant += [{"quantization.method": method, f"quantization.{method}.attn_bits": a,
                   f"quantization.{method}.mlp_bits": m, f"quantization.{method}.head_bits": h}
                  for a, m, h in itertools.product(BITS, BITS, HEAD_BITS)]
    return [{**p, **q} for p, q in itertools.product(prune, quant)]


def grid_points(spaces) -> list[tuple[dict, list]]:
    """(params, stages) of each distinct candidate of the grid, in a stable order."""
    from planner.candidates import CornerTrial, suggest_stages

    seen, points = set(), []
    for params in grid_params():
        stages = suggest_stages(CornerTrial(params), spaces)
        key = stage_key(stages)
        if key not in seen:
            seen.add(key)
            points.append((params, stages))
    return points


def load_table(path: Path = TABLE) -> dict[str, dict]:
    """Every measured point (`grid-llamacpp.jsonl`, plus one `grid-llamacpp.<worker>.jsonl` per extra worker)."""
    table = {}
    for part in sorted(path.parent.glob(path.stem + "*.jsonl")):
        for line in part.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                table[row["key"]] = row
    return table


def reference_decode_ms(table: dict[str, dict]) -> tuple[float, float]:
    """The uncompressed GGUF's decode and prefill p50 (ms), median over every point's A/B run: the scale that
    turns each point's same-run ratio into milliseconds comparable across points measured at other loads."""
    rows = list(table.values())
    return (statistics.median(r["latency"]["reference_decode"]["p50_ms"] for r in rows),
            statistics.median(r["latency"]["reference_prefill"]["p50_ms"] for r in rows))


def normalised(table: dict[str, dict]) -> dict[str, dict]:
    """Each row with `decode_ms_p50` / `prefill_ms_p50` = its measured ratio x the reference's median ms (the
    absolute ms as measured kept as `measured_decode_ms_p50` / `measured_prefill_ms_p50`): on a shared machine
    the same-run ratio is what holds; the absolute ms move with the load of the minute each point was timed."""
    decode, prefill = reference_decode_ms(table)
    out = {}
    for key, row in table.items():
        row = dict(row)
        row.setdefault("measured_decode_ms_p50", row["decode_ms_p50"])
        row.setdefault("measured_prefill_ms_p50", row["prefill_ms_p50"])
        row["decode_ms_p50"] = row["decode_ratio"] * decode
        row["prefill_ms_p50"] = row["prefill_ratio"] * prefill
        out[key] = row
    return out


def append_row(row: dict, path: Path = TABLE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def meta_model():
    """The built-in model's skeleton on the meta device: what the replay sizes specs with (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner import assets

    folder = assets.cache_root() / "models" / "smollm2-135m"
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# Hypervolume (all objectives minimised)
# ---------------------------------------------------------------------------------------------------


def nondominated(points: list[tuple]) -> list[tuple]:
    """The distinct points no other dominates, sorted (the planner's own front rule, on plain tuples)."""
    from planner.outcome import pareto_front

    return pareto_front(sorted(set(points)), values=lambda p: p)


def hv2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by `points` and bounded by `ref` (sweep along x, keep the lowest y so far)."""
    area, best_y = 0.0, ref[1]
    pts = sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1])
    for i, (x, y) in enumerate(pts):
        best_y = min(best_y, y)
        next_x = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        area += (next_x - x) * (ref[1] - best_y)
    return area


def hv3d(points: list[tuple[float, float, float]], ref: tuple[float, float, float]) -> float:
    """Exact volume dominated by `points` and bounded by `ref`: slice along the third objective, a 2-D
    hypervolume per slab between consecutive z values."""
    pts = sorted((p for p in points if all(a < r for a, r in zip(p, ref))), key=lambda p: p[2])
    volume = 0.0
    for i, p in enumerate(pts):
        next_z = pts[i + 1][2] if i + 1 < len(pts) else ref[2]
        if next_z > p[2]:
            volume += (next_z - p[2]) * hv2d([q[:2] for q in pts[: i + 1]], ref[:2])
    return volume


def _check_hv() -> None:
    assert hv3d([(1, 1, 1)], (2, 2, 2)) == 1
    # Three unit-thick slabs at right angles: 3 x 2 - 3 pairwise overlaps + 1 triple overlap = 4.
    assert hv3d([(0, 1, 1), (1, 0, 1), (1, 1, 0)], (2, 2, 2)) == 4
    assert hv3d([(0, 0, 0), (1, 1, 1)], (2, 2, 2)) == 8  # a dominated point adds nothing
    assert hv3d([(3, 0, 0)], (2, 2, 2)) == 0  # beyond the reference point
    assert hv2d([(0, 2), (1, 1), (2, 0)], (3, 3)) == 6
    # Against counting unit cells on random integer points.
    import random

    rng = random.Random(0)
    for _ in range(50):
        pts = [tuple(rng.randint(0, 5) for _ in range(3)) for _ in range(rng.randint(1, 8))]
        cells = sum(any(all(p[k] <= c[k] for k in range(3)) for p in pts)
                    for c in itertools.product(range(6), repeat=3))
        assert hv3d(pts, (6, 6, 6)) == cells, (pts, hv3d(pts, (6, 6, 6)), cells)


_check_hv()

REFERENCE_MARGIN = 0.1  # reference point: nadir + 10% of the ideal-nadir range, in every objective


class Normaliser:
    """(perplexity, decode ms, weight MB) -> (log perplexity, ms, MB) scaled so the exhaustive front's ideal is
    0 and its nadir 1; the reference point is (1.1, 1.1, 1.1) for every method."""

    def __init__(self, front_values: list[tuple]):
        logged = [self.raw(v) for v in front_values]
        self.ideal = [min(p[k] for p in logged) for k in range(3)]
        self.nadir = [max(p[k] for p in logged) for k in range(3)]
        self.ref = (1 + REFERENCE_MARGIN,) * 3

    @staticmethod
    def raw(values) -> tuple:
        return (math.log(values[0]), values[1], values[2])

    def __call__(self, values) -> tuple:
        raw = self.raw(values)
        return tuple((raw[k] - self.ideal[k]) / ((self.nadir[k] - self.ideal[k]) or 1.0) for k in range(3))

    def hv(self, values_list) -> float:
        return hv3d(nondominated([self(v) for v in values_list]), self.ref)

    def describe(self) -> str:
        def point(raw):
            return f"(ppl {math.exp(raw[0]):.2f}, {raw[1]:.2f} ms, {raw[2]:.1f} MB)"
        ref = [self.ideal[k] + self.ref[k] * (self.nadir[k] - self.ideal[k]) for k in range(3)]
        return f"ideal {point(self.ideal)}, nadir {point(self.nadir)}, reference {point(ref)}"


def objective_values(row: dict) -> tuple[float, float, float]:
    return (row["perplexity"], row["decode_ms_p50"], row["weight_mb"])


# ---------------------------------------------------------------------------------------------------
# Replaying the planner's search against the table
# ---------------------------------------------------------------------------------------------------


def rekeyed(table: dict[str, dict], spaces: dict) -> dict[str, dict]:
    """The table keyed by today's stage specs: a row's key is the spec dict of when it was measured, which later
    spec fields may change; its trial parameters name the same candidate in today's space."""
    from planner.candidates import CornerTrial, suggest_stages

    return {stage_key(suggest_stages(CornerTrial(row["params"]), spaces)): row for row in table.values()}


# The figures of a table row the llama.cpp target's metrics row holds besides the accuracy ones.
SIZE_FIGURES = ("weight_bytes", "weight_mb", "disk_bytes", "kv_cache_bytes")
LATENCY_FIGURES = ("decode_ms_p50", "prefill_ms_p50", "decode_ratio", "prefill_ratio")
SCORE_FIGURES = ("perplexity", "bits_per_byte")


def _target_base():
    from targets.base import Target

    return Target


class TableTarget(_target_base()):
    """The llama.cpp target's figures looked up in the measured table instead of written and run: a
    `targets.base.Target` the replay's workbench is given, so planner.trial and planner.study run unchanged.
    Like the real target it gives latency first and skips the scores when the request's rule says the
    candidate is hopeless (a latency far over its budget)."""

    name = TARGET  # the figures are llama.cpp's, as measured
    runtime = "llama.cpp (figures from bench/results/grid-llamacpp.jsonl)"
    artifact = "nothing (a replay)"

    def __init__(self, table: dict[str, dict]):
        self.table = table

    def measure(self, request, model, label: str):
        from targets.base import Measured

        unknown = set(request.evaluators) - {"latency", "memory", "perplexity"}
        if unknown:
            raise ValueError(f"the grid table holds no {', '.join(sorted(unknown))} figures")
        source = self.table[model.bench_key]
        row = {"stages": label, **{k: source[k] for k in SIZE_FIGURES}}
        if "latency" in request.evaluators:
            row.update({k: source[k] for k in LATENCY_FIGURES})
        details = {"memory": {"total_bytes": source["weight_bytes"], "method": "gguf_tensor_bytes (table)"},
                   "latency": {k: source[k] for k in LATENCY_FIGURES}}
        skipped = request.hopeless(row)
        if skipped is None:
            row.update({k: source[k] for k in SCORE_FIGURES})
            details["perplexity"] = {k: source[k] for k in SCORE_FIGURES}
        return Measured(row, details, skipped)

    def ship(self, model, tokenizer, stages: list, out: Path) -> Path:
        raise NotImplementedError("a replay ships nothing")

    def measure_shipped(self, request, artifact: Path):
        raise NotImplementedError("a replay ships nothing")


class Replay:
    """The planner's study code with candidates looked up in the table instead of built and measured: the
    workbench gets a `TableTarget` and `CandidateSteps` whose `build` only names the candidate (the
    planner's own suggest, describe, shapes, storage notes and spec-only sizing run as they are)."""

    def __init__(self, table: dict[str, dict]):
        import gc

        import optuna

        from planner.study import resolve_spaces
        from planner.trial import DEFAULT_STEPS
        from targets import TARGETS

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # constraints' `group`
        self.model = meta_model()
        self.model.bench_key = "[]"  # the uncompressed model: the baseline's row
        llama_cpp = TARGETS[TARGET]  # the space is the real target's (as `prepare` fits it); only figures are looked up
        self.spaces = llama_cpp.fit_spaces(resolve_spaces(grid_settings(), self.model, llama_cpp.space_defaults()),
                                           self.model)
        self.table = normalised(rekeyed(table, self.spaces))
        self.target = TableTarget(self.table)
        self._estimates: dict[str, int] = {}
        self.steps = replace(DEFAULT_STEPS, build=self._build, estimate_weight_bytes=self._estimate)
        keys = {stage_key(stages) for _, stages in grid_points(self.spaces)}
        missing = keys - set(self.table)
        if missing:
            raise SystemExit(f"the table misses {len(missing)} of the grid's {len(keys)} points; run --evaluate first")
        # Every trial ends in gc.collect() (a built model is large); here nothing is built, and the torch and
        # optuna objects loaded so far need no scanning: frozen, a collection only walks what trials make.
        gc.collect()
        gc.freeze()

    def _build(self, base_model, stages, context, screen=None):  # a replay screens nothing: all is measured
        from planner.candidates import BuiltCandidate

        return BuiltCandidate(SimpleNamespace(bench_key=stage_key(stages)), {})

    def _estimate(self, base_model, stages, shaped=None, beyond=None):
        # The planner's exact spec-only sizing (on the meta skeleton), memoised: it is pure.
        from planner.candidates import estimate_weight_bytes

        key = stage_key(stages)
        if key not in self._estimates:
            self._estimates[key] = estimate_weight_bytes(base_model, stages, shaped, beyond=beyond)
        return self._estimates[key]

    def workbench(self, settings):
        from planner.trial import Workbench
        from search_spaces import BuildContext

        return Workbench(settings, self.model, None, SimpleNamespace(eval=None, train=()),
                         BuildContext(tokenizer=None, calibration=()), self.spaces, settings.budgets(), baseline={},
                         objectives=settings.objective_names(), target=self.target, steps=self.steps)

    def run(self, sampler: str, seed: int, trials: int, budgets: dict | None = None, sampler_object=None,
            extra_enqueued: list[dict] | None = None, skip_over_budget: bool = False, seeding: str = "planner"):
        """One study of `trials` counted trials; returns (study, bench, outcome). `budgets` maps kind -> text
        (e.g. {"latency": "0.3x"}). `sampler_object` overrides the named sampler (prototypes of changes).
        `seeding`: "planner" enqueues what the planner does (`candidates.starting_points`); "hand_picked"
        the planner's seeds before the search-quality benchmark (hand-picked presets only), plus
        `extra_enqueued` (optionally sized against the memory budget first)."""
        import contextlib
        import io

        import optuna

        from planner import objectives as objective_registry
        from planner.budgets import of_kind
        from planner.candidates import CornerTrial, hand_picked, starting_points, suggest_stages
        from planner.outcome import decide
        from planner.samplers import make_sampler
        from planner.study import join
        from planner.trial import objective
        from planner.workers import run_trials

        settings = grid_settings(sampler=sampler, seed=seed, trials=trials,
                                 **{f"{kind}_budget": text for kind, text in (budgets or {}).items()})
        bench = self.workbench(settings)
        study = optuna.create_study(sampler=sampler_object or make_sampler(sampler, seed, trials),
                                    directions=objective_registry.directions(bench.objectives))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            join(bench, study)  # "measuring the uncompressed model": the table's baseline row
        memory = of_kind(bench.budgets, "memory")
        if seeding == "planner":
            enqueued = starting_points(self.model, self.spaces, memory and memory.limit, trials)
        else:
            enqueued = hand_picked(self.spaces) + list(extra_enqueued or [])
            if skip_over_budget and memory is not None:  # prototype: presets sized from their spec first
                enqueued = [p for p in enqueued
                            if self._estimate(self.model, suggest_stages(CornerTrial(p), self.spaces)) <= memory.limit]
        for params in enqueued:
            study.enqueue_trial(params, skip_if_exists=True)
        # The planner's own trial loop: `trials` counts distinct candidates (twins and spec rejections are
        # drawn on top, as `planner search` does).
        run_trials(study, objective(bench), trials, say=lambda _: None)
        return study, bench, decide(study, bench.budgets, bench.baseline)


def found_values(study, feasible_only: bool) -> list[list[tuple]]:
    """Per trial (in order), the objective values of that trial if it counts toward the front: measured in
    full, and with a budget, feasible. None otherwise."""
    from planner.outcome import feasible, measured

    values = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        ok = measured(trial) and (not feasible_only or feasible(trial))
        values.append(objective_values(trial.user_attrs["metrics"]) if ok else None)
    return values


def distinct_built(study) -> list[int]:
    """Cumulative count of candidates actually built and measured (not rejected from the spec, not a twin)."""
    counts, total = [], 0
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = trial.user_attrs
        total += int("metrics" in attrs and "rejected" not in attrs and "duplicate_of" not in attrs)
        counts.append(total)
    return counts
