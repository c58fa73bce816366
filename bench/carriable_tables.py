"""bench/carriable_tables.py: the llama-quant tables of the 1.24 B random model held in bfloat16 (as a study holds it), fresh cache: total
seconds and carriable_seconds (what a large derived candidate does not spend:
planner/deadline.py leaves them out of its predictions). Run: .venv/bin/python bench/carriable_tables.py >>
bench/results/carriable_tables.jsonl (its last line)."""
import json, os, sys, tempfile, time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from cost_growth import random_model, settings_for
from planner.study import prepare
from search_spaces.calibration import calibration_batches
from search_spaces.quantization.spec import AllocationSettings
from targets.llamacpp.allocated import sensitivity_tables


def main() -> None:
    print("cpu", torch.backends.cpu.get_cpu_capability(), "load", os.getloadavg(), flush=True)
    base = prepare(settings_for(study="carriable-1b", latency_budget=None, target="llama.cpp"))
    model = random_model("1.24B", "bfloat16")
    context = replace(base.context, model_id="random:1.24B", cache_dir=Path(tempfile.mkdtemp(prefix="carriable-")), progress=False)
    a = AllocationSettings()
    windows = calibration_batches(context.tokenizer, context.calibration, a.samples, a.seq_len, context.seed)
    started = time.perf_counter()
    tables = sensitivity_tables(model, windows, context, compensate=True)
    total = time.perf_counter() - started
    print(json.dumps({"size": "1.24B", "dtype": "bfloat16", "tables_seconds": round(total, 1),
                      "carriable_seconds": round(tables["carriable_seconds"], 1), "load_after": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
