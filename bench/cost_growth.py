"""How the default search's stages grow with the model: seconds and peak resident memory per stage on Llama-shaped
models of 135 M, 360 M and 1.24 B parameters (random weights, the built-in tokenizer and corpus).

    nice -n 5 .venv/bin/python bench/cost_growth.py [--sizes 135M,360M,1.24B] [--plot docs/cost_growth.png]

Each size runs in a fresh process (its peak memory is its own), on the llama.cpp target with the demo study's
evaluation protocol (studies/demo.toml), stage by stage:
- reference + baseline: the float model written as the reference GGUF and measured (perplexity, decode);
- llama-quant tables: the importance matrix, every tensor's error in every type with its compensated options, the
  KL gains (`allocated.sensitivity_tables`, as the first llama-quant trial of a shape computes them);
- decode costs: the per-type decode cost model (`allocated.decode_costs`);
- llama-quant trial: one trial at 5 bits per weight, every type, compensated codes (its tables from the cache);
- student rung: a depth-0.8 student distilled for 16 steps, quantized with RTN Q4_0;
- healed cut: the MLP pruned to 0.75, healed by 16 distillation steps, RTN Q4_0.
Random weights give nonsense perplexity but the same work per token. Rows: bench/results/cost_growth.jsonl (a size
already there is not run again); figures, not assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from trial_cost import LLAMA_1B, PeakMemory, new_study, run_trial, settings_for  # noqa: E402

LOG = ROOT / "bench" / "results" / "cost_growth.jsonl"
SIZES = {
    "135M": {},  # the built-in model's own configuration
    "360M": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                 intermediate_size=2560, head_dim=64),
    "1.24B": LLAMA_1B,
    "3.21B": {**LLAMA_1B, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
              "head_dim": 128},  # Llama-3.2-3B's shape
}
RTN_Q4_0 = {"quantization.method": "rtn", "quantization.rtn.attn_bits": 4, "quantization.rtn.mlp_bits": 4,
            "quantization.rtn.head_bits": 16, "quantization.rtn.group_size": 32, "quantization.rtn.symmetric": True}
# trial parameters as the demo study's space names them (the rung of a student or a healed cut: its first, 16 steps)
TRIALS = {
    "llama-quant trial": {"distillation.enabled": False, "pruning.enabled": False, "quantization.method": "llama-quant",
                          "quantization.llama-quant.bpw": 5.0, "quantization.llama-quant.types": "all",
                          "quantization.llama-quant.speed": 0.0, "quantization.llama-quant.compensate": True,
                          "quantization.llama-quant.refine": 0},
    "student rung": {"distillation.enabled": True, "distillation.depth_keep": 0.8, "pruning.enabled": False,
                     **RTN_Q4_0},
    "healed cut": {"distillation.enabled": False, "pruning.enabled": True, "pruning.depth_keep": 1.0,
                   "pruning.mlp_keep": 0.75, "pruning.heal": True, **RTN_Q4_0},
}
STAGES = ("reference + baseline", "llama-quant tables", "decode costs", *TRIALS)


def random_model(size: str, dtype: str | None = None, **overrides):
    """A Llama-shaped model of `size` (a key of SIZES, `overrides` on top) with random weights (seed 0), held in
    `dtype` (float32 by default), in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner import assets

    config = AutoConfig.from_pretrained(assets.cache_root() / "models" / "smollm2-135m")
    for name, value in {**SIZES[size], **overrides}.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype or "float32")).eval()


def child(key: str, only: tuple[str, ...] = STAGES) -> dict:
    """The stages `only` on one size (a key of SIZES, ``@bfloat16`` or ``@float16`` after it to hold the model in that
    precision, as the study would where float32 does not fit), in this (fresh) process."""
    import resource

    import torch

    from planner.study import prepare, resolve_spaces
    from planner.trial import release_memory
    from search_spaces.calibration import calibration_batches
    from search_spaces.quantization.spec import AllocationSettings
    from targets.llamacpp.allocated import decode_costs, sensitivity_tables

    size, _, dtype = key.partition("@")
    cache = Path(tempfile.mkdtemp(prefix="bench-growth-"))  # nothing cached from another run
    base = prepare(settings_for(study=f"bench-growth-{size}", latency_budget=None, target="llama.cpp"))
    model = random_model(size, dtype)
    parameters = sum(p.numel() for p in model.parameters())
    target = base.target
    spaces = target.fit_spaces(resolve_spaces(base.settings, model, target.space_defaults()), model)
    context = replace(base.context, model_id=f"random:{size}", cache_dir=cache, progress=False)
    bench = replace(base, model=model, spaces=spaces, context=context, baseline={})
    stages = {}

    partial = LOG.with_name(f"cost_growth.{key}.partial.json")

    def staged(name, work):
        if name not in only:
            return None
        started = time.perf_counter()
        partial.write_text(json.dumps({"size": key, "parameters": parameters, "float32_bytes": 4 * parameters,
                                       "stages": stages, "failed_at": name}))  # kept if this stage kills the run
        with PeakMemory() as peak:
            result = work()
        release_memory()  # as after each trial of a study (tables and decode costs are inside a study's first trials)
        stages[name] = {"seconds": round(time.perf_counter() - started, 1), "peak_rss": peak.peak,
                        "peak_anon": peak.anon, "peak_file": peak.file, "load": round(os.getloadavg()[0], 2)}
        print(f"{size} {name}: {stages[name]['seconds']} s, peak {peak.peak / 1e9:.2f} GB (anonymous "
              f"{peak.anon / 1e9:.2f}, mapped files {peak.file / 1e9:.2f})", flush=True)
        return result

    study = staged("reference + baseline", lambda: new_study(bench)) or new_study(bench)  # trials need one
    allocation = AllocationSettings()
    windows = calibration_batches(context.tokenizer, context.calibration, allocation.samples, allocation.seq_len,
                                  context.seed)
    staged("llama-quant tables", lambda: sensitivity_tables(model, windows, context, compensate=True))
    staged("decode costs", lambda: decode_costs(model, context))
    trials = {name: staged(name, lambda p=params: run_trial(bench, study, p)) for name, params in TRIALS.items()}
    partial.unlink(missing_ok=True)
    return {"size": key, "dtype": dtype or "float32", "parameters": parameters, "float32_bytes": 4 * parameters, "stages": stages,
            "trials": {name: {"seconds": t["seconds"], "label": t["label"]} for name, t in trials.items() if t},
            "peak_rss_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_rss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def load() -> dict:
    """The rows by size; a later row of a size (a stage measured again, `--child SIZE --stages ...`) replaces the
    stages it measured and keeps the others."""
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()] if LOG.exists() else []
    merged: dict = {}
    for row in rows:
        earlier = merged.get(row["size"], {"stages": {}})
        merged[row["size"]] = {**earlier, **row, "stages": {**earlier["stages"], **row["stages"]}}
    return merged


def ordered(rows: dict) -> list[str]:
    """The measured sizes, smallest first (a float32 row before a 16-bit one of the same shape)."""
    return sorted(rows, key=lambda key: (rows[key]["parameters"], "@" in key))


def table(rows: dict) -> str:
    """Seconds, peak resident GB and its anonymous part (what the process allocated; the rest is mapped GGUF pages)
    per stage and size."""
    sizes = ordered(rows)
    head = f"{'stage':<22}" + "".join(f"{s.replace('@bfloat16', ' bf16') + ' s':>14}{'GB':>7}{'anon':>6}" for s in sizes)
    lines = [head, "-" * len(head)]
    for stage in STAGES:
        cells = [rows[s]["stages"].get(stage) or ("killed" if rows[s].get("failed_at") == stage else None)
                 for s in sizes]
        lines.append(f"{stage:<22}" + "".join(
            f"{'killed':>14}{'-':>7}{'-':>6}" if c == "killed" else
            f"{c['seconds']:>14.1f}{c['peak_rss'] / 1e9:>7.2f}{c.get('peak_anon', float('nan')) / 1e9:>6.2f}" if c
            else f"{'-':>14}{'-':>7}{'-':>6}" for c in cells))
    lines.append(f"{'parameters (M)':<22}" + "".join(f"{rows[s]['parameters'] / 1e6:>14.0f}{'':>13}" for s in sizes))
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = ordered(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for index, stage in enumerate(STAGES):
        color = f"C{index}"
        for axis, figure in ((left, "seconds"), (right, "peak_anon")):
            for half in (False, True):  # float32 rows joined by a line; 16-bit ones as hollow markers
                points = [(rows[s]["parameters"], rows[s]["stages"][stage][figure] / (1 if figure == "seconds" else 1e9))
                          for s in sizes if ("@" in s) == half and figure in rows[s]["stages"].get(stage, {})]
                if points:
                    axis.plot(*zip(*points), marker="o", color=color, linestyle=":" if half else "-",
                              fillstyle="none" if half else "full",
                              label=None if half or axis is right else stage)
    floats = [s for s in sizes if "@" not in s]
    params = [rows[s]["parameters"] for s in floats]
    left.plot(params, [rows[floats[0]]["stages"]["reference + baseline"]["seconds"] * p / params[0] for p in params],
              "k:", label="proportional to the parameters")
    right.plot(params, [4 * p / 1e9 for p in params], "k--", label="the float32 model")
    right.axhline(16, color="grey", linewidth=0.8)
    for axis, label in ((left, "seconds (2 cores)"), (right, "peak anonymous GB (hollow: held in bfloat16)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle("The default search's stages against the model's size (Llama shapes, random weights)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135M,360M,1.24B",
                        help=f"of {', '.join(SIZES)}; SIZE@bfloat16 holds the model in bfloat16")
    parser.add_argument("--stages", default=",".join(STAGES), help="the stages to run (default: all)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = child(args.child, tuple(args.stages.split(",")))
        LOG.parent.mkdir(parents=True, exist_ok=True)
        with LOG.open("a") as file:
            file.write(json.dumps(row) + "\n")
        return
    for size in args.sizes.split(","):
        if size not in load():
            print(f"{size}: a fresh process", flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", size, "--stages", args.stages])
            if out.returncode != 0:
                partial = LOG.with_name(f"cost_growth.{size}.partial.json")
                if not partial.exists():
                    raise SystemExit(f"the {size} run failed")
                row = {**json.loads(partial.read_text()), "exit": out.returncode}  # -9: killed (out of memory)
                with LOG.open("a") as file:
                    file.write(json.dumps(row) + "\n")
                partial.unlink()
                print(f"the {size} run ended with {out.returncode} in stage {row['failed_at']!r}", flush=True)
    rows = load()
    print(table(rows))
    if args.plot and len(rows) > 1:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
