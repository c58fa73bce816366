"""What error-compensated rounding adds to llama-quant's per-shape cost: the sensitivity tables with and without
the compensated options, and the compensated blocks of a whole allocation, timed stage by stage.

    .venv/bin/python bench/compensation_cost.py [--model builtin:smollm2-135m-float] [--threads 2]

Stages (the study's defaults: 16 x 256 calibration tokens): the importance matrix; each tensor's error in every
type of the menu (llama.cpp's rounding: the tables before compensation); the input covariances; every
compensable type's compensated option (what compensation adds to the tables); the KL gains; then the compensated blocks of every tensor in
one type (Q5_0, or Q5_K where a row takes 256-blocks) on whole tensors, as a build writes them. Prints seconds,
threads, CPU capability and load; appends a row to bench/results/compensation_cost.jsonl. Figures, not assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def calibrated(model_name: str, threads: int):
    """(model, its calibration windows as llama-quant's tables take them: the study's defaults on the built-in
    corpus), torch on `threads` threads."""
    from planner.quiet import quiet_libraries
    from planner.sources import DataSource, ModelSource, load_corpus, load_model
    from search_spaces.calibration import calibration_batches
    from search_spaces.quantization.spec import AllocationSettings

    quiet_libraries()
    torch.set_num_threads(threads)
    model, tokenizer = load_model(ModelSource.parse(model_name), torch.device("cpu"))
    corpus = load_corpus(DataSource.parse("builtin:shakespeare"))
    settings = AllocationSettings()
    return model, calibration_batches(tokenizer, corpus.train, settings.samples, settings.seq_len, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-float")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from targets.llamacpp import sensitivity
    from targets.llamacpp.allocated import KL_WINDOWS
    from targets.llamacpp.compensated import FactorCache, block_of, compensated_round, layer_by_layer
    from targets.llamacpp.imatrix import importance_matrix

    model, windows = calibrated(args.model, args.threads)
    seconds = {}

    def timed(stage, work):
        started = time.perf_counter()
        result = work()
        seconds[stage] = round(time.perf_counter() - started, 1)
        print(f"{stage}: {seconds[stage]} s", flush=True)
        return result

    imatrix = timed("importance matrix", lambda: importance_matrix(model, windows, head=True))
    tensors = sensitivity.quantizable(model, imatrix)
    menu = sensitivity.MENUS["all"]
    timed("type errors, llama.cpp's rounding", lambda: sensitivity.type_options(model, tensors, menu))
    covariances = timed("input covariances", lambda: {
        n: c for chunk in sensitivity.compensable_inputs(model, tensors, windows) for n, c in chunk.items()})
    timed("compensated options", lambda: sensitivity.compensated_options(model, tensors, menu, covariances,
                                                                         threads=args.threads))
    timed("KL gains", lambda: sensitivity.kl_gains(model, tensors, windows[:KL_WINDOWS]))
    weights = sensitivity.weights_of(model, tensors)

    def blocks():  # as a build rounds them (CompensatedBlocks.of): a decoder block's tensors side by side
        factors = FactorCache()

        def rounded(tensor):
            covariance = covariances[tensor.gguf_name]
            kind = "Q5_K" if tensor.shape[1] % 256 == 0 else "Q5_0"
            return compensated_round(weights[tensor.gguf_name].detach().float().numpy(), covariance, kind,
                                     tensor.importance, factor=factors(covariance))
        layer_by_layer(rounded, [t for t in tensors if t.gguf_name in covariances],
                       lambda tensor: block_of(tensor.gguf_name), args.threads, factors.clear)
    timed("compensated blocks of every tensor, whole", blocks)
    before = seconds["importance matrix"] + seconds["type errors, llama.cpp's rounding"] + seconds["KL gains"]
    after = before + seconds["input covariances"] + seconds["compensated options"]
    row = {"model": args.model, "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "load": round(os.getloadavg()[0], 2), "seconds": seconds, "tables_before": round(before, 1),
           "tables_after": round(after, 1), "ratio": round(after / before, 2)}
    print(json.dumps(row))
    out = Path("bench/results/compensation_cost.jsonl")
    with out.open("a") as file:
        file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
