"""What measuring the compensated options' ratio on fewer rows costs in accuracy and saves in time.

    .venv/bin/python bench/compensated_rows.py [--model builtin:smollm2-135m-float] [--rows 32]

The sensitivity tables scale llama.cpp's importance-weighted error of each tensor and type (128 sampled rows) by the
ratio of the compensated rounding's output error to llama.cpp's rounding's; that ratio costs rows x width^2 per
type, so wide tensors measure it on fewer rows (`sensitivity.compensated_rows`: 32 rows of a 1B model's 8192-wide
MLP down projection, 96 of its 2048-wide tensors). This runs the compensated options of a model twice, the ratio
on all 128 sampled rows and on `--rows` of them (the built-in model's rows are 576-1536 wide: 32 rows hold 4-12x
fewer weights than the 1B rule's), and prints: the options' relative difference (median, 90th percentile, max), the
seconds of each, and llama-quant's allocation at several budgets chosen from each table, the choice from the
subset scored by the full table's predicted KL. Appends a row to bench/results/compensated_rows.jsonl. Figures,
not assertions.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

LOG = Path(__file__).resolve().parent / "results" / "compensated_rows.jsonl"


def rescored_allocations(reference: dict, other: dict, menu, bpws=(4.0, 4.5, 5.0, 6.0)):
    """Per bits per weight: (bpw, the reference table's predicted KL of its own allocation, of the allocation chosen
    from `other` (the options of the same kind and bytes), tensors in the same type, tensors)."""
    from targets.llamacpp.allocated import choose_types, tables_kl

    total = sum(t["size"] for t in reference["tensors"].values())
    for bpw in bpws:
        own, chosen = (choose_types(t, menu, bpw * total / 8) for t in (reference, other))
        rescored = {n: next(o for o in reference["options"][n] if o.kind == c.kind) for n, c in chosen.items()}
        same = sum(own[n].kind == c.kind for n, c in chosen.items())
        yield bpw, sum(tables_kl(reference, own)), sum(tables_kl(reference, rescored)), same, len(own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-float")
    parser.add_argument("--rows", type=int, default=32, help="rows the ratio is measured on in the second run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from _grid import append_row
    from compensation_cost import calibrated
    from targets.llamacpp import sensitivity
    from targets.llamacpp.allocated import KL_WINDOWS
    from targets.llamacpp.imatrix import importance_matrix

    model, windows = calibrated(args.model, args.threads)
    imatrix = importance_matrix(model, windows, head=True)
    tensors = sensitivity.quantizable(model, imatrix)
    menu = sensitivity.MENUS["all"]
    plain = sensitivity.type_options(model, tensors, menu)
    gains = sensitivity.kl_gains(model, tensors, windows[:KL_WINDOWS])
    covariances = {n: c for chunk in sensitivity.compensable_inputs(model, tensors, windows) for n, c in chunk.items()}

    runs, seconds = {}, {}
    for name, rows in (("all", lambda width: sensitivity.ROWS), ("subset", lambda width: args.rows)):
        started = time.perf_counter()
        runs[name] = sensitivity.compensated_options(model, tensors, menu, covariances, ratio_rows=rows,
                                                     threads=args.threads)
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"compensated options, ratio on {name} rows: {seconds[name]} s", flush=True)

    differences = np.array([abs(b.error / a.error - 1) for n in runs["all"]
                            for a, b in zip(runs["all"][n], runs["subset"][n]) if a.error > 0])
    spread = {"median": float(np.median(differences)), "p90": float(np.quantile(differences, 0.9)),
              "max": float(differences.max()), "options": len(differences)}
    print("relative difference of the compensated options: median {median:.4f}, 90th percentile {p90:.4f}, "
          "max {max:.4f} over {options} options".format(**spread))

    info = {t.gguf_name: {"width": t.shape[1], "size": t.size} for t in tensors}

    def table(raw) -> dict:  # as allocated.sensitivity_tables puts them together
        options = sensitivity.predicted_kl_options(plain, gains)
        for name, extra in sensitivity.predicted_kl_options(raw, gains).items():
            options[name] = options[name] + extra
        return {"options": options, "tensors": info}

    allocations = []
    for bpw, kl_all, kl_subset, same, count in rescored_allocations(table(runs["all"]), table(runs["subset"]), menu):
        allocations.append({"bpw": bpw, "predicted_kl_all": kl_all, "predicted_kl_subset": kl_subset,
                            "same_type": same, "tensors": count})
        print(f"{bpw} bpw: predicted KL {kl_all:.5f} (ratio on all rows) vs {kl_subset:.5f} (on {args.rows}); "
              f"{same} of {count} tensors in the same type", flush=True)
    row = {"model": args.model, "rows": args.rows, "threads": args.threads, "seconds": seconds, "spread": spread,
           "allocations": allocations, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "load": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}
    append_row(row, LOG)


if __name__ == "__main__":
    main()
