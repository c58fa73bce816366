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
allocation's sum of gain x error) is stored beside the measured one. `--versus-preset ROUNDS` times each
allocation head to head against its preset's file (paired rounds in fresh loads, extended while the decode
interval straddles 1); a 'decode <= preset' menu holds the allocation's predicted decode to the preset's own mix
under the same cost model, tightened by `--decode-factors` while the file is slower beyond its interval.
`--plot` draws KL against bytes. Raw rows: bench/results/llamacpp_allocation.jsonl; table: .txt. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from llamacpp_presets import LATENCY, Reference, gguf_size, keep_row, measure_gguf, table  # noqa: E402

PRESETS = ("Q3_K_M", "Q4_0", "IQ4_XS", "Q4_K_M", "Q5_K_M")
ORIGIN_LIKE = ("Q4_1", "Q5_1")  # the built-in weights' own grids (excluded also where a K-quant falls back to them)
class Menu(NamedTuple):
    """An allocation's knobs as a study samples them."""
    label: str
    family: str  # the type family (sensitivity.MENUS)
    excluded: tuple = ()  # types left out
    speed: float = 0.0  # weight of the predicted decode ratio against predicted KL
    compensate: bool = False  # error-compensated codes allowed
    moves: int = 0  # measured moves refining it
    preset_decode: bool = False  # its predicted decode held to the preset's own (same cost model)


MENUS = {"all": Menu("all types", "all"), "all-gptq": Menu("all types, gptq", "all", compensate=True),
         "all-gptq-refine": Menu("all types, gptq, refined x32", "all", compensate=True, moves=32),
         "all-gptq-decode": Menu("all types, gptq, decode <= preset", "all", compensate=True, preset_decode=True),
         "no-origin": Menu("no Q4_1/Q5_1", "all", ORIGIN_LIKE),
         "no-origin-gptq": Menu("no Q4_1/Q5_1, gptq", "all", ORIGIN_LIKE, compensate=True),
         "no-origin-speed": Menu("no Q4_1/Q5_1, speed 0.3", "all", ORIGIN_LIKE, 0.3),
         "no-origin-gptq-decode": Menu("no Q4_1/Q5_1, gptq, decode <= preset", "all", ORIGIN_LIKE, compensate=True,
                                       preset_decode=True),
         "legacy-speed": Menu("legacy no Q4_1/Q5_1, speed 1", "legacy", ORIGIN_LIKE, 1.0),
         "all-gptq-speed": Menu("all types, gptq, speed 0.3", "all", compensate=True, speed=0.3)}
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
    parser.add_argument("--versus-preset", type=int, default=0, metavar="ROUNDS",
                        help="time each allocation against its preset's file head to head: ROUNDS A/B rounds (fresh "
                             "loads), up to 4x as many while the decode interval straddles 1 (default: not timed)")
    parser.add_argument("--decode-factors", type=lambda text: [float(f) for f in text.split(",")],
                        default=[1.0, 0.96, 0.92], help="a 'decode <= preset' menu's decode targets, as fractions "
                        "of the preset's predicted decode, tried in turn while the file is slower than the preset")
    parser.add_argument("--plot", type=Path, default=None, help="KL against bytes of every row, as a PNG")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llamacpp_allocation"))
    args = parser.parse_args()

    from evaluators.latency import LatencyProtocol
    from evaluators.paired import UNDECIDED, PairedRatio, shown
    from search_spaces.quantization.allocation import Option
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
    from targets.llamacpp.quantize import quantize_gguf, tensor_types
    from targets.llamacpp.runtime import time_ab

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
        tables = sensitivity_tables(model, windows, context, compensate=any(m.compensate for m in chosen_menus))
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

        def head_to_head(candidate: Path, preset: Path) -> dict:
            """The allocation's decode and prefill against the preset's file: paired rounds in fresh loads, more
            while the decode interval straddles 1 (neither faster nor slower shown)."""
            protocol = LatencyProtocol(prompt_tokens=LATENCY.prompt_tokens, new_tokens=LATENCY.new_tokens, warmup=1,
                                       repeats=args.versus_preset, threads=args.threads,
                                       max_repeats=4 * args.versus_preset)
            ab = time_ab(candidate, preset, protocol, lambda iv: iv["decode_ratio"].verdict(1.0) == UNDECIDED)
            decode = PairedRatio(**ab.decode_interval)
            print(f"  decode vs the preset: {shown(decode.ratio, decode.low, decode.high, decode.confidence)}, "
                  f"{ab.rounds} rounds", flush=True)
            return {"decode": ab.decode_interval, "prefill": ab.prefill_interval, "rounds": ab.rounds,
                    "decode_verdict": {"meets": "no slower", "over": "slower"}.get(decode.verdict(1.0), "unclear"),
                    "load_average": [ab.load_average_before, ab.load_average_after]}

        def allocation(preset, target, label, family, excluded, speed, compensate, moves, decode_target) -> dict:
            """The allocation of one menu at `target` bytes, built and measured (and timed against the preset)."""
            menu = [k for k in sensitivity.MENUS[family] if k not in excluded]
            started = time.perf_counter()
            chosen = choose_types(tables, menu, target, costs, speed, excluded, decode_target=decode_target,
                                  compensate=compensate)
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
            row = {"artifact": f"planner alloc @{preset} ({label})", "preset": preset, "menu": label,
                   "compensated": len(blocks), "build_seconds": time.perf_counter() - started, **refinement,
                   "predicted_kl": sum(tables_kl(tables, chosen)), "speed": speed,
                   "predicted_decode": predicted_decode(tables, chosen, costs),
                   **measure_gguf(path, reference, args.threads, latency), **machine}
            if args.versus_preset:
                row["versus_preset"] = head_to_head(path, work / f"{preset}.gguf")
            path.unlink()
            return row

        for preset in args.presets.split(","):
            path = work / f"{preset}.gguf"
            quantize_gguf(f32, path, preset, imatrix=matrix, metadata=metadata, threads=args.threads)
            record({"artifact": f"llama.cpp {preset} + imatrix", "preset": preset,
                    **measure_gguf(path, reference, args.threads, latency), **machine})
            target = gguf_size(path)["tensor_bytes"] - fixed
            # the preset's own mix under the same decode cost model: what a 'decode <= preset' allocation keeps to
            preset_decode = predicted_decode(tables, {n: Option(k, 0, 0.0) for n, k in tensor_types(path).items()
                                                      if n in tables["tensors"]}, costs)
            rows[-1]["predicted_decode"] = preset_decode
            for label, family, excluded, speed, compensate, moves, at_preset in chosen_menus:
                # held to the preset's predicted decode: tighter by each factor in turn while the file, timed head
                # to head, is slower than the preset beyond its interval (the cost model is a few % off)
                for factor in (args.decode_factors if at_preset else (None,)):
                    row = allocation(preset, target, label, family, excluded, speed, compensate, moves,
                                     None if factor is None else factor * preset_decode)
                    if factor is not None:
                        row.update(artifact=f"planner alloc @{preset} ({label} x {factor:g})",
                                   menu=f"{label} x {factor:g}", decode_factor=factor)
                    record(row)
                    if row.get("versus_preset", {}).get("decode_verdict") != "slower":
                        break
            (work / f"{preset}.gguf").unlink()
    notes = (f"\nmodel {args.model}; threads {args.threads}, CPU capability {machine['cpu_capability']}, load {os.getloadavg()[0]:.2f}; "
             "each 'planner alloc @P' row is allocated under preset P's own bytes (with imatrix) for the quantizable "
             "tensors; KL over the full vocabulary against the F32 GGUF. The built-in weights come from a Q4_1 file: "
             "'all types' may use the Q4_1/Q5_1 grids it favours, 'no Q4_1/Q5_1' may not, 'legacy' uses only "
             f"Q4_0/Q4_1/Q5_0/Q5_1/Q8_0; 'speed' weighs the predicted decode ratio (per-type costs timed once, "
             f"{cost_seconds:.0f} s) against predicted KL (1: one-for-one). Sensitivity tables: {seconds:.0f} s.\n")
    text = table(rows) + versus_presets(rows)
    print(text + notes)
    args.out.with_suffix(".txt").write_text(text + "\n" + notes)
    if args.plot:
        plot(rows, args.plot, args.model)


def versus_presets(rows: list[dict]) -> str:
    """Each allocation against its preset: KL and bytes as ratios, decode and prefill head to head."""
    from evaluators.paired import shown

    presets = {r["preset"]: r for r in rows if "menu" not in r}
    lines = []
    for row in (r for r in rows if "menu" in r and "versus_preset" in r):
        preset, versus = presets[row["preset"]], row["versus_preset"]
        decode, prefill = versus["decode"], versus["prefill"]
        lines.append(f"{row['artifact']:<52} KL x {row['kl'] / preset['kl']:.2f}  bytes x "
                     f"{row['mb'] / preset['mb']:.3f}  decode x {shown(decode['ratio'], decode['low'], decode['high'], decode['confidence'])}"
                     f" {versus['decode_verdict']}, prefill x {prefill['ratio']:.3f}; {versus['rounds']} rounds")
    return "\n\nagainst the preset at its bytes (decode/prefill: paired rounds, the allocation's time over the " \
        "preset's):\n" + "\n".join(lines) if lines else ""


def plot(rows: list[dict], path: Path, model: str) -> None:
    """KL (log) against megabytes: the presets, and each menu's allocations at their bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {"llama.cpp presets + imatrix": [r for r in rows if "menu" not in r]}
    tried = [r for r in rows if "decode_factor" in r]  # 'decode <= preset' tries: the kept one per preset drawn
    for row in (r for r in rows if "menu" in r and "decode_factor" not in r):
        series.setdefault(f"planner ({row['menu']})", []).append(row)
    kept = [r for r in tried if r.get("versus_preset", {}).get("decode_verdict") != "slower"]
    if kept:
        series["planner, decode no slower than the preset head to head"] = kept
    for (label, points), marker in zip(series.items(), "osD^vP*X"):
        points = sorted(points, key=lambda r: r["mb"])
        ax.plot([r["mb"] for r in points], [r["kl"] for r in points], marker=marker, label=label)
    if tried:
        ax.scatter([r["mb"] for r in tried], [r["kl"] for r in tried], s=12, c="grey", zorder=0,
                   label="each try at the preset's predicted decode x 1, 0.96, ...")
    for row in series["llama.cpp presets + imatrix"]:
        ax.annotate(row["preset"], (row["mb"], row["kl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("tensor bytes of the file, MB")
    ax.set_ylabel("KL to the F32 model (full vocabulary, 4096 positions)")
    origin = " (weights from a Q4_1 file)" if model == "builtin:smollm2-135m" else ""
    ax.set_title(f"{model}{origin}: llama.cpp's presets and the planner's allocations at their bytes", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
