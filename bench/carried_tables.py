"""What carrying the source model's KL gains and compensated ratios into a derived candidate's tables costs.

    .venv/bin/python bench/carried_tables.py [--model builtin:smollm2-135m-float] [--threads 2]

A large candidate that distillation or pruning derived from the source model takes its tables' KL gains and
compensated ratios from the source model's tables (targets/llamacpp/carried.py; its own errors are its own). This
builds the derived candidates of the demo study's space on a model with float weights (a student of depth 0.8
distilled 16 steps, a cut of depth 0.8, a cut of the MLP to 0.75, each unhealed), computes each one's tables both
ways (exact: nothing of the source's; carried: the source's tables cached), and prints per candidate the seconds
of each, the relative difference of the KL gains and of every option (median, 90th percentile), and llama-quant's
allocation at several sizes chosen from each (compensation allowed), the carried choice scored by the exact
table's predicted KL. Appends a row to bench/results/carried_tables.jsonl. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

LOG = Path(__file__).resolve().parent / "results" / "carried_tables.jsonl"


def spread(values) -> dict:
    values = np.asarray(values)
    return {"median": float(np.median(values)), "p90": float(np.quantile(values, 0.9)), "count": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-float")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from _grid import append_row
    from compensated_rows import rescored_allocations
    import targets  # noqa: F401  (registers llama-quant)
    from planner.candidates import copy_modules, own_copy
    from planner.quiet import quiet_libraries
    from planner.sources import DataSource, ModelSource, load_corpus, load_model
    from search_spaces import TECHNIQUES
    from search_spaces.base import BuildContext
    from search_spaces.calibration import calibration_batches
    from search_spaces.distillation import DistillSpec
    from search_spaces.pruning import PruneSpec
    from search_spaces.quantization.spec import AllocationSettings
    from targets.llamacpp import carried, sensitivity
    from targets.llamacpp.allocated import sensitivity_tables
    from targets.llamacpp.carried import source_name

    quiet_libraries()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelSource.parse(args.model), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    settings = AllocationSettings()
    windows = calibration_batches(tokenizer, corpus.train, settings.samples, settings.seq_len, 0)
    work = Path(tempfile.mkdtemp(prefix="bench-carried-"))
    context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, seed=0, cache_dir=work / "carried",
                           model_id=args.model, progress=False)
    started = time.perf_counter()
    sensitivity_tables(model, windows, context, compensate=True)
    source_seconds = round(time.perf_counter() - started, 1)
    print(f"source tables: {source_seconds} s", flush=True)
    carried.CARRY_PARAMETERS = 0  # every derived candidate carries here, whatever its size

    stages = {"distill(depth 0.8, 16 steps)": ("distillation", DistillSpec(depth_keep=0.8, steps=16)),
              "prune(depth 0.8)": ("pruning", PruneSpec(depth_keep=0.8, calibration_samples=16)),
              "prune(mlp 0.75)": ("pruning", PruneSpec(mlp_keep=0.75, calibration_samples=16))}
    menu, rows = sensitivity.MENUS["all"], []
    for label, (technique, spec) in stages.items():
        start = copy_modules(model) if TECHNIQUES[technique].keeps_weights(spec) else own_copy(model)
        derived = TECHNIQUES[technique].apply(start, spec, replace(context, teacher=model, cache_dir=work / "students"))
        upstream = ({"technique": technique, "spec": spec.to_dict()},)
        tables, seconds = {}, {}
        for way in ("exact", "carried"):
            started = time.perf_counter()
            tables[way] = sensitivity_tables(derived, windows, replace(context, upstream=upstream,
                                                                       cache_dir=work / way), compensate=True)
            seconds[way] = round(time.perf_counter() - started, 1)
        exact, carried_tables = tables["exact"], tables["carried"]
        differences = [abs(c.error / e.error - 1) for n in exact["options"]
                       for e, c in zip(exact["options"][n], carried_tables["options"][n]) if e.error > 0]
        allocations = []
        for bpw, kl_exact, kl_carried, same, count in rescored_allocations(exact, carried_tables, menu):
            allocations.append({"bpw": bpw, "predicted_kl_exact": kl_exact, "predicted_kl_carried": kl_carried,
                                "same_type": same, "tensors": count})
            print(f"  {bpw} bpw: predicted KL (exact table) {kl_exact:.5f} exact choice vs {kl_carried:.5f} carried "
                  f"({kl_carried / kl_exact - 1:+.2%}); {same} of {count} tensors in the same type", flush=True)
        layers = sensitivity.layer_count(exact["tensors"])
        source_layers = sensitivity.layer_count(t.gguf_name for t in sensitivity.quantizable(model, {}))
        row = {"candidate": label, "layers": layers, "source_layers": source_layers, "seconds": seconds,
               "options": spread(differences), "allocations": allocations,
               "mapped": {n: source_name(n, layers, source_layers) for n in list(exact["tensors"])[:3]}}
        rows.append(row)
        print(f"{label}: tables {seconds['exact']} s exact, {seconds['carried']} s carried; options moved median "
              f"{row['options']['median']:.2%}, p90 {row['options']['p90']:.2%}", flush=True)
    append_row({"model": args.model, "threads": args.threads, "source_seconds": source_seconds, "candidates": rows,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load": round(os.getloadavg()[0], 2),
                "date": time.strftime("%Y-%m-%d %H:%M")}, LOG)


if __name__ == "__main__":
    main()
