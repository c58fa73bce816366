"""An importance-matrix file read the way llama-quantize reads it: through ggml's own GGUF loader in the
runtime's libggml-base (gguf_init_from_file with data, the ggml context's tensors), with the rules of
llama.cpp's `common_imatrix_load` (common/imatrix-loader.cpp) and `load_imatrix` (tools/quantize/quantize.cpp)
applied to what that loader hands back. llama-cpp-python ships no libcommon, so those two functions' rules are
restated here line for line; the parsing, the tensor types and the data are ggml's.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

GGML_TYPE_F32, GGUF_TYPE_STRING, GGUF_TYPE_ARRAY = 0, 8, 9


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _library():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    signatures = {
        "gguf_init_from_file": ([ctypes.c_char_p, _InitParams], ctypes.c_void_p),
        "gguf_free": ([ctypes.c_void_p], None), "ggml_free": ([ctypes.c_void_p], None),
        "gguf_get_n_tensors": ([ctypes.c_void_p], ctypes.c_int64),
        "gguf_find_key": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int64),
        "gguf_get_kv_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_arr_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "gguf_get_arr_n": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
        "gguf_get_arr_str": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t], ctypes.c_char_p),
        "gguf_get_val_u32": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_uint32),
        "gguf_find_tensor": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int64),
        "gguf_get_tensor_type": ([ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
        "ggml_get_first_tensor": ([ctypes.c_void_p], ctypes.c_void_p),
        "ggml_get_next_tensor": ([ctypes.c_void_p, ctypes.c_void_p], ctypes.c_void_p),
        "ggml_get_name": ([ctypes.c_void_p], ctypes.c_char_p),
        "ggml_nelements": ([ctypes.c_void_p], ctypes.c_int64),
        "ggml_get_data_f32": ([ctypes.c_void_p], ctypes.POINTER(ctypes.c_float)),
    }
    for name, (args, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return lib


class NotLoadable(ValueError):
    """What llama-quantize would stop on (its error message)."""


def load_like_llama_quantize(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """({tensor name: the importance values llama-quantize hands its quantizer}, {"datasets", "chunk_count",
    "chunk_size", "counts"}); NotLoadable where llama-quantize would exit."""
    lib = _library()
    ctx = ctypes.c_void_p()
    gguf = lib.gguf_init_from_file(str(path).encode(), _InitParams(False, ctypes.pointer(ctx)))
    if not gguf:
        raise NotLoadable(f"ggml's gguf loader cannot read {path} (the legacy .dat reader would be tried next)")
    try:
        if lib.gguf_get_n_tensors(gguf) < 1:
            raise NotLoadable("no data in file")
        keys = {k: lib.gguf_find_key(gguf, k.encode())
                for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")}
        datasets = []
        key = keys["imatrix.datasets"]
        if key != -1 and lib.gguf_get_kv_type(gguf, key) == GGUF_TYPE_ARRAY \
                and lib.gguf_get_arr_type(gguf, key) == GGUF_TYPE_STRING:
            datasets = [lib.gguf_get_arr_str(gguf, key, i).decode() for i in range(lib.gguf_get_arr_n(gguf, key))]
        if -1 in keys.values():
            raise NotLoadable("missing imatrix metadata")
        pairs: dict[str, dict[str, int]] = {}
        tensor = lib.ggml_get_first_tensor(ctx)
        while tensor:
            name = lib.ggml_get_name(tensor).decode()
            for suffix in (".in_sum2", ".counts"):
                if name.endswith(suffix):
                    pairs.setdefault(name[: -len(suffix)], {})[suffix] = tensor
            tensor = lib.ggml_get_next_tensor(ctx, tensor)
        entries, counts = {}, {}
        for name, pair in sorted(pairs.items()):
            if len(pair) != 2:
                raise NotLoadable(f"mismatched sums and counts for {name}")
            types = [lib.gguf_get_tensor_type(gguf, lib.gguf_find_tensor(gguf, f"{name}{s}".encode()))
                     for s in (".in_sum2", ".counts")]
            if types != [GGML_TYPE_F32, GGML_TYPE_F32]:
                raise NotLoadable(f"sums and counts for {name} must be F32")
            sums, count = (np.ctypeslib.as_array(lib.ggml_get_data_f32(pair[s]), (lib.ggml_nelements(pair[s]),))
                           .astype(np.float64) for s in (".in_sum2", ".counts"))
            count = np.rint(count).astype(np.int64)
            per = sums.reshape(count.size, -1)
            safe = np.where(count > 0, count, 1)[:, None]
            entries[name] = np.where(count[:, None] > 0, per / safe, 1.0).reshape(-1).astype(np.float32)
            counts[name] = count
        info = {"datasets": datasets, "chunk_count": lib.gguf_get_val_u32(gguf, keys["imatrix.chunk_count"]),
                "chunk_size": lib.gguf_get_val_u32(gguf, keys["imatrix.chunk_size"]), "counts": counts}
        return entries, info
    finally:
        lib.gguf_free(gguf)
        if ctx:
            lib.ggml_free(ctx)
