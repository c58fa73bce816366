"""One tensor through llama.cpp's own quantizer and back, in process: ggml's `ggml_quantize_chunk` (the
function `llama_model_quantize` calls per tensor, importance matrix included) and the type's `to_float`.

The sensitivity table a per-tensor allocation chooses from needs every tensor in every type: through
`llama_model_quantize` that is one whole-model file per type, read back by gguf-py (minutes on the built-in
model); here it is one C call per tensor and type on the weights already in memory (seconds), with the same
bytes as llama.cpp writes (tests/test_llamacpp_quantize.py compares them with a quantized file).
The C calls release the GIL, so row ranges are quantized on several threads at once.
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from targets.llamacpp.quantize import default_threads


class _TypeTraits(ctypes.Structure):  # ggml.h struct ggml_type_traits (checked by name and size on load)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@lru_cache(maxsize=1)
def _ggml():
    import llama_cpp

    folder = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    lib = ctypes.CDLL(os.path.join(folder, "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
    return lib


@lru_cache(maxsize=None)
def _traits(type_name: str) -> tuple[int, int, int, object]:
    """(ggml type id, block, block bytes, to_float) of a type, checked against gguf-py's table."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = GGMLQuantizationType[type_name]
    traits = _ggml().ggml_get_type_traits(int(kind)).contents
    if (traits.type_name or b"").decode().upper() != type_name or \
            (traits.blck_size, traits.type_size) != GGML_QUANT_SIZES[kind]:
        raise RuntimeError(f"ggml's type traits for {type_name} do not match gguf-py's: another ggml version?")
    return int(kind), int(traits.blck_size), int(traits.type_size), _TO_FLOAT(traits.to_float)


def _as_float(values: np.ndarray | None):
    return None if values is None else values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def quantize(type_name: str, weight: np.ndarray, imatrix: np.ndarray | None = None,
             threads: int | None = None) -> np.ndarray:
    """The bytes llama.cpp stores for `weight` (rows x row width, float32) in `type_name`, as uint8
    (rows x row bytes). `imatrix`: one importance value per input column, or None."""
    kind, block, block_bytes, _ = _traits(type_name)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, width = weight.shape
    if width % block:
        raise ValueError(f"{type_name} stores rows in blocks of {block}; a {width}-wide row does not fit")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (width,):
            raise ValueError(f"the importance matrix has {imatrix.size} values for {width} columns")
    elif _ggml().ggml_quantize_requires_imatrix(kind):
        raise ValueError(f"{type_name} needs an importance matrix (ggml would abort without one)")
    out = np.empty((rows, width // block * block_bytes), dtype=np.uint8)
    lib = _ggml()
    lib.ggml_quantize_init(kind)  # the IQ types' lookup tables, built once (not thread-safe the first time)

    def chunk(bounds):
        first, last = bounds
        lib.ggml_quantize_chunk(kind, _as_float(weight), out.ctypes.data, first * width, last - first, width,
                                _as_float(imatrix))

    workers = max(1, min(threads or default_threads(), rows))
    if workers == 1:  # no pool: a pool's start and join cost more than a small block's quantization
        chunk((0, rows))
        return out
    edges = np.linspace(0, rows, workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(chunk, zip(edges[:-1], edges[1:])))
    return out


def dequantize(type_name: str, data: np.ndarray, width: int) -> np.ndarray:
    """float32 rows x width back from `quantize`'s bytes (the runtime's own to_float)."""
    _, block, block_bytes, to_float = _traits(type_name)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows = data.size // (width // block * block_bytes)
    out = np.empty((rows, width), dtype=np.float32)
    to_float(data.ctypes.data, _as_float(out), rows * width)
    return out


def roundtrip(type_name: str, weight: np.ndarray, imatrix: np.ndarray | None = None,
              threads: int | None = None) -> tuple[np.ndarray, int]:
    """(the weights llama.cpp's kernels compute with once `weight` is stored in `type_name`, bytes stored)."""
    data = quantize(type_name, weight, imatrix, threads)
    return dequantize(type_name, data, weight.shape[1]), data.nbytes
