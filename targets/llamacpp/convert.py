"""A built candidate as GGUF through llama.cpp's own converter (convert_hf_to_gguf.py).

The converter comes from the same llama-cpp-python source package as the runtime (kept per version by
scripts/install-llama-cpp in ``$PLANNER_CACHE/llama-cpp-converter/<version>/`` with its gguf-py, and the
llama.cpp commit in ``VERSION``), so what it writes is what that runtime reads, for every architecture it
converts. A candidate is saved as a plain Hugging Face folder (its own config: a pruned model or a student is
just another config; safetensors; its tokenizer, with the SentencePiece model the tokenizer was loaded from)
in a temporary folder beside the output, and converted in a subprocess that imports the converter's gguf-py,
never the one this process has.

Layers the candidate stores other than as floats (rtn/GPTQ on GGUF's grids: their exact blocks; 16-bit
layers: their F16/BF16 weight) are written as stored, bit for bit: the subprocess wraps gguf-py's
``GGUFWriter.add_tensor`` so that, when the converter adds such a tensor (named by gguf-py's tensor name map
for the architecture), the candidate's stored tensor goes in its place, in the order of rows the converter
gave the float weight. That order is read from the converter's own output (its float rows matched to the
stored tensor's decoded rows): llama-type q/k projections come out permuted for interleaved rotary pairs,
GPT-NeoX's fused qkv regrouped; whole rows move and blocks never cross a row, so the blocks move with them.
A tensor the converter changed beyond a row permutation cannot be written as stored, and the conversion
fails saying so. The substitution happens as the file is written: no second pass over a float GGUF.

Memory: save_pretrained writes through safetensors without a copy; the converter reads the folder lazily
and writes tensor by tensor; this process holds the model and, for quantized layers, their packed tensors
(which it holds already).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CONVERTER_FOLDER = "llama-cpp-converter"
SCRIPT = "convert_hf_to_gguf.py"
OUTTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # torch dtype name -> --outtype
ARCHITECTURES_FILE = "architectures.json"  # the converter's registry, read once per version (see below)
BLOCKS_KEY = "__blocks__"  # metadata of the stored-tensor file: the model's block count


class ConverterMissing(RuntimeError):
    """llama.cpp's converter for the installed llama-cpp-python is not in the cache (make setup keeps it)."""


class ConversionFailed(RuntimeError):
    """The converter (or the stored-tensor substitution) failed; the message is its last meaningful line."""


@dataclass(frozen=True)
class Converter:
    """llama.cpp's converter kept for one llama-cpp-python version."""

    root: Path
    llama_cpp_python: str
    llama_cpp: str  # llama.cpp's commit

    @property
    def version(self) -> str:
        return f"llama.cpp {self.llama_cpp[:9]} (llama-cpp-python {self.llama_cpp_python})"

    def to_dict(self) -> dict:
        return {"llama_cpp_python": self.llama_cpp_python, "llama_cpp": self.llama_cpp}


@dataclass(frozen=True)
class ConversionInfo:
    """What one conversion wrote."""

    path: Path
    architecture: str  # the GGUF architecture
    hf_architecture: str
    outtype: str
    converter: dict  # Converter.to_dict()
    seconds: float  # wall seconds until this file was written (convert_many: since the batch began)
    stored: dict  # GGUF tensor -> {"from": HF tensor, "type": GGML type, "permuted": rows reordered}

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def cache_root() -> Path:
    """Where the setup keeps the converter: in this Python environment, beside the runtime it matches."""
    return Path(sys.prefix) / "share"


def installed_runtime() -> str | None:
    """The installed llama-cpp-python's version, or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def find_converter(version: str | None = None) -> Converter:
    """The converter kept for `version` (default: the installed runtime's), or ConverterMissing."""
    version = version or installed_runtime()
    if version is None:
        raise ConverterMissing("llama-cpp-python is not installed (make setup installs it with its converter)")
    root = cache_root() / CONVERTER_FOLDER / version
    try:
        facts = dict(line.split(" ", 1) for line in (root / "VERSION").read_text().splitlines() if " " in line)
    except OSError:
        raise ConverterMissing(f"llama.cpp's converter for llama-cpp-python {version} is not in {root.parent} "
                               f"(make setup keeps it)") from None
    return Converter(root, facts.get("llama-cpp-python", version), facts.get("llama.cpp", "unknown"))


def converter_version() -> dict:
    """llama-cpp-python's version and llama.cpp's commit of the converter in use (for recipes)."""
    return find_converter().to_dict()


# --- what the converter and the runtime serve -------------------------------------------------------------

def architectures(converter: Converter | None = None) -> dict[str, str | None]:
    """HF architecture (``config.architectures[0]``) -> the GGUF architecture the converter writes for it.

    Read from the converter itself: a subprocess imports its ``conversion`` package with its gguf-py, loads
    every model module and lists ``ModelBase``'s registered text models with their ``model_arch``; the
    answer is kept beside the converter (one converter version never changes)."""
    converter = converter or find_converter()
    cached = converter.root / ARCHITECTURES_FILE
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory(prefix="planner-architectures-") as work:
        listed = Path(work) / ARCHITECTURES_FILE
        _run_child(["--architectures", str(converter.root), str(listed)], "listing the converter's models")
        found = json.loads(listed.read_text())
    try:  # kept for the next process (written whole, then renamed: never half a file)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}")
        partial.write_text(json.dumps(found, indent=0, sort_keys=True))
        os.replace(partial, cached)
    except OSError:
        pass  # a read-only cache: listed again next time
    return found


def runtime_architectures(converter: Converter | None = None) -> frozenset[str]:
    """The GGUF architectures llama.cpp (this very source) loads: its ``LLM_ARCH_NAMES`` table."""
    converter = converter or find_converter()
    source = (converter.root / "src" / "llama-arch.cpp").read_text(encoding="utf-8")
    return frozenset(re.findall(r'\{\s*LLM_ARCH_\w+\s*,\s*"([^"]+)"\s*\}', source))


def hf_architecture(config, architecture: str | None = None) -> str | None:
    """The architecture name the converter dispatches on: the config's (its text config's, when that names
    one), else `architecture` (e.g. the class name of a model whose config names none yet)."""
    text = getattr(config, "text_config", None)
    for cfg in (text, config):
        names = getattr(cfg, "architectures", None) if cfg is not None else None
        if names:
            return names[0]
    return architecture


def converter_supports(config, architecture: str | None = None) -> str | None:
    """None when llama.cpp's converter converts this architecture and llama.cpp loads what it writes, else
    why not (one line). `architecture` stands in for a config that names none (pass the model's class name)."""
    try:
        converter = find_converter()
    except ConverterMissing as exc:
        return str(exc)
    name = hf_architecture(config, architecture)
    if name is None:
        return "the model's config names no architecture"
    try:
        known = architectures(converter)
    except ConversionFailed as exc:
        return str(exc)
    if name not in known:
        return f"llama.cpp's converter ({converter.version}) does not convert {name}"
    gguf_arch = known[name]
    if gguf_arch is None or gguf_arch not in runtime_architectures(converter):
        return f"llama.cpp ({converter.version}) does not load the {gguf_arch} GGUF its converter writes for {name}"
    return None


def check_vocab(config, tokenizer, architecture: str | None = None, text: str | None = None,
                timeout: float | None = 300) -> str | None:
    """None when the converter writes this tokenizer's vocabulary (``--vocab-only``: a few seconds) and, given
    `text`, llama.cpp tokenizes it exactly as `tokenizer` does; else why not, in one line (e.g. a BPE
    pre-tokenizer llama.cpp does not know: the converter recognises them by a hash of their output)."""
    why = converter_supports(config, architecture)
    if why:
        return why
    converter = find_converter()
    with tempfile.TemporaryDirectory(prefix="planner-vocab-") as work:
        folder, vocab = Path(work) / "hf", Path(work) / "vocab.gguf"
        config = config.__class__.from_dict(config.to_dict())  # a copy: naming the architecture on it
        config.architectures = [hf_architecture(config, architecture)]
        config.save_pretrained(folder)
        _save_tokenizer(tokenizer, folder)
        job = {"args": [str(folder), "--outfile", str(vocab), "--outtype", "f32", "--vocab-only"], "stored": None,
               "report": str(Path(work) / "vocab.json")}
        try:
            _run_jobs(converter, [job], timeout)
        except ConversionFailed as exc:
            return str(exc)
        return None if text is None else _same_tokens(vocab, tokenizer, text)


def _same_tokens(vocab: Path, tokenizer, text: str) -> str | None:
    import contextlib

    from llama_cpp import Llama

    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        llm = Llama(str(vocab), vocab_only=True, verbose=False)
    try:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
    theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ours == theirs:
        return None
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"llama.cpp would tokenize differently from the model's tokenizer ({len(ours)} tokens vs "
            f"{len(theirs)}, first difference at token {first})")


# --- conversion ---------------------------------------------------------------------------------------------

def outtype_of(model) -> str:
    """The converter's --outtype for the model's float dtype (float32 -> f32: nothing is rounded)."""
    from targets.llamacpp.errors import UnsupportedForGGUF

    dtype = str(model.dtype).removeprefix("torch.")
    if dtype not in OUTTYPES:
        raise UnsupportedForGGUF(f"no GGUF float type for a {dtype} model")
    return OUTTYPES[dtype]


def convert(model, tokenizer, path: Path, *, name: str = "planner candidate", timeout: float | None = None,
            converter: Converter | None = None) -> ConversionInfo:
    """Write `model` (a built candidate: transformers model, any config) and `tokenizer` as one GGUF at `path`
    through llama.cpp's converter; layers stored on GGUF grids or at 16 bits are written as stored.

    Raises ConverterMissing (no converter kept for the installed runtime), UnsupportedForGGUF (the
    architecture is not converted or not loaded by llama.cpp; a layer stored on another grid) and
    ConversionFailed (the converter's own error, in one line). `path` is written only when complete."""
    [info] = convert_many([(model, tokenizer, path)], name=name, timeout=timeout, converter=converter)
    return info


def convert_many(items, *, name: str = "planner candidate", timeout: float | None = None,
                 converter: Converter | None = None) -> list[ConversionInfo]:
    """`convert` for several (model, tokenizer, path), in one converter process (its imports, a few seconds,
    paid once). Every model is saved first (beside its output) and converted in turn; the first failure is
    raised, naming its output."""
    from targets.llamacpp.errors import UnsupportedForGGUF  # (not at the top: this file is also the subprocess)

    started = time.perf_counter()
    converter = converter or find_converter()
    paths = [Path(path) for _, _, path in items]
    works = []
    try:
        jobs, facts = [], []
        for (model, tokenizer, _), path in zip(items, paths):
            why = converter_supports(model.config, type(model).__name__)
            if why:
                raise UnsupportedForGGUF(why)
            path.parent.mkdir(parents=True, exist_ok=True)
            works.append(tempfile.TemporaryDirectory(prefix=".planner-convert-", dir=path.parent))
            jobs.append(_prepare(model, tokenizer, Path(works[-1].name), name))
            facts.append((hf_architecture(model.config, type(model).__name__), outtype_of(model)))
        reports = _run_jobs(converter, jobs, timeout, paths)
        infos = []
        for (model, _, _), path, job, report, (hf_arch, outtype) in zip(items, paths, jobs, reports, facts):
            why = layer_types_reason(model.config, Path(job["args"][2]))
            if why:
                raise UnsupportedForGGUF(why)
            os.replace(job["args"][2], path)
            infos.append(ConversionInfo(path, report["architecture"], hf_arch, outtype, converter.to_dict(),
                                        time.perf_counter() - started, report["stored"]))
        return infos
    finally:
        for work in works:
            work.cleanup()


def layer_types_reason(config, gguf_path: Path | None = None) -> str | None:
    """Why llama.cpp would attend differently from the model, or None: the config places sliding-window
    layers (``layer_types``) other than its class does by default for that depth (e.g. a depth cut of Gemma 2
    or 3 that removed layers out of step), and the GGUF (when given) does not carry the placement: the
    converter writes it for some architectures only; for the others llama.cpp's graph uses the fixed pattern."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = list(getattr(config, "layer_types", None) or [])
    if "sliding_attention" not in types:
        return None
    try:
        default = list(type(config)(num_hidden_layers=config.num_hidden_layers).layer_types or [])
    except Exception:  # noqa: BLE001 - a config class that cannot be made bare: nothing to compare
        return None
    if types == default:
        return None
    if gguf_path is not None:
        from gguf import GGUFReader

        if any(key.endswith(".attention.sliding_window_pattern") for key in GGUFReader(str(gguf_path)).fields):
            return None
    return (f"llama.cpp's {config.model_type} graph places sliding-window layers by its fixed pattern; this "
            f"model's layer_types are another ({types.count('sliding_attention')} of {len(types)} sliding)")


def _prepare(model, tokenizer, work: Path, name: str) -> dict:
    """The model as a plain HF folder in `work` (and its stored tensors beside it): one converter job."""
    folder = work / "hf"
    model.save_pretrained(folder)
    _save_tokenizer(tokenizer, folder)
    stored = stored_tensors(model)
    stored_file = None
    if stored:
        import torch
        from safetensors.torch import save_file  # writes from the tensors' memory: no copy of the blocks

        stored_file = work / "stored.safetensors"
        blocks = getattr(model.config.get_text_config(), "num_hidden_layers", 0)
        save_file({key: torch.from_numpy(data) for key, (data, _) in stored.items()}, str(stored_file),
                  metadata={BLOCKS_KEY: str(blocks), **{key: kind for key, (_, kind) in stored.items()}})
    args = [str(folder), "--outfile", str(work / "model.gguf"), "--outtype", outtype_of(model), "--model-name", name]
    return {"args": args, "stored": str(stored_file) if stored_file else None, "report": str(work / "report.json")}


def stored_tensors(model) -> dict[str, tuple[np.ndarray, str]]:
    """HF weight name -> (the tensor the layer stores, its GGML type name) for every layer stored other than
    as its float weight: GGUF blocks (out x bytes) or the 16-bit weight (out x in)."""
    from search_spaces.layers import is_transposed
    from search_spaces.quantization.modules import FLOAT, PACKED, StoredWeights
    from targets.llamacpp.gguf_file import module_tensors

    out = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, StoredWeights) or module.stored_kind not in (PACKED, FLOAT):
            continue
        [(_, data, kind)] = [entry for entry in module_tensors(module) if entry[0] == "weight"]
        if module.stored_kind == FLOAT and is_transposed(module):  # GPT-2's Conv1D holds (in, out)
            data = data.T
        out[f"{module_name}.weight"] = (np.ascontiguousarray(data), kind.name)
    return out


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer's files, and the SentencePiece model it was loaded from (transformers' fast tokenizers
    do not save it; the converter reads SentencePiece vocabularies from it)."""
    import shutil

    tokenizer.save_pretrained(folder)
    source = getattr(tokenizer, "vocab_file", None)
    if not (isinstance(source, str) and source.endswith(".model")):  # a fast tokenizer loaded from a folder
        source = str(Path(getattr(tokenizer, "name_or_path", "") or "/nonexistent") / "tokenizer.model")
    if Path(source).is_file() and not (folder / "tokenizer.model").exists():
        shutil.copyfile(source, folder / "tokenizer.model")


def _run_jobs(converter: Converter, jobs: list[dict], timeout: float | None, names=None) -> list[dict]:
    """Run converter jobs in one subprocess; their reports, or ConversionFailed for the first that failed."""
    doing = f"llama.cpp's converter ({converter.version})"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as listing:
        json.dump(jobs, listing)
    try:
        _run_child(["--convert", str(converter.root), listing.name], doing, timeout)
    finally:
        os.unlink(listing.name)
    reports = [json.loads(Path(job["report"]).read_text()) for job in jobs]
    for index, report in enumerate(reports):
        if report.get("error"):
            which = f" on {names[index]}" if names is not None and len(jobs) > 1 else ""
            raise ConversionFailed(f"{doing}{which}: {report['error']}")
    return reports


def _run_child(args: list[str], doing: str, timeout: float | None = None) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConversionFailed(f"{doing}: no answer in {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise ConversionFailed(f"{doing}: {last_error_line(proc.stderr or proc.stdout)}")


def last_error_line(output: str) -> str:
    """The line that says what went wrong in a converter's output: the exception or the last ERROR log line
    (logger prefixes dropped), not traceback frames or progress lines."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith((" ", "\t", "Traceback", "INFO:", "DEBUG:", "WARNING:")):
            continue
        return re.sub(r"^(ERROR|CRITICAL):[\w.-]*:", "", line).strip()
    return lines[-1].strip() if lines else "it failed without a message"


# --- the subprocess: runs with the converter's gguf-py, never the project's ---------------------------------

def _child_path(root: str) -> None:
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(here)]  # no sibling shadows a module
    sys.path[:0] = [str(Path(root) / "gguf-py"), root]


def _child_architectures(root: str, out: str) -> None:
    _child_path(root)
    import logging

    logging.disable(logging.WARNING)  # a module that fails to import is just not listed
    import gguf
    import conversion
    from conversion import ModelBase, ModelType

    conversion.load_all_models()
    found = {name: gguf.MODEL_ARCH_NAMES.get(getattr(cls, "model_arch", None))
             for name, cls in ModelBase._model_classes[ModelType.TEXT].items()}
    Path(out).write_text(json.dumps(found, indent=0, sort_keys=True))


def _eager(tensor) -> np.ndarray:
    """A tensor as the converter hands it to the writer (array, lazy or chunked), as one array."""
    import gguf

    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, gguf.LazyBase):
        return gguf.LazyNumpyTensor.to_eager(tensor)
    with tempfile.TemporaryFile() as scratch:  # anything else the writer takes writes itself to a file
        tensor.tofile(scratch)
        scratch.seek(0)
        return np.fromfile(scratch, dtype=tensor.dtype).reshape(tensor.shape)


# Rows decoded to float32 at a time when comparing a converted tensor with its stored one: a whole tensor's
# float32 copies (several, for a BF16 conversion) were the converter process's peak (a 3.2 B model's 394 M-element
# embedding stored in 16 bits: 11.1 GB max RSS; docs/benchmarks.md section 18).
COMPARE_BYTES = 64 << 20


def _row_order(converted: np.ndarray, converted_type, stored: np.ndarray, stored_type) -> np.ndarray | None:
    """The stored rows in the order the converter wrote the float rows (None: unchanged), or ValueError
    when the converter's tensor is not a row permutation of the stored one's decoded weights. Unchanged
    rows are compared COMPARE_BYTES of float32 at a time; only a permuted tensor is decoded whole."""
    from gguf import GGMLQuantizationType, quants

    def decode(data: np.ndarray, kind) -> np.ndarray:  # rows kept; a type numpy lacks (BF16) goes as its bytes
        if kind not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.ascontiguousarray(data).view(np.uint8)
        return quants.dequantize(data, kind)

    def decoded_as_converted(rows: np.ndarray) -> np.ndarray:  # as the converter rounded the floats
        out = decode(rows, stored_type)
        if converted_type != GGMLQuantizationType.F32:
            out = quants.dequantize(quants.quantize(out, converted_type), converted_type)
        return out

    step = max(1, COMPARE_BYTES // max(1, 4 * int(np.prod(converted.shape[1:], dtype=np.int64))))
    for start in range(0, max(converted.shape[0], stored.shape[0]), step):
        written, decoded = decode(converted[start:start + step], converted_type), \
            decoded_as_converted(stored[start:start + step])
        if converted.shape[0] != stored.shape[0] or written.shape != decoded.shape:
            raise ValueError(f"the converter wrote it as {(converted.shape[0], *written.shape[1:])[::-1]}, it is "
                             f"stored as {(stored.shape[0], *decoded.shape[1:])[::-1]}")
        if not np.array_equal(written.view(np.uint32), decoded.view(np.uint32)):
            break
    else:
        return None
    written, decoded = decode(converted, converted_type), decoded_as_converted(stored)
    rows: dict[bytes, list[int]] = {}
    for index in range(decoded.shape[0] - 1, -1, -1):
        rows.setdefault(decoded[index].tobytes(), []).append(index)
    order = []
    for row in written:
        found = rows.get(row.tobytes())
        if not found:
            raise ValueError("the converter changed its values, not only the order of its rows")
        order.append(found.pop())
    return np.asarray(order)


SAFETENSORS_DTYPES = {"U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "F16": np.float16,
                      "I32": np.int32, "F32": np.float32}


def _safetensors_header(file: str) -> tuple[dict, int]:
    """A safetensors file's header (each tensor's dtype, shape and data offsets; `__metadata__`) and the offset
    at which its data begins."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(size)), 8 + size


def _mapped(file: str, entries: dict, data_start: int, name: str) -> np.ndarray:
    """Tensor `name` of a safetensors file (its header's `entries`, data from `data_start`) as a read-only view
    of the file's pages (np.memmap), so that the writer, which keeps every tensor it is handed until it writes
    the file, holds no copy of the stored blocks; a copy (safetensors' own reader) for a dtype numpy lacks."""
    entry = entries[name]
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        from safetensors import safe_open

        with safe_open(file, "np") as f:
            return f.get_tensor(name)
    start, end = entry["data_offsets"]
    count = (end - start) // np.dtype(dtype).itemsize
    return np.memmap(file, dtype=dtype, mode="r", offset=data_start + start, shape=(count,)).reshape(entry["shape"])


class _Job:
    """One conversion in the child: the stored tensors to substitute and what was substituted."""

    def __init__(self, stored_file: str | None):
        import gguf

        self.file = stored_file
        self.stored: dict[str, object] = {}  # HF name -> GGML type; each tensor is read when it is written
        self.entries, self.data_start, self.blocks = {}, 0, 0  # the file's header, read once
        if stored_file:
            self.entries, self.data_start = _safetensors_header(stored_file)
            meta = self.entries.pop("__metadata__")
            self.blocks = int(meta[BLOCKS_KEY])
            self.stored = {key: gguf.GGMLQuantizationType[meta[key]] for key in self.entries}
        self.targets: dict[str, str] | None = None  # GGUF name -> HF name, once the writer knows its arch
        self.done: dict[str, dict] = {}
        self.arch: str | None = None

    def add_tensor(self, add_tensor, writer, name, tensor, raw_shape=None, raw_dtype=None, *args, **kwargs):
        """gguf-py's GGUFWriter.add_tensor, with a stored tensor in place of the converter's floats."""
        import gguf

        self.arch = self.arch or writer.arch
        if self.targets is None:
            self.targets = _gguf_names(writer.arch, self.blocks, self.stored) if self.stored else {}
        source = self.targets.get(name)
        if source is None:
            return add_tensor(writer, name, tensor, raw_shape, raw_dtype, *args, **kwargs)
        data, kind = _mapped(self.file, self.entries, self.data_start, source), self.stored[source]
        written = _eager(tensor)
        if raw_dtype is None:
            raw_dtype = {np.dtype(np.float32): gguf.GGMLQuantizationType.F32,
                         np.dtype(np.float16): gguf.GGMLQuantizationType.F16}[written.dtype]
        try:
            order = _row_order(written, raw_dtype, data, kind)
        except ValueError as exc:
            raise RuntimeError(f"{source} (GGUF {name}) cannot be written as its stored {kind.name}: {exc}") from None
        self.done[name] = {"from": source, "type": kind.name, "permuted": order is not None}
        return add_tensor(writer, name, data if order is None else np.ascontiguousarray(data[order]), raw_dtype=kind)

    def check(self) -> None:
        missing = sorted(set(self.targets or {}) - set(self.done))
        if self.stored and (self.targets is None or missing):
            raise RuntimeError(f"the converter wrote no {', '.join(missing or sorted(self.stored))}: "
                               f"their stored tensors have no place in the file")


def _child_convert(root: str, listing: str) -> None:
    """Run each job of `listing` (converter arguments, stored tensors, report path) through the converter's
    own main(); a job's failure is its report's one-line `error` (the exception, or the converter's last
    ERROR log line when it exits)."""
    _child_path(root)
    import logging
    import runpy

    import gguf

    job: _Job | None = None
    add_tensor = gguf.GGUFWriter.add_tensor
    gguf.GGUFWriter.add_tensor = lambda writer, *args, **kwargs: job.add_tensor(add_tensor, writer, *args, **kwargs)
    _with_v4_spellings()
    errors: list[str] = []

    class Errors(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    logging.getLogger().addHandler(Errors())
    script = str(Path(root) / SCRIPT)
    for spec in json.loads(Path(listing).read_text()):
        errors.clear()
        report: dict = {"architecture": None, "stored": {}, "error": None}
        try:
            job = _Job(spec["stored"])
            sys.argv = [script, *spec["args"]]
            runpy.run_path(script, run_name="__main__")
            job.check()
            report.update(architecture=job.arch, stored=job.done)
        except SystemExit as exc:
            if exc.code not in (0, None):
                report["error"] = (errors or [f"it exited with {exc.code}"])[-1]
        except Exception as exc:  # noqa: BLE001 - one line per failed job, the next job still runs
            message = next((line for line in str(exc).splitlines() if line.strip()), "")
            report["error"] = f"{type(exc).__name__}: {message}".rstrip(": ")
        Path(spec["report"]).write_text(json.dumps(report))


def _with_v4_spellings() -> None:
    """The converter reads the config through this process's transformers (5.x; it is written against 4.57),
    which keeps the rotary fraction only as ``rope_parameters["partial_rotary_factor"]``; its GPT-NeoX and
    Command-R classes still read transformers 4's top-level ``rotary_pct`` (a KeyError without it). It is
    added where missing."""
    from conversion import ModelBase

    load = ModelBase.load_hparams

    def load_hparams(dir_model, is_mistral_format):
        hparams = load(dir_model, is_mistral_format)
        for part in (hparams, hparams.get("text_config")):
            rope = part.get("rope_parameters") if isinstance(part, dict) else None
            if isinstance(rope, dict) and "partial_rotary_factor" in rope and "rotary_pct" not in part:
                part["rotary_pct"] = rope["partial_rotary_factor"]
        return hparams

    ModelBase.load_hparams = staticmethod(load_hparams)


def _gguf_names(arch_name: str, blocks: int, stored: dict) -> dict[str, str]:
    """GGUF tensor name -> HF name of every stored tensor, by gguf-py's tensor name map for the architecture."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, blocks)
    out = {}
    for source in stored:
        target = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise RuntimeError(f"gguf-py's {arch_name} tensor map has no name for {source}")
        out[target] = source
    return out


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "--architectures":
        _child_architectures(*rest)
    elif mode == "--convert":
        _child_convert(*rest)
    else:
        sys.exit(f"unknown mode {mode}")
