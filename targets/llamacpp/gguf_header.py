"""A GGUF's tensor table and scalar metadata read straight from its header, and a retyped copy of a GGUF with
zeroed blocks: the two things the llama.cpp target does with files many times a study.

Why not gguf-py's GGUFReader: it builds a numpy view for every element of every metadata array, 2-3.5 s on a
135 M model's file (its 49k-token vocabulary and merges), and a study read tensor types, shapes and bytes back
from dozens of files. This reader steps over arrays by their lengths (tens of milliseconds) and keeps only
scalars. The format: github.com/ggml-org/ggml/blob/master/docs/gguf.md (version 2 and 3: 64-bit counts).

`write_zeroed` writes the same model with chosen tensors stored in other types and their blocks all zero: what
a type mix costs to serve, without quantizing anything (allocated.decode_costs). llama.cpp's CPU kernels do the
same work whatever the blocks hold (zero is a valid block of every type: scales 0, nothing denormal), and
llama-quantize spends 8-50 s per type on a 135 M model (i-quants the most) where this copy takes about a second.
Its tensors, types and bytes are those llama-quantize writes for the same per-tensor types
(tests/test_llamacpp_costs.py). It is never shipped and no accuracy is read from it.
"""
from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"GGUF"
ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types (gguf.md): fixed sizes and struct codes; 8 is a string, 9 an array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF this reader understands."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: the row (GGUF's first dimension) last
    kind: str  # GGML type name
    offset: int  # from the start of the data section

    @property
    def n_bytes(self) -> int:
        return stored_bytes(self.kind, self.shape)


@dataclass(frozen=True)
class Header:
    version: int
    fields: dict  # every scalar and string value by key (arrays are left out: a vocabulary is not needed here)
    tensors: list[TensorInfo]
    metadata: tuple[int, int]  # where the key/values are in the file: [start, end)
    kv_count: int  # how many key/values (arrays included) that span holds
    data_start: int  # where the tensor data begins (aligned)

    @property
    def alignment(self) -> int:
        return _alignment(self.fields)

    def types(self) -> dict[str, str]:
        return {t.name: t.kind for t in self.tensors}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.tensors}


class _Cursor:
    def __init__(self, view, path: Path):
        self.view, self.at, self.path = view, 0, path

    def take(self, code: str):
        size = struct.calcsize("<" + code)
        if self.at + size > len(self.view):
            raise GGUFFormatError(f"{self.path.name} ends inside its GGUF header")
        value = struct.unpack_from("<" + code, self.view, self.at)[0]
        self.at += size
        return value

    def string(self) -> str:
        length = self.take("Q")
        raw = bytes(self.view[self.at:self.at + length])
        self.at += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in SCALARS:
            return self.take(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise GGUFFormatError(f"{self.path.name}: unknown GGUF value type {kind}")
        element, count = self.take("I"), self.take("Q")
        if element in SCALARS:
            self.at += count * struct.calcsize("<" + SCALARS[element])
        else:
            for _ in range(count):
                self.value(element)
        return None


def stored_bytes(kind: str, shape) -> int:
    """Bytes of a tensor of `shape` (torch order) stored as GGML type `kind`; ValueError where its rows do not
    fill whole blocks of it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    *outer, width = (int(n) for n in shape)
    if width % block:
        raise ValueError(f"{kind} stores rows in blocks of {block}; a {width}-wide row does not fit")
    return math.prod(outer) * (width // block) * block_bytes


def _alignment(fields: dict) -> int:
    return int(fields.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT))


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset) % alignment


def read_header(path: Path) -> Header:
    """The tensor table and scalar metadata of the GGUF at `path`."""
    from gguf import GGMLQuantizationType

    path = Path(path)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        if view[:4] != MAGIC:
            raise GGUFFormatError(f"{path.name} is not a GGUF file")
        cursor = _Cursor(view, path)
        cursor.at = 4
        version = cursor.take("I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path.name} is GGUF version {version}; versions 2 and 3 are read")
        n_tensors, n_kv = cursor.take("Q"), cursor.take("Q")
        start, fields = cursor.at, {}
        for _ in range(n_kv):
            key = cursor.string()
            value = cursor.value(cursor.take("I"))
            if value is not None:
                fields[key] = value
        end, tensors = cursor.at, []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = [cursor.take("Q") for _ in range(cursor.take("I"))]
            kind, offset = GGMLQuantizationType(cursor.take("I")).name, cursor.take("Q")
            tensors.append(TensorInfo(name, tuple(reversed(dims)), kind, offset))
        return Header(version, fields, tensors, (start, end), n_kv, _align(cursor.at, _alignment(fields)))


def write_zeroed(src: Path, dst: Path, types: Mapping[str, str], header: Header | None = None) -> dict[str, str]:
    """Copy the GGUF `src` into `dst` (its metadata, and every tensor `types` does not name, byte for byte), each
    named tensor stored as its type with zeroed blocks (a type its rows fill whole blocks of: ValueError
    otherwise; llama.cpp's own choice there is quantize.fallback_type); returns the type written per tensor.
    `header`: `src`'s, where the caller has read it already."""
    from gguf import GGMLQuantizationType

    header = header or read_header(src)
    missing = set(types) - {t.name for t in header.tensors}
    if missing:
        raise KeyError(f"{Path(src).name} has no tensor {sorted(missing)[0]!r}")
    retyped, offset = [], 0
    for tensor in header.tensors:
        kind = types.get(tensor.name, tensor.kind)
        retyped.append((tensor, TensorInfo(tensor.name, tensor.shape, kind, offset)))
        offset = _align(offset + retyped[-1][1].n_bytes, header.alignment)
    with Path(src).open("rb") as source, Path(dst).open("wb") as out:
        out.write(MAGIC + struct.pack("<IQQ", header.version, len(header.tensors), header.kv_count))
        source.seek(header.metadata[0])
        out.write(source.read(header.metadata[1] - header.metadata[0]))
        for _, info in retyped:
            name = info.name.encode()
            out.write(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(info.shape)))
            out.write(struct.pack(f"<{len(info.shape)}Q", *reversed(info.shape)))
            out.write(struct.pack("<IQ", int(GGMLQuantizationType[info.kind]), info.offset))
        out.write(b"\0" * ((-out.tell()) % header.alignment))
        data_start = out.tell()
        for old, new in retyped:
            out.write(b"\0" * (data_start + new.offset - out.tell()))
            if new.kind == old.kind:
                source.seek(header.data_start + old.offset)
                _copy(source, out, old.n_bytes)
            else:
                out.write(bytes(new.n_bytes))
    return {new.name: new.kind for _, new in retyped}


FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2"}


def read_float_tensor(path: Path, name: str, header: Header | None = None) -> "np.ndarray":
    """A float tensor of the GGUF at `path` as float32 (rows, row width), rows in the file's order."""
    import numpy as np

    header = header or read_header(path)
    tensor = next((t for t in header.tensors if t.name == name), None)
    if tensor is None:
        raise KeyError(f"{Path(path).name} has no tensor {name!r}")
    if tensor.kind not in (*FLOAT_DTYPES, "BF16"):
        raise GGUFFormatError(f"{name} is {tensor.kind} in {Path(path).name}, not a float type")
    count = math.prod(tensor.shape)
    with Path(path).open("rb") as file:
        file.seek(header.data_start + tensor.offset)
        raw = file.read(tensor.n_bytes)
    if tensor.kind == "BF16":  # the high half of a float32
        values = (np.frombuffer(raw, "<u2", count).astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, FLOAT_DTYPES[tensor.kind], count).astype(np.float32)
    return values.reshape(-1, tensor.shape[-1])


def put_tensor_data(path: Path, blocks: Mapping[str, "np.ndarray"], kinds: Mapping[str, str]) -> None:
    """Write each tensor's `blocks` (uint8, exactly its stored bytes) in place of the data of the GGUF at `path`;
    each tensor must be there, stored as `kinds[name]`, with that many bytes (GGUFFormatError otherwise: nothing
    is written then)."""
    header = read_header(path)
    where = {t.name: t for t in header.tensors}
    for name, data in blocks.items():
        tensor = where.get(name)
        if tensor is None or tensor.kind != kinds[name] or tensor.n_bytes != data.nbytes:
            found = "no such tensor" if tensor is None else f"{tensor.kind}, {tensor.n_bytes} bytes"
            raise GGUFFormatError(f"{Path(path).name}: {name} was to be {kinds[name]} in {data.nbytes} bytes; "
                                  f"found {found}")
    with Path(path).open("r+b") as file:
        for name, data in blocks.items():
            file.seek(header.data_start + where[name].offset)
            file.write(data.tobytes())


def _copy(source, out, n_bytes: int, chunk: int = 1 << 24) -> None:
    while n_bytes:
        block = source.read(min(chunk, n_bytes))
        if not block:
            raise GGUFFormatError("the source GGUF ends inside its tensor data")
        out.write(block)
        n_bytes -= len(block)


__all__ = ["GGUFFormatError", "Header", "TensorInfo", "put_tensor_data", "read_float_tensor", "read_header", "stored_bytes",
           "write_zeroed"]
