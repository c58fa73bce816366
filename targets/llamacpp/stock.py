"""llama.cpp's own quantizer as a study compares against it: `llama-quantize` presets (Q4_K_M, Q4_0, ...) applied
to the source model with an importance matrix computed from the study's calibration text, each file measured by
the same code as every candidate (latency A/B against the same reference, KL and perplexity through the same
windows).

This is what a llama.cpp user would otherwise run (`llama-imatrix` then `llama-quantize --imatrix`), so a study
that names presets in `compare` says, with its own figures, whether its recommendation beats them. The importance
matrix is the one `llama-quant` computes by default (AllocationSettings: 16 x 256 calibration tokens, the study's
seed), so the presets and the planner's allocation weigh their rounding errors by the same activations.
"""
from __future__ import annotations

from pathlib import Path

from search_spaces.base import BuildContext
from search_spaces.calibration import calibration_batches
from search_spaces.quantization.spec import AllocationSettings
from targets.llamacpp.allocated import cached_imatrix
from targets.llamacpp.imatrix import CALIBRATION_DATASET, IMATRIX_FILE, quantize_metadata
from targets.llamacpp.quantize import PRESETS, quant_type, quantize_gguf


def presets() -> dict[str, str]:
    """{preset: what it is} for every quantizing preset of llama-quantize (float presets quantize nothing)."""
    return {name: f"llama-quantize {name} with the study's importance matrix"
            for name, default in PRESETS.items() if quant_type(default).quantized}


def label(preset: str) -> str:
    return f"llama.cpp {preset} + imatrix"


def study_imatrix(model, context: BuildContext, settings: AllocationSettings | None = None
                  ) -> tuple[dict, int, int, str]:
    """(importance matrix, calibration tokens, chunk size, dataset words) of `model` on the study's calibration
    text, as llama-quant computes it with the study's calibration sizes (`settings`; llama-quant's defaults where
    the study has none)."""
    settings = settings or AllocationSettings()
    windows = calibration_batches(context.tokenizer, context.calibration, settings.samples, settings.seq_len,
                                  context.seed)
    dataset = CALIBRATION_DATASET.format(samples=settings.samples, seq_len=settings.seq_len)
    return cached_imatrix(model, windows, context), int(windows.numel()), settings.seq_len, dataset


def quantize_preset(imatrix_of_study: tuple, source: Path, out: Path, preset: str) -> dict[str, str]:
    """Quantize the float GGUF `source` into `out` with the preset and the study's importance matrix (what
    study_imatrix gave for the model `source` holds), with llama-quantize's metadata; returns the types written
    per tensor."""
    imatrix, tokens, chunk, dataset = imatrix_of_study
    return quantize_gguf(source, out, ftype=preset, imatrix=imatrix,
                         metadata=quantize_metadata(imatrix, IMATRIX_FILE, [dataset], tokens // chunk))
