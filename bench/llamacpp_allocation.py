"""Per-tensor types from measured sensitivity against llama.cpp's presets, at each preset's own bytes (issue 21).

    .venv/bin/python bench/llamacpp_allocation.py [--threads 2] [--presets Q4_K_M,Q4_0,...] [--calibration 64]

For the float built-in model: the planner's importance matrix (as bench/llamacpp_presets.py computes it), then
every quantizable tensor's importance-weighted squared rounding error in every type of the allocation menu
(targets/llamacpp/sensitivity.py: llama.cpp quantizes, gguf-py dequantizes), then for each preset the
Lagrangian allocation (search_spaces/quantization/allocation.py) under that preset-with-imatrix's own tensor
bytes, written by llama.cpp's quantizer with per-tensor overrides and the same importance matrix, and measured
by the presets' harness (`llamacpp_presets.measure_gguf`: full-vocabulary KL against the F32 GGUF, top-1,
perplexity, A/B decode ratio). Two menus: every type, and without the Q4_1-like grids (Q4_1, Q5_1 and the
K-quants' own fallbacks to them) on which the built-in weights (from a Q4_1 file) sit almost losslessly.
Raw rows: bench/results/llamacpp_allocation.jsonl; table: .txt. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from llamacpp_presets import LATENCY, Reference, calibration_imatrix, gguf_size, measure_gguf, table  # noqa: E402
from search_spaces.quantization.allocation import allocate  # noqa: E402
from targets.llamacpp.quantize import quantize_gguf  # noqa: E402
from targets.llamacpp.sensitivity import ALLOCATION_MENU, type_errors  # noqa: E402

PRESETS = ("Q3_K_M", "Q4_0", "IQ4_XS", "Q4_K_M", "Q5_K_M")
# Grids the Q4_1 origin of the built-in weights favours: Q4_1 and Q5_1 themselves, and Q4_K / Q5_K, which fall
# back to Q5_0 / Q5_1 on 576-wide rows and on 1536-wide rows keep a min-offset per sub-block like Q4_1.
ORIGIN_LIKE = ("Q4_1", "Q5_1", "Q4_K", "Q5_K")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=LATENCY.repeats)
    parser.add_argument("--out", type=Path, default=Path("bench/results/llamacpp_allocation"))
    args = parser.parse_args()

    from evaluators.latency import LatencyProtocol
    from planner.quiet import quiet_libraries
    from planner.sources import DataSource, ModelSource, load_corpus, load_model
    from targets.llamacpp.gguf_file import write_gguf

    quiet_libraries()
    torch.set_num_threads(args.threads)
    machine = {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    latency = LatencyProtocol(**{**LATENCY.to_dict(), "repeats": args.rounds})
    model, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m"), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    jsonl = args.out.with_suffix(".jsonl")
    jsonl.write_text("")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llamacpp-allocation-") as tmp:
        work = Path(tmp)
        f32 = work / "f32.gguf"
        write_gguf(model, tokenizer, f32, name="SmolLM2-135M-Instruct F32")
        reference = Reference.compute(f32, tokenizer, corpus.eval, args.threads)
        matrix, metadata, _ = calibration_imatrix(model, tokenizer, corpus, args.calibration, work)
        del model
        started = time.perf_counter()
        errors = type_errors(f32, matrix, ALLOCATION_MENU, args.threads)
        print(f"sensitivity: {len(errors)} tensors x {len(ALLOCATION_MENU)} types in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        from gguf import GGUFReader

        fixed = sum(int(t.n_bytes) for t in GGUFReader(str(f32)).tensors if t.name not in errors)

        def record(row: dict) -> None:
            rows.append(row)
            with jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{row['artifact']}: {row['mb']:.1f} MB, KL {row['kl']:.4f}, top-1 {row['top1']:.3f}, "
                  f"decode x {row.get('decode_ratio', float('nan')):.3f}", flush=True)

        for preset in args.presets.split(","):
            path = work / f"{preset}.gguf"
            quantize_gguf(f32, path, preset, imatrix=matrix, metadata=metadata, threads=args.threads)
            record({"artifact": f"llama.cpp {preset} + imatrix", "preset": preset,
                    **measure_gguf(path, reference, args.threads, latency), **machine})
            target = gguf_size(path)["tensor_bytes"] - fixed
            path.unlink()
            for menu_name, excluded in (("all types", ()), ("no Q4_1-like", ORIGIN_LIKE)):
                options = {name: [o for o in opts if o.kind not in excluded] for name, opts in errors.items()}
                chosen = allocate(options, target)
                predicted = sum(o.error for o in chosen.values())
                path = work / f"alloc-{preset}-{len(excluded)}.gguf"
                quantize_gguf(f32, path, "Q8_0", overrides={n: o.kind for n, o in chosen.items()}, imatrix=matrix,
                              metadata=metadata, threads=args.threads)
                record({"artifact": f"planner alloc @{preset} ({menu_name})", "preset": preset, "menu": menu_name,
                        "predicted_error": predicted, **measure_gguf(path, reference, args.threads, latency),
                        **machine})
                path.unlink()
    notes = (f"\nthreads {args.threads}, CPU capability {machine['cpu_capability']}, load {os.getloadavg()[0]:.2f}; "
             "each 'planner alloc @P' row is allocated under preset P's own tensor bytes (with imatrix); KL over the "
             "full vocabulary against the F32 GGUF. The built-in weights come from a Q4_1 file: 'all types' may use "
             "the Q4_1-like grids it favours, 'no Q4_1-like' may not.\n")
    text = table(rows)
    print(text + notes)
    args.out.with_suffix(".txt").write_text(text + "\n" + notes)


if __name__ == "__main__":
    main()
