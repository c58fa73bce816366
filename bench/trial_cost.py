"""Trial cost: seconds per stage of a planner trial, for typical candidates and for three model sizes.

    nice -n 10 .venv/bin/python bench/trial_cost.py [--skip-scaling] [--skip-student]

Every trial runs through the planner's real objective (`planner.trial.objective`) in an in-memory study,
with the demo study file's space and evaluation protocol (`studies/demo.toml`); the stage seconds are what
the planner stores on each trial (per technique, measure, total), split further with the evaluators' own
wall times (latency, perplexity). Then, measured separately on one candidate: pruning's calibration
(tokenising windows, scoring importance with hooks) vs its surgery, and saving (the packed checkpoint).
Targets: the median quantize+prune trial on the built-in model under 30 s, a candidate rejected from its
spec (memory budget) under 1 s, a trial whose student comes from the cache with its distillation stage
under 2 s. Scaling: the same candidates on a smaller and a larger random-initialised Llama (the built-in
model's tokenizer and corpus; random weights give nonsense perplexity but the same work per token).
Each trial's figures are appended to bench/results/trial_cost.jsonl, so an interrupted run continues.

    nice -n 10 .venv/bin/python bench/trial_cost.py --llama-1b

The size people deploy, on the llama.cpp target: a model of Llama-3.2-1B's configuration (16 x 2048, GQA 32/8,
MLP 8192, rotary scaling "llama3", tied 128256-token embedding; random weights made here, 1.24 B parameters,
the built-in tokenizer padded to that vocabulary, so the GGUF goes through llama.cpp's converter as Llama 3.2
does). Each case runs in a fresh process (its peak memory is its own): the study's one-off costs (the random
model, the reference GGUF, the baseline's measurement), then one trial, with seconds per stage (conversion,
quantization, pruning, latency, perplexity) and the peak resident memory of the process and of the converter
subprocess. Targets: a quantization-only trial under 3 minutes on 2 cores, peak memory under 3x the model's
float32 size.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "bench" / "results" / "trial_cost.jsonl"

# Typical candidates of the demo space, as trial parameters (every one quantizes and/or prunes).
CANDIDATES = {
    "rtn 4/4": {"pruning.enabled": False, "quantization.method": "rtn", "quantization.rtn.attn_bits": 4,
                "quantization.rtn.mlp_bits": 4, "quantization.rtn.group_size": 128},
    "prune d.9 m.75 + rtn 4/8": {"pruning.enabled": True, "pruning.depth_keep": 0.9, "pruning.mlp_keep": 0.75,
                                 "quantization.method": "rtn", "quantization.rtn.attn_bits": 4,
                                 "quantization.rtn.mlp_bits": 8, "quantization.rtn.group_size": 128},
    "prune m.875 + gptq 4/4": {"pruning.enabled": True, "pruning.depth_keep": 1.0, "pruning.mlp_keep": 0.875,
                               "quantization.method": "gptq", "quantization.gptq.attn_bits": 4,
                               "quantization.gptq.mlp_bits": 4, "quantization.gptq.group_size": 128},
    "prune d.9 + rtn 8/3": {"pruning.enabled": True, "pruning.depth_keep": 0.9, "pruning.mlp_keep": 1.0,
                            "quantization.method": "rtn", "quantization.rtn.attn_bits": 8,
                            "quantization.rtn.mlp_bits": 3, "quantization.rtn.group_size": 64},
    "prune d.9 m.875 + gptq 8/4": {"pruning.enabled": True, "pruning.depth_keep": 0.9, "pruning.mlp_keep": 0.875,
                                   "quantization.method": "gptq", "quantization.gptq.attn_bits": 8,
                                   "quantization.gptq.mlp_bits": 4, "quantization.gptq.group_size": 64},
    "dynamic-int8 attn": {"pruning.enabled": False, "quantization.method": "dynamic-int8",
                          "quantization.dynamic-int8.groups": "attn"},
}
SCALING_CANDIDATES = ("rtn 4/4", "prune d.9 m.75 + rtn 4/8", "prune m.875 + gptq 4/4")
# Over 0.3x of the baseline's bytes (the demo budget), so rejected from the spec without being built.
REJECTED = {
    "rtn 8/8 (168.7 MB)": {"pruning.enabled": False, "quantization.method": "rtn", "quantization.rtn.attn_bits": 8,
                           "quantization.rtn.mlp_bits": 8, "quantization.rtn.group_size": 128},
    "prune d.9 + dynamic-int8": {"pruning.enabled": True, "pruning.depth_keep": 0.9, "pruning.mlp_keep": 1.0,
                                 "quantization.method": "dynamic-int8",
                                 "quantization.dynamic-int8.groups": "attn+mlp"},
    "baseline": {"pruning.enabled": False, "quantization.method": "none"},
}
# A deliberately tiny student (its training is not what is timed; its second use, from the cache, is).
STUDENT_SPACE = {"enabled": [True], "depth_keep": [0.8], "mlp_keep": [1.0], "steps": [4], "batch_size": [1],
                 "seq_len": [128], "importance_samples": 4, "importance_seq_len": 128}
STUDENT = {"distillation.enabled": True, "pruning.enabled": False, "quantization.method": "rtn",
           "quantization.rtn.attn_bits": 4, "quantization.rtn.mlp_bits": 4, "quantization.rtn.group_size": 128}
# Llama shapes: smaller and larger than the built-in SmolLM2-135M (same vocabulary and tokenizer).
SIZES = {
    "small (random, 12 x 256)": dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=768),
    "large (random, 32 x 960)": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                                     num_key_value_heads=5, intermediate_size=2560),
}


def load_log() -> dict:
    done = {}
    if LOG.exists():
        for line in LOG.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["model"], row["case"])] = row
    return done


def record(row: dict) -> dict:
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def settings_for(**overrides):
    from planner.settings import make_settings, read_study_file

    values = read_study_file(ROOT / "studies" / "demo.toml")
    values = {k: v for k, v in values.items() if k not in ("storage", "recipe", "memory_budget", "trials")}
    values.update(overrides)
    return make_settings(values, {})


def new_study(bench):
    import optuna

    from planner.study import join

    study = optuna.create_study(directions=["minimize"] * 3)
    join(bench, study)
    return study


def run_trial(bench, study, params: dict) -> dict:
    """One trial of the planner's objective on the candidate named by `params`; its stored seconds."""
    from planner.trial import objective

    study.enqueue_trial(params)
    study.optimize(objective(bench), n_trials=1)
    trial = study.trials[-1]
    attrs = trial.user_attrs
    if "failure" in attrs:
        raise RuntimeError(attrs["failure"])
    seconds = dict(attrs.get("seconds", {}))
    measurements = attrs.get("measurements", {})
    if "latency" in measurements:
        seconds["latency"] = measurements["latency"]["wall_seconds"]
    if "perplexity" in measurements:
        seconds["perplexity"] = measurements["perplexity"]["seconds"]
    return {"label": attrs.get("label"), "seconds": seconds, "rejected": "rejected" in attrs,
            "metrics": {k: v for k, v in attrs.get("metrics", {}).items() if k != "stages"}}


def fmt(seconds: dict) -> str:
    order = ("distillation", "pruning", "quantization", "latency", "perplexity", "measure", "total")
    return "  ".join(f"{k} {seconds[k]:6.2f}" for k in order if k in seconds)


def case(done: dict, model: str, name: str, fn) -> dict:
    if (model, name) in done:
        row = done[(model, name)]
    else:
        started = time.perf_counter()
        row = record({"model": model, "case": name, **fn(), "wall": time.perf_counter() - started,
                      "load_average": os.getloadavg()[0]})
    print(f"  {name:<30} {fmt(row['seconds'])}   [{row.get('label', '')}] load {row['load_average']:.2f}", flush=True)
    return row


def builtin_part(done: dict, skip_student: bool) -> None:
    from planner.study import prepare

    bench = prepare(settings_for(study="bench-cost"))
    name = "builtin smollm2-135m"
    study = new_study(bench)
    print(f"\n{name}: {sum(p.numel() for p in bench.model.parameters()) / 1e6:.1f} M parameters; "
          f"seconds per stage of one trial (planner objective, demo.toml protocol)")
    rows = [case(done, name, label, lambda p=params: run_trial(bench, study, p)) for label, params in CANDIDATES.items()]
    both = [r["seconds"]["total"] for r in rows if "pruning" in r["seconds"] or "quantization" in r["seconds"]]
    print(f"  -> median quantize/prune trial {statistics.median(both):.1f} s over {len(both)} candidates "
          f"(target < 30 s); max {max(both):.1f} s")

    import optuna

    from planner.study import join

    budget_bench = prepare(settings_for(study="bench-cost", memory_budget="0.3x"))
    rejected_study = optuna.create_study(directions=["minimize"] * 3)
    join(budget_bench, rejected_study)
    print("  rejected from the spec (memory budget 0.3x):")
    rej = [case(done, name, f"rejected: {label}", lambda p=params: run_trial(budget_bench, rejected_study, p))
           for label, params in REJECTED.items()]
    assert all(r["rejected"] for r in rej), "expected spec-only rejections"
    print(f"  -> rejected trials: max {max(r['seconds']['total'] for r in rej):.2f} s (target < 1 s)")

    decompose(done, bench, name)
    if not skip_student:
        student_part(done, bench, name)


def decompose(done: dict, bench, name: str) -> None:
    """Pruning's calibration vs surgery, and saving a packed checkpoint, for one candidate."""
    def run() -> dict:
        from search_spaces import TECHNIQUES
        from search_spaces.calibration import calibration_batches
        from search_spaces.structure.importance import structural_importance
        from search_spaces.pruning import PruneSpec
        from search_spaces.structure.surgery import needed_scores, restructure
        from search_spaces.quantization import QuantSpec

        spec = PruneSpec(depth_keep=0.9, mlp_keep=0.75, calibration_samples=16)
        t0 = time.perf_counter()
        model = copy.deepcopy(bench.model)
        t1 = time.perf_counter()
        batches = calibration_batches(bench.tokenizer, bench.corpus.train, spec.calibration_samples,
                                      spec.calibration_seq_len, 0)
        t2 = time.perf_counter()
        needs = needed_scores(model, spec.structure)
        scores = structural_importance(model, batches, **needs)
        t3 = time.perf_counter()
        restructure(model, spec.structure, scores)
        t4 = time.perf_counter()
        quant = QuantSpec(method="rtn", bits={"attn": 4, "mlp": 8, "head": 16}, group_size=128)
        model = TECHNIQUES["quantization"].apply(model, quant, bench.context)
        t5 = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="bench-save-"))
        try:
            TECHNIQUES["quantization"].save(model, quant, folder)
            bench.tokenizer.save_pretrained(folder)
            t6 = time.perf_counter()
            saved_mb = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {"label": "prune(depth 0.9, mlp 0.75) + quant(rtn 4/8/h16 g128)", "saved_mb": saved_mb,
                "seconds": {"copy": t1 - t0, "calibration text": t2 - t1, "importance": t3 - t2, "surgery": t4 - t3,
                            "rtn": t5 - t4, "save": t6 - t5}}

    row = done.get((name, "decomposed")) or record({"model": name, "case": "decomposed", **run(),
                                                     "load_average": os.getloadavg()[0]})
    print("  one candidate step by step: " + "  ".join(f"{k} {v:.2f}" for k, v in row["seconds"].items())
          + f" s  (checkpoint {row['saved_mb']:.1f} MB)")


def student_part(done: dict, bench, name: str) -> None:
    """A student trained once (tiny on purpose), then the same candidate in a fresh study: the cache hit."""
    from planner.study import resolve_spaces

    cache = Path(tempfile.mkdtemp(prefix="bench-students-"))
    try:
        settings = replace(bench.settings, space={**bench.settings.space, "distillation": STUDENT_SPACE})
        student_bench = replace(bench, settings=settings, spaces=resolve_spaces(settings, bench.model),
                                context=replace(bench.context, cache_dir=cache, progress=False))
        print(f"  distillation (student cache in a fresh temporary folder {cache}):")
        case(done, name, "student: trained", lambda: run_trial(student_bench, new_study(student_bench), STUDENT))
        row = case(done, name, "student: from the cache",
                   lambda: run_trial(student_bench, new_study(student_bench), STUDENT))
        print(f"  -> cached student: distillation stage {row['seconds']['distillation']:.2f} s (target < 2 s), "
              f"whole trial {row['seconds']['total']:.1f} s")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def scaling_part(done: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner import assets
    from planner.study import resolve_spaces
    from planner.study import prepare

    base = prepare(settings_for(study="bench-cost"))
    config0 = AutoConfig.from_pretrained(assets.cache_root() / "models" / "smollm2-135m")
    for name, shape in SIZES.items():
        if all((name, c) in done for c in SCALING_CANDIDATES):
            model = None
            print(f"\n{name}: (from {LOG.name})")
        else:
            config = copy.deepcopy(config0)
            for key, value in shape.items():
                setattr(config, key, value)
            config.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            print(f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
        bench = replace(base, model=model, spaces=resolve_spaces(base.settings, model) if model else base.spaces,
                        context=replace(base.context, model_id=f"random:{name}"), baseline={})
        study = new_study(bench) if model is not None else None
        for label in SCALING_CANDIDATES:
            case(done, name, label, lambda p=CANDIDATES[label]: run_trial(bench, study, p))
        del model, bench


# Llama-3.2-1B's config.json, less what does not shape the work (vocabulary from there, tokenizer built in).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
ONE_B = "llama-3.2-1b config (random)"
ONE_B_CASES = {
    "quant only: rtn Q4_0, tied F16": {"distillation.enabled": False, "pruning.enabled": False,
                                       "quantization.method": "rtn", "quantization.rtn.attn_bits": 4,
                                       "quantization.rtn.mlp_bits": 4, "quantization.rtn.head_bits": 16,
                                       "quantization.rtn.group_size": 32, "quantization.rtn.symmetric": True},
    "pruned: depth 0.9 mlp 0.75 + rtn Q4_0": {"distillation.enabled": False, "pruning.enabled": True,
                                              "pruning.depth_keep": 0.9, "pruning.mlp_keep": 0.75,
                                              "pruning.heads_keep": 1.0, "pruning.heal": False,
                                              "quantization.method": "rtn", "quantization.rtn.attn_bits": 4,
                                              "quantization.rtn.mlp_bits": 4, "quantization.rtn.head_bits": 16,
                                              "quantization.rtn.group_size": 32, "quantization.rtn.symmetric": True},
}


class PeakMemory:
    """The process's resident memory sampled every 50 ms on a thread (what the trial's stages hold at once;
    pages of llama.cpp's memory-mapped GGUF files count, as the kernel counts them): `peak` of the whole, `anon` of
    its anonymous part (what the process allocated: tensors, arrays) and `file` of its file-backed part (mapped
    GGUF files: clean pages the kernel can drop and read again), each peak on its own."""

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        """`pid`: another process, summed with its descendants (a whole `planner search`), instead of this one."""
        import threading

        self.peak = self.anon = self.file = 0
        self.pid, self.interval = pid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        return PeakMemory.parts()["VmRSS"]

    @staticmethod
    def parts(pid: int | str = "self") -> dict[str, int]:
        wanted = ("VmRSS", "RssAnon", "RssFile")
        lines = (line.split(":") for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return {key: int(value.split()[0]) * 1024 for key, value in lines if key in wanted}

    def _tree(self) -> dict[str, int]:
        import psutil

        total = dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0)
        try:
            pids = [self.pid] + [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return total
        for pid in pids:
            try:
                for key, value in self.parts(pid).items():
                    total[key] += value
            except (FileNotFoundError, ProcessLookupError):
                pass  # gone between the listing and the read
        return total

    def _sample(self):
        now = self.parts() if self.pid is None else self._tree()
        self.peak, self.anon = max(self.peak, now["VmRSS"]), max(self.anon, now["RssAnon"])
        self.file = max(self.file, now["RssFile"])

    def _run(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def one_b_child(case_name: str) -> dict:
    """One case of the 1B part, in this (fresh) process."""
    import resource

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner import assets
    from planner.study import prepare, resolve_spaces

    started = time.perf_counter()
    base = prepare(settings_for(study="bench-cost-1b", latency_budget=None, target="llama.cpp"))
    config = AutoConfig.from_pretrained(assets.cache_root() / "models" / "smollm2-135m")
    for key, value in LLAMA_1B.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    made = time.perf_counter()
    parameters = sum(p.numel() for p in model.parameters())
    float_bytes = 4 * parameters
    target = base.target
    spaces = target.fit_spaces(resolve_spaces(base.settings, model, target.space_defaults()), model)
    bench = replace(base, model=model, spaces=spaces, context=replace(base.context, model_id=f"random:{ONE_B}"),
                    baseline={})
    with PeakMemory() as study_peak:
        study = new_study(bench)  # writes the reference GGUF and measures the baseline
    joined = time.perf_counter()
    baseline = study.user_attrs.get("baseline_measurements") or {}
    rss_before = PeakMemory.rss()
    with PeakMemory() as trial_peak:
        row = run_trial(bench, study, ONE_B_CASES[case_name])
    attrs = study.trials[-1].user_attrs
    written = attrs.get("measurements", {}).get("runtime", {})
    row["seconds"]["conversion"] = written.get("write_seconds")
    row.update(parameters=parameters, float32_bytes=float_bytes, writer=written.get("writer"),
               rss_before_trial=rss_before, peak_rss_trial=trial_peak.peak, peak_rss_study_setup=study_peak.peak,
               peak_rss_children=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
               peak_rss_process=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               setup_seconds={"random model": made - started, "reference GGUF + baseline": joined - made},
               cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
    return row


def one_b_part(done: dict) -> None:
    import subprocess

    print(f"\n{ONE_B}: one case per fresh process (llama.cpp target, demo.toml protocol)")
    for name in ONE_B_CASES:
        if (ONE_B, name) not in done:
            out = subprocess.run([sys.executable, __file__, "--llama-1b-case", name], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit(f"the 1B case '{name}' failed")
            done = load_log()
        row = done[(ONE_B, name)]
        gb = row["float32_bytes"] / 1e9
        print(f"  {name:<40} {fmt(row['seconds'])}  conversion {row['seconds']['conversion']:.1f}"
              f"   [{row['label']}]")
        print(f"    peak memory: trial {row['peak_rss_trial'] / 1e9:.1f} GB ({row['peak_rss_trial'] / row['float32_bytes']:.2f}x "
              f"the float32 model's {gb:.2f} GB; {row['rss_before_trial'] / 1e9:.1f} GB held before it), converter "
              f"subprocess {row['peak_rss_children'] / 1e9:.1f} GB; study setup once: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in row["setup_seconds"].items())
              + f" (peak {row['peak_rss_study_setup'] / 1e9:.1f} GB); {row['parameters'] / 1e9:.2f} B parameters, "
              f"{row['cpu_capability']}, {row['threads']} threads, load {row['load_average']:.2f}")


def summary(done: dict) -> None:
    print("\nscaling, total seconds per trial (planner objective):")
    models = ["small (random, 12 x 256)", "builtin smollm2-135m", "large (random, 32 x 960)"]
    print(f"  {'candidate':<30}" + "".join(f"{m:>28}" for m in models))
    for label in SCALING_CANDIDATES:
        cells = [done.get((m, label)) for m in models]
        print(f"  {label:<30}" + "".join(f"{c['seconds']['total']:>28.1f}" if c else f"{'-':>28}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-student", action="store_true")
    parser.add_argument("--llama-1b", action="store_true", help="only the Llama-3.2-1B-sized cases")
    parser.add_argument("--llama-1b-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_1b_case:
        from planner.quiet import quiet_libraries

        quiet_libraries()
        case(load_log(), ONE_B, args.llama_1b_case, lambda: one_b_child(args.llama_1b_case))
        return
    import torch

    from planner.quiet import quiet_libraries

    quiet_libraries()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    if args.llama_1b:
        one_b_part(load_log())
        return
    builtin_part(load_log(), args.skip_student)
    if not args.skip_scaling:
        scaling_part(load_log())
    summary(load_log())


if __name__ == "__main__":
    main()
