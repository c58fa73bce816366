"""How much each tensor of a model loses in each llama.cpp type: the table a per-tensor allocation chooses from.

For every type of a menu, the whole float GGUF is quantized once by llama.cpp itself (every quantizable tensor
overridden to that type, with the importance matrix), read back and dequantized by gguf-py; a tensor's error
in that type is its importance-weighted squared rounding error, ``sum_rows sum_j imatrix_j (w_ij - q_ij)^2``:
the expected squared error of that projection's output when its inputs have the calibration text's mean squared
activations (the quantity llama.cpp's quantizer itself minimises, and what llama.cpp PR #15550's --target-bpw
allocates on). Bytes are read from the written file, so a type that falls back on a row width (a 256-wide
K-quant on 576-wide rows) is sized and scored as the type really written.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from search_spaces.quantization.allocation import Option
from targets.llamacpp.quantize import _quantizable, quantize_gguf, requires_imatrix

# Types worth allocating for a dense decoder: 2 to 8 bits (the 1-2 bit IQ types need a trained-for-it model).
ALLOCATION_MENU = ("Q2_K", "Q3_K", "IQ3_S", "IQ4_XS", "Q4_0", "IQ4_NL", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1",
                   "Q6_K", "Q8_0")


def _float_tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if _quantizable(tensor.name, shape):
            out[tensor.name] = quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, shape[-1])
    return out


def type_errors(float_gguf: Path, imatrix: Mapping[str, np.ndarray], menu: Sequence[str] = ALLOCATION_MENU,
                threads: int | None = None) -> dict[str, list[Option]]:
    """{tensor: [Option(asked type, bytes written, importance-weighted squared error)]} for every quantizable
    tensor of `float_gguf`; a tensor without importance values (an input embedding) weighs columns equally."""
    from gguf import GGUFReader, quants

    weights = _float_tensors(float_gguf)
    table: dict[str, list[Option]] = {name: [] for name in weights}
    with tempfile.TemporaryDirectory(prefix="planner-sensitivity-") as work:
        for kind in menu:
            if any(requires_imatrix(kind, name) and name not in imatrix for name in weights):
                continue
            path = Path(work) / f"{kind}.gguf"
            quantize_gguf(float_gguf, path, ftype="Q8_0", overrides={name: kind for name in weights},
                          imatrix={n: v for n, v in imatrix.items() if n in weights}, threads=threads, pure=True)
            for tensor in GGUFReader(str(path)).tensors:
                if tensor.name not in weights:
                    continue
                original = weights[tensor.name]
                restored = quants.dequantize(tensor.data, tensor.tensor_type).reshape(original.shape)
                importance = imatrix.get(tensor.name)
                squared = np.square(original.astype(np.float64) - restored)
                error = float(squared.sum(axis=0) @ (importance if importance is not None else np.ones(original.shape[1])))
                table[tensor.name].append(Option(kind, int(tensor.n_bytes), error))
            path.unlink()
    return table
