"""Which code writes a candidate's GGUF: llama.cpp's own converter for every architecture it converts and the
runtime loads, and the planner's hand-written writer only where it is measured to be the same file, faster.

On the built-in model (SmolLM2-135M, Llama) the two write byte-identical tensors (272 of 272, float32 and an
rtn Q4_0/Q8_0 candidate) and equal logits in llama.cpp, and the hand-written writer takes 1.0 s a candidate
against the converter's 9.7 s (a subprocess importing torch and transformers): so the writer serves what it
covers (Llama with or without Llama 3 rotary scaling, Mistral, Qwen2 without, all with a byte-level BPE
tokenizer; tests/test_convert.py checks a Llama 3 model's file tensor for tensor against the converter's) and
the converter everything else (SentencePiece vocabularies, Qwen3, Gemma 2/3, Phi-3, OLMo-2, StableLM, GPT-NeoX,
GPT-2, ...). Either way a layer the planner stored on a GGUF grid is written as stored.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from targets.base import CARRIABLE_SECONDS, TABLES_SECONDS
from targets.llamacpp.convert import architectures, check_vocab, convert, converter_supports, hf_architecture
from targets.llamacpp.compensated import SUFFIX
from targets.llamacpp.errors import UnsupportedForGGUF
from targets.llamacpp.gguf_header import put_tensor_data, read_float_tensor, read_header
from targets.llamacpp.imatrix import IMATRIX_FILE, imatrix_digest, quantize_metadata, write_imatrix_file
from targets.llamacpp.quantize import FLOAT_TYPES, quantize_gguf
from targets.llamacpp.gguf_file import gguf_architecture, rope_freqs, vocab_of, write_gguf

HAND_WRITTEN = "planner GGUF writer"
CONVERTER = "llama.cpp converter"
# On a built model, the type plan (targets.llamacpp.allocated.TypePlan) the writer hands llama.cpp's quantizer.
PLAN_ATTRIBUTE = "llama_quant_plan"
# GGUF architectures whose llama.cpp graph takes attention narrower than the hidden size (pruned heads):
# checked by loading a converted head-pruned model; Qwen2, Phi-3 and OLMo-2 convert but do not load.
FREE_HEAD_SPLIT = frozenset({"llama", "qwen3"})


def hand_written_serves(model, tokenizer=None) -> bool:
    try:
        gguf_architecture(model.config)
        if tokenizer is not None:
            vocab_of(tokenizer, model.config.get_text_config().vocab_size)
    except UnsupportedForGGUF:
        return False
    return True


def unsupported(model, tokenizer) -> str | None:
    """Why no GGUF llama.cpp loads can be written for this model and tokenizer (None: one can)."""
    if hand_written_serves(model, tokenizer):
        return None
    return check_vocab(model.config, tokenizer, type(model).__name__)


def gguf_arch(model) -> str | None:
    """The GGUF architecture the model is written as."""
    if hand_written_serves(model):
        return gguf_architecture(model.config)
    return architectures().get(hf_architecture(model.config, type(model).__name__))


def bytes_beyond_held(model) -> int:
    """Bytes a GGUF of `model` stores beyond its tensors as held in memory, for tensors no quantizer re-encodes:
    norms and biases in F32 whatever the model's precision (both writers, as llama.cpp's converter does), and the
    `rope_freqs` (F32, one per rotary pair) both write for llama3 rotary scaling. Reads shapes and dtypes only
    (a meta-device model of a candidate's shapes too); each stored tensor once."""
    seen, beyond = set(), 0
    for tensor in model.parameters():  # shared (tied) parameters are listed once
        if tensor.dim() <= 1 and tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            beyond += tensor.numel() * max(0, 4 - tensor.element_size())
    factors = rope_freqs(model.config.get_text_config())
    return beyond + (0 if factors is None else factors.nbytes)


def write(model, tokenizer, path: Path, name: str = "planner candidate", using: str | None = None) -> dict:
    """Write the GGUF; returns what wrote it and its seconds (recorded with the candidate's figures; the recipe
    keeps the writer, and `using` it, CONVERTER, writes with the converter where the planner's writer would
    serve: a recipe measured on the converter's file ships the converter's file, its metadata bytes too).
    A candidate carrying a llama.cpp type plan (allocated.TypePlan) is written in float, then quantized by
    llama.cpp to the planned type per tensor with its importance matrix."""
    plan = getattr(model, PLAN_ATTRIBUTE, None)
    if plan is None:
        return _write_float(model, tokenizer, Path(path), name, using)
    path = Path(path)
    float_path = path.with_name(f"{path.stem}.float.gguf")
    try:
        info = _write_float(model, tokenizer, float_path, name, using)
        started = time.perf_counter()
        compensated = in_file_order(model, float_path, plan.compensated)
        zero_tensors(float_path, compensated)
        written = quantize_gguf(float_path, path, ftype=plan.ftype(), overrides=plan.types, imatrix=plan.imatrix,
                                metadata=quantize_metadata(plan.imatrix, IMATRIX_FILE, [plan.dataset],
                                                           plan.calibration_tokens // plan.chunk_size))
        # llama.cpp's blocks of the compensated tensors, replaced by the same type's blocks with compensated codes
        put_tensor_data(path, compensated, written)
    finally:
        float_path.unlink(missing_ok=True)
    return {**info, "quantizer": "llama.cpp", "quantize_seconds": time.perf_counter() - started,
            "file_type": plan.ftype(), **types_written(written, plan.compensated),
            "imatrix_digest": imatrix_digest(plan.imatrix),
            "predicted_kl": plan.predicted_kl, **({"refinement": plan.refinement} if plan.refinement else {}),
            **({"tables_carried": list(plan.carried)} if plan.carried else {}),
            **({CARRIABLE_SECONDS: plan.carriable_seconds} if plan.carriable_seconds else {}),
            **({TABLES_SECONDS: plan.tables_seconds} if plan.tables_seconds else {}),
            "allocated_bytes": plan.bytes}


def zero_tensors(float_path: Path, names) -> None:
    """Zero the data of tensors `names` in a float GGUF: those whose blocks llama.cpp writes only to have them
    replaced (the compensated ones) are quantized from zeros, in no time, rather than by its importance-weighted
    scale search (a minute a trial on a 1.24 B model, measured). What it writes for the others, and so the file
    once the compensated blocks are put in place, is byte for byte the same."""
    if not names:
        return
    header = read_header(float_path)
    stored = {t.name: t for t in header.tensors}
    put_tensor_data(float_path, {n: np.zeros(stored[n].n_bytes, dtype=np.uint8) for n in names},
                    {n: stored[n].kind for n in names})


def in_file_order(model, float_path: Path, blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`blocks` (per GGUF tensor, rows in the model's order) with their rows in the order of the float GGUF the
    model was written as: writers reorder rows (llama's q and k for its rotary layout; the converter may do so for
    other architectures), and rows are rounded independently, so each row's blocks go where its weights went. The
    order is read from the file itself: each of its rows found among the model's (exactly, in the file's
    precision). A row not found is refused (UnsupportedForGGUF) rather than written in the wrong place."""
    if not blocks:
        return {}
    from targets.llamacpp.sensitivity import quantizable, weights_of

    header = read_header(float_path)
    tensors = [t for t in quantizable(model, {}) if t.gguf_name in blocks]
    weights = weights_of(model, tensors)
    placed = {}
    for name, data in blocks.items():
        in_file = read_float_tensor(float_path, name, header)
        kind = next(t.kind for t in header.tensors if t.name == name)
        ours = _as_stored(weights[name].detach().float().cpu().numpy(), kind)
        where = {row.tobytes(): i for i, row in enumerate(ours)}
        order = [where.get(row.tobytes()) for row in in_file]
        if len(order) != len(ours) or None in order:
            raise UnsupportedForGGUF(f"the rows of {name} in the written GGUF are not the model's rows: its "
                                     "compensated blocks cannot be placed")
        placed[name] = data[np.asarray(order)]
    return placed


def _as_stored(weights: np.ndarray, kind: str) -> np.ndarray:
    """Float32 rows as a float GGUF of type `kind` holds them, read back as float32."""
    if kind == "F16":
        return weights.astype(np.float16).astype(np.float32)
    if kind == "BF16":
        import torch

        return torch.from_numpy(weights).to(torch.bfloat16).float().numpy()
    return weights


def types_written(written: dict[str, str], compensated=()) -> dict:
    """What a llama.cpp-quantized file holds, read back: its type per tensor, the tensors whose codes are
    error-compensated (`compensated`), the count per type, and the quantized types by count (`stored`, e.g.
    "Q5_0+gptqx100 Q5_0x12 Q8_0x44": what labels and reviews show; ``+gptq`` marks compensated codes)."""
    compensated = sorted(compensated)
    shown = {n: k + SUFFIX if n in compensated else k for n, k in written.items()}
    counts = Counter(shown.values())
    quantized = sorted(((n, k) for k, n in counts.items() if k not in FLOAT_TYPES), reverse=True)
    return {"tensor_types": written, "compensated_tensors": compensated, "type_counts": dict(counts),
            "stored": " ".join(f"{k}x{n}" for n, k in quantized)}


def write_imatrix(model, folder: Path) -> Path | None:
    """The importance matrix a type-planned candidate was quantized with, as llama-imatrix's file beside the
    artifact (`llama-quantize --imatrix` reads it); None for a candidate without one."""
    plan = getattr(model, PLAN_ATTRIBUTE, None)
    if plan is None:
        return None
    path = Path(folder) / IMATRIX_FILE
    write_imatrix_file(path, plan.imatrix, plan.calibration_tokens, plan.chunk_size, [plan.dataset])
    return path


def _write_float(model, tokenizer, path: Path, name: str, using: str | None = None) -> dict:
    started = time.perf_counter()
    if using != CONVERTER and hand_written_serves(model, tokenizer):
        write_gguf(model, tokenizer, path, name=name)
        return {"writer": HAND_WRITTEN, "write_seconds": time.perf_counter() - started}
    info = convert(model, tokenizer, path, name=name)
    return {"writer": CONVERTER, "converter": info.converter, "write_seconds": time.perf_counter() - started}


__all__ = ["CONVERTER", "FREE_HEAD_SPLIT", "bytes_beyond_held", "converter_supports", "gguf_arch", "unsupported", "write"]
