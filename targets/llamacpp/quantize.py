"""llama.cpp's own quantizer, called in process: every GGML type the runtime writes, per tensor.

`quantize_gguf` runs `llama_model_quantize` (llama-cpp-python's ctypes binding of the C API, the code behind
`llama-quantize`) on a float GGUF: a file-type preset (`ftype`, e.g. "Q4_K_M") for the tensors no override
names, per-tensor type overrides (`tt_overrides`, regexes searched in the tensor name, first match wins) and an
importance matrix (`imatrix`: per tensor, the mean squared input activation per input column). K-quants and
IQ-quants come from llama.cpp itself: nothing here re-implements a quantizer.

What llama.cpp does that a planner sizing a candidate must know (llama-quant.cpp, llama-cpp-python 0.3.36;
each rule is checked against the runtime in tests/test_llamacpp_quantize.py):
- Only 2-D and 3-D tensors named `*weight` that are not norms are quantized (`_quantizable`); everything else
  is copied as it is (norms stay F32).
- Overrides apply only when the preset's default type is a quantized one: under F32/F16/BF16 presets llama.cpp
  ignores them, so `quantize_gguf` refuses that combination.
- A row width (the input dimension, GGUF's ne[0]) that is not a multiple of a type's block is written in a
  fallback type (`fallback_type`): the 256-wide K- and IQ-quants drop to a 32-wide type of about their size,
  and a width that is not a multiple of 32 either is written in F16. The built-in model's 576-wide rows are
  not a multiple of 256, so every K-quant and 256-block IQ-quant falls back on its attention and MLP inputs.
  `planned_types` asks llama.cpp itself (a dry run, nothing written) for every tensor's type under a preset
  mixture and overrides, for sizing a candidate exactly before it is built.
- A tied token embedding is quantized in place and stays shared (no `output.weight` is created); without an
  override, presets give the head (`output.weight`, or `token_embd.weight` when tied) Q6_K, or Q8_0 where
  the row width does not fit the preset's default type, or Q5_K for the 1-2 bit IQ presets (`head_type`).
- IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and IQ3_XXS are refused without an importance matrix (Q2_K too, in a
  Q2_K_S file), except on token_embd/output (`requires_imatrix`); there ggml then asserts on IQ1_S, IQ2_XXS
  and IQ2_XS without values and the whole process aborts, so `quantize_gguf` refuses that up front.
- The written file carries `general.file_type` (the ftype) and `general.quantization_version` (2), as
  llama-quantize's files do; with an importance matrix `quantize.imatrix.entries_count` is added, and the
  other `quantize.imatrix.*` keys llama-quantize writes come from `metadata` (see imatrix.quantize_metadata).
"""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from targets.llamacpp.gguf_header import read_header, stored_bytes


class QuantizeError(RuntimeError):
    """llama.cpp could not quantize, or wrote other types than asked; one line saying why."""


@dataclass(frozen=True)
class QuantType:
    """One GGML storage type: `block` weights of a row take `block_bytes` bytes (gguf.GGML_QUANT_SIZES)."""

    name: str
    block: int
    block_bytes: int
    quantized: bool

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block


# Types llama.cpp quantizes a general model's weights to, lowest bits first. Left out: TQ1_0/TQ2_0
# (ternary-trained models only), MXFP4 (llama.cpp uses it for MoE experts only), NVFP4, Q1_0 and Q2_0
# (recent additions; gguf 0.19 cannot read Q2_0, and Q1_0's 128-wide blocks have no fallback).
MENU_NAMES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K", "IQ3_S", "IQ4_XS",
              "Q4_0", "IQ4_NL", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0", "F16", "BF16", "F32")
FLOAT_TYPES = ("F32", "F16", "BF16")  # the menu's unquantized types (norms, and widths no block fits)
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
# ggml_quantize_requires_imatrix: ggml asserts (the whole process aborts) when these get no importance values,
# which llama.cpp lets happen on token_embd/output (exempt from its own check above): see _check_head_tensors.
ABORTS_WITHOUT_IMATRIX = frozenset({"IQ1_S", "IQ2_XXS", "IQ2_XS"})
# llama-quant.cpp tensor_type_fallback: a 256-block type whose block does not fit a row -> a 32-block type.
FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
            "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
            "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# llama-quantize's presets (LLAMA_FTYPE_*) -> the type of the tensors its mixture leaves at the default
# (llama_ftype_get_default_type); the mixture itself raises some tensors (attn_v, ffn_down, the head).
PRESETS = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K",
           "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q5_1": "Q5_1", "Q5_0": "Q5_0",
           "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_1": "Q4_1", "Q4_0": "Q4_0", "IQ4_NL": "IQ4_NL",
           "IQ4_XS": "IQ4_XS", "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "IQ3_M": "IQ3_S",
           "IQ3_S": "IQ3_S", "IQ3_XS": "IQ3_S", "IQ3_XXS": "IQ3_XXS", "Q2_K": "Q2_K", "Q2_K_S": "Q2_K",
           "IQ2_M": "IQ2_S", "IQ2_S": "IQ2_XS", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS", "IQ1_M": "IQ1_M",
           "IQ1_S": "IQ1_S"}
_LOW_IQ_PRESETS = frozenset({"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
# an untied token_embd under these presets (llama_tensor_get_type_impl's TOKEN_EMBD branch); else the default
_UNTIED_EMBEDDING = {"IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ1_S": "Q2_K", "IQ1_M": "Q2_K", "IQ2_S": "IQ3_S",
                     "IQ2_M": "IQ3_S", "IQ3_XXS": "IQ3_S"}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, written as general.quantization_version
IMATRIX_ENTRIES_KEY = "quantize.imatrix.entries_count"


def quant_type(name: str) -> QuantType:
    """A menu type by its GGML name ("Q4_K", "IQ4_XS", "F16", ...)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if name not in MENU_NAMES:
        raise ValueError(f"unknown GGML type {name!r}: llama.cpp's quantizer writes {', '.join(MENU_NAMES)}")
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return QuantType(name, block, size, block > 1)


def menu() -> list[QuantType]:
    return [quant_type(name) for name in MENU_NAMES]


def ftype_id(preset: str) -> int:
    """LLAMA_FTYPE_* value of a preset name ("Q4_K_M", "F32", ...)."""
    from gguf import LlamaFileType

    if preset not in PRESETS:
        raise ValueError(f"unknown llama.cpp file type {preset!r}: one of {', '.join(PRESETS)}")
    return int(LlamaFileType.ALL_F32 if preset == "F32" else LlamaFileType[f"MOSTLY_{preset}"])


def requires_imatrix(type_name: str, tensor: str = "", preset: str = "") -> bool:
    """Whether llama.cpp refuses to write `type_name` for `tensor` without an importance matrix
    (llama-quant.cpp tensor_requires_imatrix: never for token_embd/output; Q2_K only inside a Q2_K_S file)."""
    if tensor in ("token_embd.weight", "output.weight"):
        return False
    return type_name in IMATRIX_REQUIRED or (type_name == "Q2_K" and preset == "Q2_K_S")


def fallback_type(type_name: str, row_width: int) -> str:
    """The type llama.cpp really writes when asked for `type_name` on rows `row_width` wide."""
    block = quant_type(type_name).block
    if row_width % block == 0:
        return type_name
    chosen = FALLBACK.get(type_name, type_name)  # a 32-block type has nothing smaller to drop to
    return chosen if row_width % quant_type(chosen).block == 0 else "F16"


def head_type(preset: str, row_width: int) -> str:
    """The type a preset gives the LM head, `output.weight`, or `token_embd.weight` when the head is tied
    (quantized in place, still shared), when no override names it (llama_tensor_get_type_impl + fallback)."""
    default = PRESETS[preset]
    if not quant_type(default).quantized:
        return default
    if row_width % quant_type(default).block:
        chosen = "Q8_0"
    elif preset in _LOW_IQ_PRESETS:
        chosen = "Q5_K"
    else:
        chosen = "Q8_0" if default == "Q8_0" else "Q6_K"
    return fallback_type(chosen, row_width)


def _head_tensor_type(name: str, width: int, preset: str, pairs, pure: bool, tied: bool) -> str:
    """What llama.cpp writes for token_embd.weight or output.weight (llama_tensor_get_type, for these two)."""
    default = PRESETS[preset]
    if not quant_type(default).quantized:
        return default
    for pattern, kind in pairs:  # llama.cpp's std::regex_search; Python's re agrees on such patterns
        if re.search(pattern, name):
            return fallback_type(kind, width)
    if pure:
        return fallback_type(default, width)
    if name == "output.weight" or tied:
        return head_type(preset, width)
    return fallback_type(_UNTIED_EMBEDDING.get(preset, default), width)


def _check_head_tensors(shapes, preset: str, pairs, pure: bool, imatrix) -> None:
    """Refuse what would abort the process: llama.cpp exempts token_embd/output from its importance-matrix
    check (it throws for other tensors), but ggml then asserts on IQ1_S/IQ2_XXS/IQ2_XS with no values."""
    tied = "output.weight" not in shapes
    for name in ("token_embd.weight", "output.weight"):
        if name not in shapes:
            continue
        kind = _head_tensor_type(name, shapes[name][-1], preset, pairs, pure, tied)
        values = (imatrix or {}).get(name)
        if kind in ABORTS_WITHOUT_IMATRIX and (values is None or np.size(values) != shapes[name][-1]):
            raise QuantizeError(f"{name} would be {kind}, which needs importance-matrix values for it "
                                f"({shapes[name][-1]} of them; llama.cpp would abort the process)")


def type_bytes(type_name: str, shape: Sequence[int]) -> int:
    """Exact bytes of a tensor of `shape` (torch order: the last dimension is the row) stored as `type_name`."""
    quant_type(type_name)  # a name llama.cpp knows, or its error
    try:
        return stored_bytes(type_name, shape)
    except ValueError as error:
        raise ValueError(f"{error} (llama.cpp writes {fallback_type(type_name, int(shape[-1]))} instead)") from None


def tensor_types(path: Path) -> dict[str, str]:
    """{tensor name: GGML type name} read back from a written GGUF."""
    return read_header(path).types()


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape in torch order (rows last)} of a GGUF."""
    return read_header(path).shapes()


def _quantizable(name: str, shape: Sequence[int]) -> bool:
    """llama-quant.cpp tensor_allows_quantization for the tensors of the decoders written here."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _patterns(overrides, shapes: Mapping[str, tuple]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(regex, type) pairs for llama.cpp, and the exact names a dict asked for (checked after writing)."""
    if isinstance(overrides, Mapping):
        for name in overrides:
            if name not in shapes:
                raise QuantizeError(f"no tensor {name!r} in the source GGUF")
            if not _quantizable(name, shapes[name]):
                raise QuantizeError(f"llama.cpp never quantizes {name!r} (1-D, a norm, or not a weight)")
        # anchored and escaped: an exact name must not also match blk.1 -> blk.10
        return [(f"^{re.escape(name)}$", kind) for name, kind in overrides.items()], dict(overrides)
    pairs = [(str(pattern), str(kind)) for pattern, kind in overrides]
    for pattern, _ in pairs:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise QuantizeError(f"bad tensor pattern {pattern!r}: {exc}") from None
    return pairs, {}


class _LogCapture:
    """llama.cpp's log lines while quantizing (it reports a failure only there), kept off the terminal."""

    def __init__(self):
        import llama_cpp

        self.lines: list[str] = []
        self._callback = llama_cpp.llama_log_callback(self._log)  # held: the C side keeps only the pointer

    def _log(self, level, text, user_data):  # noqa: ARG002 - the C signature
        self.lines.append((text or b"").decode("utf-8", "replace"))

    def __enter__(self):
        import llama_cpp

        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        import llama_cpp
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))  # llama-cpp-python's own

    def failure(self) -> str:
        text = "".join(self.lines)
        match = re.search(r"failed to quantize: (.*)", text)
        reason = match.group(1).strip() if match else "no reason logged"
        tensor = re.search(r"offending tensor: (\S+)", text) or re.search(r"for tensor (\S+) in a very", text)
        return reason + (f" (tensor {tensor.group(1)})" if tensor else "")


def _kv_overrides(metadata: Mapping[str, object]):
    """llama_model_kv_override[] (terminated by an empty key) writing `metadata` into the output file."""
    import llama_cpp

    array = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()
    for slot, (key, value) in zip(array, metadata.items()):
        if len(key.encode()) > 127:
            raise QuantizeError(f"metadata key {key!r} is longer than llama.cpp's 127 bytes")
        slot.key = key.encode()
        if isinstance(value, bool):
            slot.tag, slot.value.val_bool = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        elif isinstance(value, int):  # llama.cpp stores it as a uint32 of its absolute value
            slot.tag, slot.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        elif isinstance(value, float):
            slot.tag, slot.value.val_f64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
        else:  # truncated to 127 bytes, as llama-quantize does with a long imatrix path
            slot.tag, slot.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, str(value).encode()[:127]
    return array


def _imatrix_array(imatrix: Mapping[str, np.ndarray], keep: list):
    """llama_model_imatrix_data[] (terminated by a null name); the float buffers are appended to `keep`."""
    import llama_cpp

    array = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for slot, (name, values) in zip(array, imatrix.items()):
        values = np.ascontiguousarray(values, dtype=np.float32).ravel()
        if not np.isfinite(values).all():
            raise QuantizeError(f"the importance matrix of {name} holds non-finite values")
        keep.append(values)
        slot.name = name.encode()
        slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = values.size
    return array


def default_threads() -> int:
    """The CPUs this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def quantize_gguf(src: Path, dst: Path, ftype: str = "Q8_0",
                  overrides: Mapping[str, str] | Iterable[tuple[str, str]] = (),
                  imatrix: Mapping[str, np.ndarray] | None = None, threads: int | None = None,
                  pure: bool = False, allow_requantize: bool = False,
                  metadata: Mapping[str, object] | None = None) -> dict[str, str]:
    """Quantize the GGUF `src` into `dst` with llama.cpp's quantizer; returns the types written, per tensor.

    `ftype`: the preset for every quantizable tensor no override names (its mixture unless `pure`), and the
    file's `general.file_type`. `overrides`: {exact tensor name: type}, checked after writing (each tensor
    holds the type asked or its `fallback_type`, else QuantizeError), or [(regex, type)] as llama-quantize's
    --tensor-type (searched in the name, first match wins). `imatrix`: {GGUF tensor name: mean squared input
    activation per input column}. `metadata`: extra key/values for the file (llama.cpp's kv overrides).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shapes, exact, _ = _run(src, dst, ftype, overrides, imatrix, threads, pure, allow_requantize, metadata)
    written = tensor_types(dst)
    for name, kind in exact.items():
        expected = fallback_type(kind, shapes[name][-1])
        if written[name] != expected:
            raise QuantizeError(f"llama.cpp wrote {name} as {written[name]}, not {expected} "
                                f"({kind} on {shapes[name][-1]}-wide rows)")
    return written


def planned_types(src: Path, ftype: str = "Q8_0", overrides: Mapping[str, str] | Iterable[tuple[str, str]] = (),
                  imatrix: Mapping[str, np.ndarray] | None = None, pure: bool = False) -> dict[str, str]:
    """The types `quantize_gguf` would write, per tensor, without writing anything: llama.cpp's own dry run
    (its preset mixture, overrides and fallbacks), read from the line it logs per tensor. Well under a second."""
    _, _, log = _run(src, None, ftype, overrides, imatrix, 1, pure, False, None)
    text = "".join(log.lines)
    # "[  12/ 272]   blk.0.attn_q.weight   - [  576,   576, 1, 1], type =    f32, size = ... MiB (q5_0)"
    found = re.findall(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^\n(]*(?:\((\w+)\))?", text)
    planned = {name: (new or old).upper() for name, old, new in found}
    if set(planned) != set(tensor_shapes(src)):
        raise QuantizeError(f"could not read llama.cpp's dry run of {Path(src).name} (its log format changed?)")
    return planned


def _run(src, dst, ftype, overrides, imatrix, threads, pure, allow_requantize, metadata):
    """Check the request, then one llama_model_quantize call (a dry run when `dst` is None):
    (source shapes, the exact names a dict asked for, the captured log)."""
    import llama_cpp

    src = Path(src)
    if not src.is_file():
        raise QuantizeError(f"no GGUF file at {src}")
    preset = ftype_id(ftype)
    shapes = tensor_shapes(src)
    pairs, exact = _patterns(overrides, shapes)
    for _, kind in pairs:
        quant_type(kind)
    if pairs and not quant_type(PRESETS[ftype]).quantized:
        raise QuantizeError(f"llama.cpp ignores tensor overrides under the {ftype} file type: "
                            "pass a quantized ftype (it only names the file and types unnamed tensors)")
    _check_head_tensors(shapes, ftype, pairs, pure, imatrix)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or default_threads()
    params.ftype = preset
    params.pure = pure
    params.allow_requantize = allow_requantize
    params.dry_run = dst is None
    keep: list = []  # every buffer the C call reads through a pointer stays referenced until it returns
    if pairs:
        table = (llama_cpp.llama_model_tensor_override * (len(pairs) + 1))()  # zeroed: null-pattern terminator
        for slot, (pattern, kind) in zip(table, pairs):
            keep.append(pattern.encode())
            slot.pattern, slot.type = keep[-1], int(_ggml_type(kind))
        table[len(pairs)].type = llama_cpp.GGML_TYPE_COUNT  # as llama-quantize terminates it
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(table)
    kv = dict(metadata or {})
    if imatrix:
        table = _imatrix_array(imatrix, keep)
        params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(table)
        kv.setdefault(IMATRIX_ENTRIES_KEY, len(imatrix))
    if kv:
        table = _kv_overrides(kv)
        params.kv_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep.append(table)
    with _LogCapture() as log:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst or "").encode(), ctypes.byref(params))
    if status != 0:
        if dst is not None:
            Path(dst).unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp could not quantize {src.name} to {ftype}: {log.failure()}")
    return shapes, exact, log


def _ggml_type(name: str) -> int:
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[name])
