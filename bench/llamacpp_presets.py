"""llama.cpp's own quantization presets on the built-in model, with the planner's importance matrix and without:
the yardstick the planner's llama.cpp candidates must beat (issue 21).

    .venv/bin/python bench/llamacpp_presets.py [--threads 2] [--rounds 5] [--presets Q4_K_M,Q4_0]
        [--calibration 32] [--resume] [--imatrix-out imatrix.gguf] [--out bench/results/llamacpp_presets]
    .venv/bin/python bench/llamacpp_presets.py --retime --imatrix-in imatrix.gguf [--rounds 9]  # timing only

The float built-in model (SmolLM2-135M-Instruct) is written as an F32 GGUF by the planner's writer; each preset
is made from it by llama.cpp's quantizer (targets/llamacpp/quantize.py, llama_model_quantize), once without an
importance matrix and once with the planner's (targets/llamacpp/imatrix.py: mean squared input activation per
column over `--calibration` x 512-token windows of the corpus' training split, decoder layers only, as
llama-imatrix collects by default). Every file, the planner's candidates' too, is measured by one function,
`measure_gguf(path, reference, ...)`:
- MB: the GGUF's tensor bytes / 1e6 (what llama.cpp holds; "file MB": the whole file, metadata and
  vocabulary included, 1.8 MB more), and bits per weight over all tensor elements;
- KL: mean over positions of KL(F32 || candidate) over the FULL vocabulary (49152 tokens, float64), with its
  99th percentile, top-1 agreement and perplexity, from llama.cpp's own logits over the held-out windows of
  the planner's protocol shape (context 512, stride 512, 4096 tokens: 682 from the start of each of the 6
  held-out plays, 12 windows, 4086 scored positions); the F32 GGUF's log-probabilities are held in memory;
- decode x / prefill x: time per token as a ratio to the F32 GGUF, timed A/B in the same process
  (targets.llamacpp.runtime.time_ab: prompt 128, 32 greedy decode steps, rounds alternating), with threads,
  torch's CPU capability and the load average recorded beside them.
The built-in weights come from a Q4_1 GGUF, so Q4_1 (and the Q4_1-like Q5_1 and Q4_K grids) requantize them
almost losslessly: read those rows as an upper bound of what the types can do, not as a fair comparison.
Figures, not assertions. Raw rows go to <out>.jsonl (one per file, appended as measured), the table to <out>.txt.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluators.latency import LatencyProtocol  # noqa: E402
from evaluators.perplexity import PerplexityProtocol, tokenize_documents  # noqa: E402
from targets.llamacpp.quantize import quantize_gguf, tensor_types  # noqa: E402
from targets.llamacpp.runtime import loaded, time_ab, window_logits  # noqa: E402

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
           "Q6_K", "Q8_0", "IQ4_XS", "IQ3_S")
NEAR_LOSSLESS = ("Q4_1",)  # the built-in weights were a Q4_1 file
HELD_OUT = PerplexityProtocol(context_length=512, stride=512, max_tokens=4096)
LATENCY = LatencyProtocol(prompt_tokens=128, new_tokens=32, warmup=1, repeats=5)


@dataclass
class Reference:
    """The F32 GGUF and its log-probabilities at every scored held-out position, over the full vocabulary."""

    path: Path
    encoded: list  # [(token ids, utf-8 bytes)] per held-out document (evaluators.perplexity.tokenize_documents)
    logprobs: torch.Tensor  # (positions, vocab) float32
    targets: torch.Tensor  # (positions,) the token that came next

    @classmethod
    def compute(cls, path: Path, tokenizer, documents, threads: int) -> "Reference":
        encoded = tokenize_documents(tokenizer, documents, HELD_OUT.max_tokens)
        parts, targets = [], []
        for logits, target in _windows(path, encoded, threads):
            parts.append(torch.log_softmax(logits, dim=-1))
            targets.append(target)
        return cls(path, encoded, torch.cat(parts), torch.cat(targets))


def _windows(path: Path, encoded, threads: int):
    """(float32 logits, targets) of each held-out window, from llama.cpp."""
    with loaded(path, HELD_OUT.context_length, threads, logits_all=True) as llm:
        windows = window_logits(llm, HELD_OUT.context_length, HELD_OUT.stride)
        for ids, _ in encoded:
            yield from windows(ids)


def keep_row(rows: list[dict], jsonl: Path, row: dict) -> dict:
    """Add a measured row to `rows` and append it to the raw file as it is measured (a run cut short keeps it)."""
    rows.append(row)
    with jsonl.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def gguf_size(path: Path) -> dict:
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    tensor_bytes = sum(int(t.n_bytes) for t in tensors)
    elements = sum(int(t.n_elements) for t in tensors)
    return {"tensor_bytes": tensor_bytes, "mb": tensor_bytes / 1e6, "file_bytes": path.stat().st_size,
            "file_mb": path.stat().st_size / 1e6, "bits_per_weight": 8 * tensor_bytes / elements}


def fidelity(path: Path, reference: Reference, threads: int) -> dict:
    """Full-vocabulary KL(reference || candidate), top-1 agreement and perplexity over the held-out windows."""
    kl_parts, nll, agree, offset = [], 0.0, 0, 0
    for logits, targets in _windows(path, reference.encoded, threads):
        n = targets.shape[0]
        p_log = reference.logprobs[offset:offset + n].double()
        if not torch.equal(targets, reference.targets[offset:offset + n]):
            raise ValueError("the held-out tokens differ from the reference's")
        q_log = torch.log_softmax(logits.double(), dim=-1)
        kl_parts.append((p_log.exp() * (p_log - q_log)).sum(dim=-1).clamp_min(0.0))
        nll -= float(q_log.gather(-1, targets[:, None]).sum())
        best = p_log.argmax(dim=-1, keepdim=True)  # ties count as agreement, as evaluators/kl.py counts them
        agree += int((q_log.gather(-1, best)[:, 0] >= q_log.max(dim=-1).values).sum())
        offset += n
    if offset != reference.targets.shape[0]:
        raise ValueError(f"scored {offset} positions, the reference {reference.targets.shape[0]}")
    kl = torch.cat(kl_parts).numpy()
    return {"kl": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)), "top1": agree / offset,
            "perplexity": float(np.exp(nll / offset)), "positions": offset}


def measure_gguf(path: Path, reference: Reference, threads: int, latency: LatencyProtocol | None = LATENCY,
                 eval_threads: int = 1) -> dict:
    """One GGUF (a preset, or any planner candidate) against the F32 reference: size, fidelity (llama.cpp's
    logits do not depend on its thread count; one thread is the fastest on a busy 2-core machine, where two
    spin-waiting threads halve the speed), and speed A/B on `threads`."""
    row = {**gguf_size(path), **fidelity(path, reference, eval_threads)}
    types = collections.Counter(tensor_types(path).values())
    row["tensor_types"] = dict(sorted(types.items(), key=lambda kv: -kv[1]))
    if latency is not None:
        ab = time_ab(path, reference.path, replace(latency, threads=threads))
        row.update(decode_ratio=ab.decode_ratio, prefill_ratio=ab.prefill_ratio, decode_ms=ab.decode["p50_ms"],
                   reference_decode_ms=ab.reference_decode["p50_ms"], load_average=[ab.load_average_before,
                                                                                     ab.load_average_after])
    return row


def calibration_imatrix(model, tokenizer, corpus, windows: int, path: Path) -> tuple[dict, dict, float]:
    """The planner's importance matrix of the float model, written as llama-imatrix's file at `path` (and read
    back), the metadata quantize writes with it, and the seconds it took."""
    from search_spaces.calibration import calibration_batches
    from targets.llamacpp.imatrix import importance_matrix, quantize_metadata, read_imatrix_file, write_imatrix_file

    batches = calibration_batches(tokenizer, corpus.train, windows, HELD_OUT.context_length, seed=0)
    started = time.perf_counter()
    matrix = importance_matrix(model, batches)
    seconds = time.perf_counter() - started
    dataset = f"builtin:shakespeare train split, {windows} x {HELD_OUT.context_length} tokens, seed 0"
    write_imatrix_file(path, matrix, batches.numel(), HELD_OUT.context_length, [dataset])
    back, _ = read_imatrix_file(path)
    assert all(np.allclose(back[name], matrix[name], rtol=1e-6) for name in matrix), "imatrix file round trip"
    print(f"importance matrix: {len(matrix)} tensors from {batches.numel()} tokens in {seconds:.0f} s -> {path}",
          flush=True)
    return matrix, quantize_metadata(matrix, path.name, [dataset], windows), seconds


def table(rows: list[dict]) -> str:
    head = f"{'artifact':<34} {'MB':>7} {'file MB':>7} {'bpw':>5} {'KL':>8} {'KL p99':>7} {'top-1':>6} " \
           f"{'ppl':>7} {'decode x':>8} {'prefill x':>9}  tensor types (count)"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: -r["mb"]):
        types = ", ".join(f"{k} {v}" for k, v in r["tensor_types"].items())
        decode = f"{r['decode_ratio']:8.3f}" if "decode_ratio" in r else f"{'-':>8}"
        prefill = f"{r['prefill_ratio']:9.3f}" if "prefill_ratio" in r else f"{'-':>9}"
        lines.append(f"{r['artifact']:<34} {r['mb']:7.1f} {r['file_mb']:7.1f} {r['bits_per_weight']:5.2f} "
                     f"{r['kl']:8.4f} {r['kl_p99']:7.3f} {r['top1']:6.3f} {r['perplexity']:7.2f} {decode} {prefill}  "
                     f"{types}")
    return "\n".join(lines)


def artifact_name(preset: str, with_imatrix: bool | None) -> str:
    if with_imatrix is None:
        return "F32 GGUF (reference)"
    return f"llama.cpp {preset}" + (" + imatrix" if with_imatrix else "")


def preset_file(f32: Path, work: Path, preset: str, with_imatrix: bool | None, imatrix, threads: int
                ) -> tuple[Path, float]:
    """The preset's GGUF quantized from the F32 one by llama.cpp (the F32 file itself for the reference row)."""
    if with_imatrix is None:
        return f32, 0.0
    matrix, metadata = imatrix
    path = work / f"{preset}{'-imatrix' if with_imatrix else ''}.gguf"
    started = time.perf_counter()
    quantize_gguf(f32, path, preset, imatrix=matrix if with_imatrix else None,
                  metadata=metadata if with_imatrix else None, threads=threads)
    return path, time.perf_counter() - started


def load_imatrix(path: Path) -> tuple[tuple[dict, dict], float]:
    """An importance matrix file written by an earlier run (--imatrix-in), with what quantize writes with it."""
    from targets.llamacpp.imatrix import quantize_metadata, read_imatrix_file

    matrix, info = read_imatrix_file(path)
    return (matrix, quantize_metadata(matrix, path.name, info["datasets"], info["chunk_count"])), 0.0


def retime(rows: list[dict], f32: Path, work: Path, imatrix, latency: LatencyProtocol, threads: int) -> None:
    """Time every row's file again A/B against the F32 GGUF (quantized again: llama.cpp's quantizer is
    deterministic), keeping the earlier timing under "earlier_timing"."""
    for row in rows:
        path, _ = preset_file(f32, work, row["preset"], None if row["preset"] == "F32" else row["imatrix"],
                              imatrix, threads)
        ab = time_ab(path, f32, replace(latency, threads=threads))
        keys = ("decode_ratio", "prefill_ratio", "decode_ms", "reference_decode_ms", "load_average", "latency")
        row["earlier_timing"] = {k: row.get(k) for k in keys}
        row.update(decode_ratio=ab.decode_ratio, prefill_ratio=ab.prefill_ratio, decode_ms=ab.decode["p50_ms"],
                   reference_decode_ms=ab.reference_decode["p50_ms"], latency=latency.to_dict(),
                   load_average=[ab.load_average_before, ab.load_average_after])
        print(f"{row['artifact']}: decode x {ab.decode_ratio:.3f} (was {row['earlier_timing']['decode_ratio']:.3f}),"
              f" load {os.getloadavg()[0]:.2f}", flush=True)
        if path != f32:
            path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads for the A/B timing")
    parser.add_argument("--eval-threads", type=int, default=1, help="llama.cpp threads for the logits")
    parser.add_argument("--rounds", type=int, default=LATENCY.repeats, help="timed A/B rounds per file")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--calibration", type=int, default=32, help="512-token calibration windows (imatrix)")
    parser.add_argument("--imatrix-out", type=Path, help="keep the importance matrix file here")
    parser.add_argument("--imatrix-in", type=Path, help="an importance matrix file of an earlier run")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in <out>.jsonl")
    parser.add_argument("--retime", action="store_true",
                        help="only time the rows of <out>.jsonl again (e.g. on a quieter machine)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llamacpp_presets"))
    args = parser.parse_args()

    from planner.quiet import quiet_libraries
    from planner.sources import DataSource, ModelSource, load_corpus, load_model
    from targets.llamacpp.gguf_file import write_gguf

    quiet_libraries()
    torch.set_num_threads(args.threads)
    machine = {"threads": args.threads, "eval_threads": args.eval_threads,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count()}
    print(f"threads {args.threads}, CPU capability {machine['cpu_capability']}, load {os.getloadavg()[0]:.2f}",
          flush=True)
    jsonl = args.out.with_suffix(".jsonl")
    keep = args.resume or args.retime
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if keep and jsonl.exists() else []
    latency = LatencyProtocol(**{**LATENCY.to_dict(), "repeats": args.rounds})
    model, tokenizer = load_model(ModelSource.parse("builtin:smollm2-135m"), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    with tempfile.TemporaryDirectory(prefix="llamacpp-presets-") as tmp:
        work = Path(tmp)
        f32 = work / "f32.gguf"
        write_gguf(model, tokenizer, f32, name="SmolLM2-135M-Instruct F32")
        if args.imatrix_in:
            imatrix, imatrix_s = load_imatrix(args.imatrix_in)
        else:
            matrix, metadata, imatrix_s = calibration_imatrix(model, tokenizer, corpus, args.calibration,
                                                              args.imatrix_out or work / "imatrix.gguf")
            imatrix = (matrix, metadata)
        del model
        if args.retime:
            retime(rows, f32, work, imatrix, latency, args.threads)
            jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            if not args.resume:
                jsonl.write_text("")
            reference = Reference.compute(f32, tokenizer, corpus.eval, args.eval_threads)
            print(f"reference: {reference.targets.shape[0]} held-out positions, full vocabulary "
                  f"{reference.logprobs.shape[1]}", flush=True)
            jobs = [("F32", None)] + [(p, m) for p in args.presets.split(",") for m in (False, True)]
            for preset, with_imatrix in jobs:
                artifact = artifact_name(preset, with_imatrix)
                if any(r["artifact"] == artifact for r in rows):
                    continue
                started = time.perf_counter()
                path, quantize_s = preset_file(f32, work, preset, with_imatrix, imatrix, args.threads)
                row = {"artifact": artifact, "preset": preset, "imatrix": bool(with_imatrix),
                       "near_lossless_on_this_model": preset in NEAR_LOSSLESS, "quantize_seconds": quantize_s,
                       **measure_gguf(path, reference, args.threads, latency, args.eval_threads), **machine,
                       "held_out": HELD_OUT.to_dict(), "latency": latency.to_dict(),
                       "calibration_windows": args.calibration, "imatrix_seconds": imatrix_s,
                       "seconds": time.perf_counter() - started}
                keep_row(rows, jsonl, row)
                print(f"{artifact}: {row['mb']:.1f} MB, KL {row['kl']:.4f}, top-1 {row['top1']:.3f}, "
                      f"ppl {row['perplexity']:.2f}, decode x {row.get('decode_ratio', float('nan')):.3f} "
                      f"({row['seconds']:.0f} s, load {os.getloadavg()[0]:.2f})", flush=True)
                if path != f32:
                    path.unlink()
    text = table(rows)
    positions = rows[0]["positions"] if rows else 0
    notes = (f"\nthreads {args.threads}, CPU capability {machine['cpu_capability']}; KL over the full vocabulary "
             f"against the F32 GGUF, {positions} held-out positions; decode x = A/B ratio to the F32 GGUF in the "
             f"same run ({args.rounds} rounds); MB = tensor bytes / 1e6.\n"
             "The built-in weights come from a Q4_1 GGUF: Q4_1 (and Q4_1-like grids) requantize them almost "
             "losslessly.\n")
    print(text + notes)
    args.out.with_suffix(".txt").write_text(text + "\n" + notes)


if __name__ == "__main__":
    main()
