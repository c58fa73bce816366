"""Whether llama-quant's per-type decode costs move when they are timed on a model's first few decoder layers.

    nice -n 5 .venv/bin/python bench/decode_cost_depth.py [--size 360M] [--layers 4] [--rounds 2]

`allocated.decode_costs` times a large model's cost model on a copy with only its first layers (`cost_layers`:
4 of a 1.24 B Llama's 16), so a 1B study's one-off timing costs about 2.4x less. This times the cost model of a
Llama-shaped model with random weights (bench/cost_growth.py's sizes) on all its layers and on its first
`--layers`, alternately, `--rounds` times each (A B A B: the spread between two timings of the same depth is the
noise the depth's effect is compared with), and prints per type the costs, the relative difference between the
depths and between repeats of one depth, and the seconds of each. Appends a row to
bench/results/decode_cost_depth.jsonl. Figures, not assertions.
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

LOG = ROOT / "bench" / "results" / "decode_cost_depth.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="360M", help="a size of bench/cost_growth.py (SIZE@bfloat16 in bfloat16)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from _grid import append_row
    from cost_growth import random_model
    from planner import assets
    from planner.quiet import quiet_libraries
    from search_spaces.base import BuildContext
    from targets.llamacpp.allocated import decode_costs
    from targets.llamacpp.runtime import serving_threads

    quiet_libraries()
    size, _, dtype = args.size.partition("@")
    model = random_model(size, dtype)
    tokenizer = AutoTokenizer.from_pretrained(assets.cache_root() / "models" / "smollm2-135m")
    context = BuildContext(tokenizer=tokenizer, calibration=[], seed=0, cache_dir=None, model_id=None, progress=False)
    depths = {"all": None, f"first {args.layers}": args.layers}
    costs = {name: [] for name in depths}
    seconds = {name: [] for name in depths}
    for _ in range(args.rounds):
        for name, layers in depths.items():
            started = time.perf_counter()
            costs[name].append(decode_costs(model, context, layers=layers))
            seconds[name].append(round(time.perf_counter() - started, 1))
            print(f"{name} layers: {seconds[name][-1]} s", flush=True)
    shallow = f"first {args.layers}"
    kinds = sorted(costs["all"][0])
    mean = {name: {k: float(np.mean([c[k] for c in runs])) for k in kinds} for name, runs in costs.items()}
    depth_effect = {k: mean[shallow][k] / mean["all"][k] - 1 for k in kinds}
    repeat = {name: {k: max(c[k] for c in runs) / min(c[k] for c in runs) - 1 for k in kinds}
              for name, runs in costs.items()}
    print(f"{'type':8} {'all':>7} {shallow:>9} {'depth':>7} {'repeat all':>10} {'repeat ' + shallow:>16}")
    for k in kinds:
        print(f"{k:8} {mean['all'][k]:7.3f} {mean[shallow][k]:9.3f} {depth_effect[k]:+7.1%} "
              f"{repeat['all'][k]:10.1%} {repeat[shallow][k]:16.1%}")
    row = {"size": args.size, "layers": args.layers, "of": model.config.num_hidden_layers, "rounds": args.rounds,
           "costs": costs, "seconds": seconds, "depth_effect": depth_effect, "repeat_spread": repeat,
           "decode_threads": serving_threads().decode, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "load": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M")}
    append_row(row, LOG)


if __name__ == "__main__":
    main()
