"""Shared by the search-quality and uniform-baseline benchmarks: the reduced joint grid, its on-disk table of
measured points, an exact 3-D hypervolume, and a replay of the planner's real search against the table.

The grid is the planner's own search space narrowed by a study-file `space` table (GRID_SPACE), so every
point is a candidate `planner search` could sample, named by the same trial parameters and stage specs.
Each point is built and measured once for real (`search_quality.py --evaluate`) and stored as one JSON line
keyed by its stage specs. A replay runs the planner's real study code (spaces, enqueued presets, sampler,
`planner.trial.objective` with its duplicate check, spec-only memory rejection, budgets as constraints,
`planner.study.outcome`) with only the build and the three evaluators replaced by table look-ups.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
import os

TABLE = Path(os.environ.get("PLANNER_BENCH_TABLE", RESULTS / "grid.jsonl"))  # override: tests of the replay
LATENCY = TABLE.parent / "grid-latency.jsonl"

# The joint grid: demo.toml's space (methods none/rtn/gptq/dynamic-int8, bits {3,4,8} per group, head kept
# shared at 16 bits) with pruning narrowed to depth {1, 0.8} x MLP {1, 0.75, 0.5} and one group size (128).
DEPTH_KEEP = [1.0, 0.8]
MLP_KEEP = [1.0, 0.75, 0.5]
BITS = [3, 4, 8]
GRID_SPACE = {
    "distillation": False,
    "pruning": {"depth_keep": DEPTH_KEEP, "mlp_keep": MLP_KEEP, "heads_keep": [1.0], "calibration_samples": 16,
                "heal": [False]},
    "quantization": {"methods": ["none", "rtn", "gptq", "dynamic-int8"], "bits": BITS, "head_bits": [16],
                     "group_sizes": [128], "device": "cpu"},
}
# The cheaper but fixed evaluation protocol of every point: demo.toml's (what a demo trial pays).
GRID_EVALUATION = {
    "perplexity": {"context_length": 512, "stride": 512, "max_tokens": 1536},
    "latency": {"prompt_tokens": 64, "new_tokens": 16, "repeats": 3, "warmup": 1},
}
MODEL = "builtin:smollm2-135m"
DATA = "builtin:shakespeare"


def grid_settings(**overrides):
    from planner.settings import StudySettings

    values = dict(model=MODEL, data=DATA, study="bench-grid", seed=0, space=GRID_SPACE, evaluation=GRID_EVALUATION)
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
    for method in ("rtn", "gptq"):
        quant += [{"quantization.method": method, f"quantization.{method}.attn_bits": a,
                   f"quantization.{method}.mlp_bits": m} for a, m in itertools.product(BITS, BITS)]
    quant += [{"quantization.method": "dynamic-int8", "quantization.dynamic-int8.groups": g}
              for g in ("attn+mlp", "attn", "mlp")]
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
    """Every measured point, with the decode/prefill latency of its compute graph filled in when measured.

    Points live in `grid.jsonl` plus one `grid.<worker>.jsonl` per extra worker; graph latencies in
    `grid-latency.jsonl` (see search_quality.py: rtn/gptq candidates run the float kernels of their shape)."""
    table = {}
    for part in sorted(path.parent.glob(path.stem + "*.jsonl")):
        if part.name == LATENCY.name:
            continue
        for line in part.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                table[row["key"]] = row
    latency = load_latency(path)
    for row in table.values():
        graph = latency.get(row["graph"])
        if graph is not None:
            row.update(decode_ms_p50=graph["decode_ms_p50"], prefill_ms_p50=graph["prefill_ms_p50"])
    return table


def load_latency(path: Path = TABLE) -> dict[str, dict]:
    file = path.parent / LATENCY.name
    if not file.exists():
        return {}
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return {r["graph"]: r for r in rows}


def graph_of(stages) -> str:
    """The compute graph a candidate runs: its pruned shape and, for dynamic-int8, which groups use int8
    kernels. rtn/gptq candidates are evaluated in float with the weights their checkpoint decodes to
    (search_spaces/quantization/modules.py), so they run exactly the float graph of their shape."""
    prune = [s.spec for s in stages if s.technique == "pruning"]
    shape = (f"depth {prune[0].depth_keep:g}, mlp {prune[0].mlp_keep:g}" if prune else "depth 1, mlp 1")
    quant = [s.spec for s in stages if s.technique == "quantization"]
    if quant and quant[0].method == "dynamic-int8":
        groups = "+".join(g for g in ("attn", "mlp") if quant[0].bits[g] < 16)
        return f"{shape} | dynamic-int8 {groups}"
    return f"{shape} | float"


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
    spec fields (e.g. the GGUF grid, healing) change; its trial parameters (older `prune.*` names renamed)
    name the same candidate in today's space."""
    from planner.candidates import CornerTrial, suggest_stages

    renamed = {"prune.": "pruning.", "distill.": "distillation.", "quant.": "quantization."}

    def current(params: dict) -> dict:
        out = {}
        for name, value in params.items():
            for old, new in renamed.items():
                name = new + name[len(old):] if name.startswith(old) else name
            out[name] = value
        return out

    return {stage_key(suggest_stages(CornerTrial(current(row["params"])), spaces)): row for row in table.values()}


class Replay:
    """The planner's study code with candidates looked up in the table instead of built and measured."""

    def __init__(self, table: dict[str, dict]):
        import optuna

        import planner.trial as trial_module
        import targets.transformers_target as transformers_target
        from planner.study import resolve_spaces

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.modules = (trial_module, transformers_target)  # where the build and the evaluators are looked up
        self.model = meta_model()
        self.model.bench_key = "[]"
        self.spaces = resolve_spaces(grid_settings(), self.model)
        self.table = rekeyed(table, self.spaces)
        self._estimates: dict[str, int] = {}
        keys = {stage_key(stages) for _, stages in grid_points(self.spaces)}
        missing = keys - set(self.table)
        if missing:
            raise SystemExit(f"the table misses {len(missing)} of the grid's {len(keys)} points; run --evaluate first")

    # Stand-ins for the build and the evaluators (planner.trial looks these names up at call time).
    def _build(self, base_model, stages, context):
        from planner.candidates import BuiltCandidate

        return BuiltCandidate(SimpleNamespace(bench_key=stage_key(stages)), {})

    def _row(self, model) -> dict:
        return self.table[model.bench_key]

    def _weight_bytes(self, model):
        row = self._row(model)
        return SimpleNamespace(total_bytes=row["weight_bytes"], to_dict=lambda: {"total_bytes": row["weight_bytes"]})

    def _latency(self, model, protocol):
        row = self._row(model)
        return SimpleNamespace(decode=SimpleNamespace(p50_ms=row["decode_ms_p50"]),
                               prefill=SimpleNamespace(p50_ms=row["prefill_ms_p50"]),
                               to_dict=lambda: {"decode": {"p50_ms": row["decode_ms_p50"]}})

    def _perplexity(self, model, tokenizer, documents, protocol):
        row = self._row(model)
        return SimpleNamespace(perplexity=row["perplexity"], bits_per_byte=row["bits_per_byte"],
                               to_dict=lambda: {"perplexity": row["perplexity"]})

    def _estimate(self, base_model, stages, shaped=None):
        # The planner's exact spec-only sizing (on the meta skeleton), memoised: it is pure.
        from planner.candidates import estimate_weight_bytes

        key = stage_key(stages)
        if key not in self._estimates:
            self._estimates[key] = estimate_weight_bytes(base_model, stages)
        return self._estimates[key]

    def run(self, sampler: str, seed: int, trials: int, budgets: dict | None = None, sampler_object=None,
            extra_enqueued: list[dict] | None = None, skip_over_budget: bool = False, seeding: str = "planner",
            every_trial_counts: bool = False):
        """One study of `trials` trials; returns (study, bench, outcome). `budgets` maps kind -> text
        (e.g. {"memory": "0.3x"}). `sampler_object` overrides the named sampler (prototypes of changes).
        `seeding`: "planner" enqueues what the planner does (`candidates.starting_points`); "hand_picked"
        the planner's seeds before the search-quality benchmark (hand-picked presets only), plus
        `extra_enqueued` (optionally sized against the memory budget first)."""
        import optuna

        from planner.budgets import of_kind
        from planner.candidates import hand_picked, starting_points
        from planner.samplers import make_sampler
        from planner.trial import Workbench, objective
        from planner.workers import run_trials
        from planner.study import join
        from planner.outcome import decide as outcome
        from search_spaces import BuildContext

        budgets = budgets or {}
        settings = grid_settings(sampler=sampler, seed=seed, trials=trials,
                                 **{f"{kind}_budget": text for kind, text in budgets.items()})
        bench = Workbench(settings, self.model, None, SimpleNamespace(eval=None), BuildContext(tokenizer=None,
                          calibration=()), self.spaces, settings.budgets(), baseline={})
        study = optuna.create_study(sampler=sampler_object or make_sampler(sampler, seed, trials),
                                    directions=["minimize"] * 3)
        patched = {"build": self._build, "weight_bytes": self._weight_bytes, "measure_latency": self._latency,
                   "measure_perplexity": self._perplexity, "estimate_weight_bytes": self._estimate,
                   "decompressed_bytes": lambda model: 0,  # the table's bytes are the stored ones
                   "gc": SimpleNamespace(collect=lambda: 0)}  # nothing was built: nothing to collect
        # The trial's own steps, and the transformers target's measurement (the workbench's default target).
        saved = {(module, name): getattr(module, name) for module in self.modules for name in patched
                 if hasattr(module, name)}
        try:
            for module, name in saved:
                setattr(module, name, patched[name])
            with contextlib.redirect_stdout(io.StringIO()):  # "measuring the uncompressed model"
                join(bench, study)
            memory = of_kind(bench.budgets, "memory")
            if seeding == "planner":
                enqueued = starting_points(self.model, self.spaces, memory and memory.limit, trials)
            else:
                enqueued = hand_picked(self.spaces) + list(extra_enqueued or [])
            if seeding != "planner" and skip_over_budget and memory is not None:  # prototype: presets sized from their spec first
                from planner.candidates import CornerTrial, suggest_stages

                enqueued = [p for p in enqueued
                            if self._estimate(self.model, suggest_stages(CornerTrial(p), self.spaces)) <= memory.limit]
            for params in enqueued:
                study.enqueue_trial(params, skip_if_exists=True)
            # The planner's own trial loop: `trials` counts distinct candidates (twins and spec rejections are
            # drawn on top, as `planner search` does since the joint-search issue); `every_trial_counts`: the
            # count of before that issue, for comparison.
            if every_trial_counts:
                study.optimize(objective(bench), n_trials=trials, catch=(Exception,))
            else:
                run_trials(study, objective(bench), trials, say=lambda _: None)
        finally:
            for (module, name), fn in saved.items():
                setattr(module, name, fn)
        return study, bench, outcome(study, bench.budgets, bench.baseline)


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
