"""The compensated options' covariance passes with and without starting each group where the last one stopped.

    nice -n 5 .venv/bin/python bench/covariance_passes.py [--size 1.24B@bfloat16]

`imatrix.input_covariance_chunks` takes the input covariances a group of decoder blocks at a time (2 GiB); each
group's pass stops past its blocks and, now, the next starts there (`_Resume`). This times both on a Llama-shaped
model with random weights (bench/cost_growth.py's sizes) over the tables' calibration windows (16 x 256 tokens of
random ids), each group's pass from the first layer (before) and resumed (now), and checks the sums are the same.
Appends a row to bench/results/covariance_passes.jsonl. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LOG = ROOT / "bench" / "results" / "covariance_passes.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.24B@bfloat16", help="a size of bench/cost_growth.py")
    args = parser.parse_args()

    import numpy as np
    import torch

    from _grid import append_row
    from cost_growth import random_model
    from planner.quiet import quiet_libraries
    from search_spaces.quantization.spec import AllocationSettings
    from targets.llamacpp import imatrix, sensitivity

    quiet_libraries()
    size, _, dtype = args.size.partition("@")
    model = random_model(size, dtype)
    settings = AllocationSettings()
    windows = torch.randint(0, model.config.vocab_size, (settings.samples, settings.seq_len),
                            generator=torch.Generator().manual_seed(0))
    names = [t.gguf_name for t in sensitivity.quantizable(model, {}) if t.gguf_name != "token_embd.weight"]
    chunks = imatrix.covariance_chunks(model, names)
    seconds, sums = {}, {}
    for way in ("each group from the first layer", "resumed"):
        started = time.perf_counter()
        resume = imatrix._Resume(model) if way == "resumed" else None
        sums[way] = {}
        for chunk in chunks:
            found = imatrix._input_means(model, windows, 4, True, imatrix._second_moment, chunk, resume)
            sums[way].update({n: float(np.asarray(c, dtype=np.float64).sum()) for n, c in found.items()})
            del found
        seconds[way] = round(time.perf_counter() - started, 1)
        print(f"{way}: {seconds[way]} s over {len(chunks)} groups", flush=True)
    same = sums["resumed"] == sums["each group from the first layer"]
    print(f"the same sums: {same}")
    append_row({"size": args.size, "groups": len(chunks), "seconds": seconds, "same_sums": same,
                "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "load": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}, LOG)


if __name__ == "__main__":
    main()
