"""The planner's per-tensor allocation (method `llama-quant`) against llama.cpp's presets, at each preset's bytes.

    .venv/bin/python bench/llamacpp_allocation.py [--threads 2] [--presets Q4_K_M,Q4_0,...] [--rounds 5]
        [--model builtin:smollm2-135m-float --out bench/results/llamacpp_allocation_float]

For the built-in model (or `--model`, e.g. the float benchmark model, whose weights are on no GGUF grid), the
method's own pipeline (targets/llamacpp/allocated.py): its importance matrix
and sensitivity tables from the calibration split (16 x 256 tokens, as a study computes them), then for each
preset the allocation under that preset-with-imatrix's own bytes for the quantizable tensors, written by
llama.cpp's quantizer with per-tensor overrides and the planner's importance matrix, and measured by the
presets' harness (`llamacpp_presets.measure_gguf`: full-vocabulary KL against the F32 GGUF over 4096 held-out
positions, top-1, perplexity, A/B decode ratio). The presets get the same importance matrix. Two menus:
every type, and without Q4_1 and Q5_1 (also where a K-quant falls back to them: Q5_K on 576-wide rows), on
which the built-in weights (from a Q4_1 file) sit almost losslessly. Predicted KL (the
allocation's sum of gain x error) is stored beside the measured one.
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

from llamacpp_presets import LATENCY, Reference, gguf_size, keep_row, measure_gguf, table  # noqa: E402

PRESETS = ("Q3_K_M", "Q4_0", "IQ4_XS", "Q4_K_M", "Q5_K_M")
ORIGIN_LIKE = ("Q4_1", "Q5_1")  # the built-in weights' own grids (excluded also where a K-quant falls back to them)
# key: (label, type family, types left out, speed, compensated codes allowed, measured moves refining it): the
# allocation's knobs as a study samples them
MENUS = {"all": ("all types", "all", (), 0.0, False, 0), "all-gptq": ("all types, gptq", "all", (), 0.0, True, 0),
         "all-gptq-refine": ("all types, gptq, refined x32", "all", (), 0.0, True, 32),
         "no-origin": ("no Q4_1/Q5_1", "all", ORIGIN_LIKE, 0.0, False, 0),
         "no-origin-speed": ("no Q4_1/Q5_1, speed 0.3", "all", ORIGIN_LIKE, 0.3, False, 0),
         "legacy-speed": ("legacy no Q4_1/Q5_1, speed 1", "legacy", ORIGIN_LIKE, 1.0, False, 0),
         "all-gptq-speed": ("all types, gptq, speed 0.3", "all", (), 0.3, True, 0)}
DEFAULT_MENUS = ("all", "no-origin", "no-origin-speed", "legacy-speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--rounds", type=int, default=LATENCY.repeats)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the tables and compensated blocks here between runs (default: none)")
    parser.add_argument("--menus", default=",".join(DEFAULT_MENUS), help=f"of {', '.join(MENUS)}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llamacpp_allocation"))
    args = parser.parse_args()

    from evaluators.latency import LatencyProtocol
    from planner.quiet import quiet_libraries
    from planner.sources import DataSource, ModelSource, load_corpus, load_model
    from search_spaces.base import BuildContext
    from search_spaces.calibration import calibration_batches
    from search_spaces.quantization.spec import AllocationSettings
    from targets.llamacpp import sensitivity
    from targets.llamacpp.allocated import (CompensatedBlocks, choose_types, decode_costs, predicted_decode, refined,
                                            sensitivity_tables, tables_kl)
    from targets.llamacpp.compensated import base_kind
    from targets.llamacpp.gguf_header import put_tensor_data
    from targets.llamacpp.writer import in_file_order
    from targets.llamacpp.gguf_file import write_gguf
    from targets.llamacpp.imatrix import quantize_metadata
    from targets.llamacpp.quantize import quantize_gguf

    quiet_libraries()
    torch.set_num_threads(args.threads)
    machine = {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    latency = LatencyProtocol(**{**LATENCY.to_dict(), "repeats": args.rounds}) if args.rounds else None
    model, tokenizer = load_model(ModelSource.parse(args.model), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    settings = AllocationSettings()
    jsonl = args.out.with_suffix(".jsonl")
    jsonl.write_text("")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llamacpp-allocation-") as tmp:
        work = Path(tmp)
        f32 = work / "f32.gguf"
        write_gguf(model, tokenizer, f32, name=f"{args.model} F32")
        reference = Reference.compute(f32, tokenizer, corpus.eval, args.threads)
        windows = calibration_batches(tokenizer, corpus.train, settings.samples, settings.seq_len, 0)
        context = BuildContext(tokenizer=tokenizer, calibration=corpus.train, cache_dir=args.cache,
                               model_id=args.model if args.cache else "")
        started = time.perf_counter()
        chosen_menus = [MENUS[key] for key in args.menus.split(",")]
        tables = sensitivity_tables(model, windows, context, compensate=any(m[4] for m in chosen_menus))
        seconds = time.perf_counter() - started
        print(f"importance matrix and sensitivity of {len(tables['tensors'])} tensors: {seconds:.0f} s", flush=True)
        started = time.perf_counter()
        costs = decode_costs(model, context)
        cost_seconds = time.perf_counter() - started
        print(f"decode ratio per type (whole model): {json.dumps({k: round(v, 3) for k, v in costs.items()})} "
              f"in {cost_seconds:.0f} s", flush=True)
        matrix = tables["imatrix"]
        metadata = quantize_metadata(matrix, "imatrix.gguf", ["planner calibration"], settings.samples)
        from gguf import GGUFReader

        fixed = sum(int(t.n_bytes) for t in GGUFReader(str(f32)).tensors if t.name not in tables["tensors"])

        def record(row: dict) -> None:
            keep_row(rows, jsonl, row)
            print(f"{row['artifact']}: {row['mb']:.1f} MB, KL {row['kl']:.4f} (predicted {row.get('predicted_kl', 0):.4f}),"
                  f" top-1 {row['top1']:.3f}, decode x {row.get('decode_ratio', float('nan')):.3f}", flush=True)

        for preset in args.presets.split(","):
            path = work / f"{preset}.gguf"
            quantize_gguf(f32, path, preset, imatrix=matrix, metadata=metadata, threads=args.threads)
            record({"artifact": f"llama.cpp {preset} + imatrix", "preset": preset,
                    **measure_gguf(path, reference, args.threads, latency), **machine})
            target = gguf_size(path)["tensor_bytes"] - fixed
            path.unlink()
            for label, family, excluded, speed, compensate, moves in chosen_menus:
                menu = [k for k in sensitivity.MENUS[family] if k not in excluded]
                started = time.perf_counter()
                chosen = choose_types(tables, menu, target, costs, speed, excluded, compensate=compensate)
                compensator = CompensatedBlocks(model, windows, context, matrix)
                refinement = {}
                if moves:
                    options = AllocationSettings(types=family, exclude=excluded, speed=speed, compensate=compensate,
                                                 refine=moves)
                    refined_choice = refined(model, tables, chosen, target, windows, compensator, options, costs)
                    chosen, refinement = refined_choice.chosen, {"refinement": refined_choice.report()}
                types = {n: base_kind(o.kind) for n, o in chosen.items()}
                if excluded:
                    assert not set(types.values()) & {"Q4_1", "Q5_1"}, "Q4_1 or Q5_1 was chosen"
                path = work / f"alloc-{preset}.gguf"
                written = quantize_gguf(f32, path, "Q8_0", overrides=types, imatrix=matrix, metadata=metadata,
                                        threads=args.threads)
                blocks = compensator.of({n: o.kind for n, o in chosen.items()})
                put_tensor_data(path, in_file_order(model, f32, blocks), written)
                record({"artifact": f"planner alloc @{preset} ({label})", "preset": preset, "menu": label,
                        "compensated": len(blocks), "build_seconds": time.perf_counter() - started, **refinement,
                        "predicted_kl": sum(tables_kl(tables, chosen)), "speed": speed,
                        "predicted_decode": predicted_decode(tables, chosen, costs),
                        **measure_gguf(path, reference, args.threads, latency), **machine})
                path.unlink()
    notes = (f"\nmodel {args.model}; threads {args.threads}, CPU capability {machine['cpu_capability']}, load {os.getloadavg()[0]:.2f}; "
             "each 'planner alloc @P' row is allocated under preset P's own bytes (with imatrix) for the quantizable "
             "tensors; KL over the full vocabulary against the F32 GGUF. The built-in weights come from a Q4_1 file: "
             "'all types' may use the Q4_1/Q5_1 grids it favours, 'no Q4_1/Q5_1' may not, 'legacy' uses only "
             f"Q4_0/Q4_1/Q5_0/Q5_1/Q8_0; 'speed' weighs the predicted decode ratio (per-type costs timed once, "
             f"{cost_seconds:.0f} s) against predicted KL (1: one-for-one). Sensitivity tables: {seconds:.0f} s.\n")
    text = table(rows)
    print(text + notes)
    args.out.with_suffix(".txt").write_text(text + "\n" + notes)


if __name__ == "__main__":
    main()
