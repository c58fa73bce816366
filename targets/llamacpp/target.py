"""The llama.cpp target: candidates ship as one GGUF file and are measured in llama.cpp itself.

Space: rtn and GPTQ round onto GGUF grids (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; F16 for 16-bit layers), pruned
shapes and students are written as their own config (through llama.cpp's own converter, or the planner's
writer where it writes the same file: writer.py); bitsandbytes and torch's dynamic int8 have no GGUF form
and are left out of the space up front, and so are the cuts llama.cpp's graph cannot take (pruned heads
outside Llama and Qwen3, depth cuts of models with sliding-window layers). Figures: latency timed A/B against the uncompressed model's
GGUF (F32 for a float32 model) in the same llama.cpp process, as absolute ms and as ratios; perplexity and
KL from llama.cpp's logits over the same held-out windows as every other target; ``weight_bytes`` = the
GGUF's tensor bytes (llama.cpp holds them as stored), ``disk_bytes`` = the file, and the KV cache at the
perplexity protocol's context length beside them.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from search_spaces.quantization import fit_to_scheme, scheme_space_defaults
from search_spaces.quantization.constants import FLOAT_BITS
from search_spaces.quantization.grid import GGUF_GRID
from search_spaces.quantization.spec import AllocationSettings
from targets.base import Measured, Request, Target, register_target
from targets.figures import metrics_row, scored
from targets.llamacpp import stock, writer
from targets.llamacpp.imatrix import gguf_arch_name, gguf_linear_names
from evaluators.latency import LatencyProtocol
from evaluators.paired import level
from targets.llamacpp.runtime import (RUNTIME, from_disk_reason, loaded, runtime_version, serving_threads, time_ab,
                                     window_logits)

ARTIFACT = "model.gguf"


def gguf_facts(path: Path) -> dict:
    """Tensor bytes, file bytes and the KV-cache shape of a GGUF, read from the file itself."""
    from targets.llamacpp.gguf_header import read_header

    header = read_header(path)
    arch = header.fields["general.architecture"]

    def field(key: str, default=None) -> int:
        found = header.fields.get(f"{arch}.{key}")
        return default if found is None else int(found)

    heads = field("attention.head_count")
    # a converter writes key_length only where it differs from embedding / heads (llama.cpp's own default)
    head_dim = field("attention.key_length", field("embedding_length") // heads)
    return {"tensor_bytes": sum(t.n_bytes for t in header.tensors), "file_bytes": path.stat().st_size,
            "layers": field("block_count"), "kv_heads": field("attention.head_count_kv", heads), "head_dim": head_dim}


# A prefill ratio whose interval spans more than this factor (high / low) is not a figure: on a busy machine
# llama.cpp's prefill threads (all the CPUs by default) wait on each other at every barrier, and one prefill of a
# 64-token prompt can take 50x another (a study on a shared 2-core machine stored 123 ms for the float model and
# 7760 ms, interval 0.55-16.7x, for a candidate half its size). Decode's single thread is not hit that way.
PREFILL_SPREAD = 2.0


def latency_figures(ab) -> tuple[dict, str | None]:
    """The row's figures of an A/B timing (runtime.ABLatency), and why its prefill figures were left out (the
    tables show n/a, a prefill budget counts the candidate over it), or None where they are in."""
    confidence = ab.decode_interval["confidence"]
    figures = {"decode_ms_p50": ab.decode["p50_ms"], "decode_ratio": ab.decode_ratio,
               "decode_interval": [ab.decode_interval["low"], ab.decode_interval["high"]], "latency_rounds": ab.rounds,
               "latency_confidence": confidence}
    low, high = ab.prefill_interval["low"], ab.prefill_interval["high"]
    if high > PREFILL_SPREAD * low:
        return figures, (f"the prefill ratio's {level(confidence)} interval {low:.2f}-{high:.2f}x spans more than "
                         f"{PREFILL_SPREAD:g}x "
                         "(the machine was busy while it was timed)")
    return {**figures, "prefill_ms_p50": ab.prefill["p50_ms"], "prefill_ratio": ab.prefill_ratio,
            "prefill_interval": [low, high]}, None


def kv_cache_bytes(facts: dict, context: int) -> int:
    """llama.cpp's default KV cache (F16 keys and values) for `context` positions."""
    return 2 * facts["layers"] * context * facts["kv_heads"] * facts["head_dim"] * 2


def _names_every_tensor(model) -> bool:
    """gguf-py names every linear layer of the model as the GGUF file does (what llama-quant plans by)."""
    try:
        gguf_linear_names(model, head=True)
    except ValueError:
        return False
    return True


def _only_whole(spaces: dict, field: str) -> dict:
    """Every space with the keep-ratio `field` narrowed to 1.0 (that cut left out)."""
    return {name: replace(space, **{field: (1.0,)}) if space is not None and hasattr(space, field) else space
            for name, space in spaces.items()}


class LlamaCppTarget(Target):
    name = "llama.cpp"
    figures = Target.figures | {"decode_ratio", "prefill_ratio"}  # timed A/B against the float GGUF
    artifacts = frozenset({"gguf"})
    runtime = RUNTIME
    artifact = f"one GGUF file ({ARTIFACT})"

    def __init__(self):
        self._work: Path | None = None
        # (the uncompressed model, its GGUF, what wrote it): held with the model so a process that measures several
        # models (tests, apply after search) never times a candidate against another model's reference.
        self._reference: tuple[object, Path, dict] | None = None
        self._imatrix: tuple[object, tuple] | None = None  # (the model, stock.study_imatrix of it)
        # llama-quant's calibration sizes in the study's space (fit_spaces): the compared presets' importance
        # matrix is computed with them, so it is the one the study's llama-quant trials use
        self._calibration: AllocationSettings | None = None

    def unavailable(self, device: str) -> str | None:
        try:
            import llama_cpp
        except ImportError:
            return "llama-cpp-python is not installed (make setup installs it)"
        if device.startswith("cuda"):
            if not llama_cpp.llama_supports_gpu_offload():
                return "this llama-cpp-python was built without CUDA; use --device cpu or --target transformers"
        return None

    def unsupported(self, model, tokenizer) -> str | None:
        return writer.unsupported(model, tokenizer)

    def space_defaults(self) -> dict:
        return {"quantization": scheme_space_defaults(GGUF_GRID)}

    def stored_beyond(self, model) -> int:
        return writer.bytes_beyond_held(model)

    def fit_spaces(self, spaces: dict, model) -> dict:
        if writer.gguf_arch(model) not in writer.FREE_HEAD_SPLIT:  # pruned or student heads: llama.cpp refuses
            spaces = _only_whole(spaces, "heads_keep")
        config = model.config.get_text_config()
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            # llama.cpp places sliding-window layers by a fixed pattern a depth cut would break (wrong logits)
            spaces = _only_whole(spaces, "depth_keep")
        quant = spaces.get("quantization")
        if quant is None:
            return spaces
        quant = fit_to_scheme(quant, GGUF_GRID)
        self._calibration = AllocationSettings(samples=quant.allocation.samples, seq_len=quant.allocation.seq_len)
        unfit = self.methods_unfit(model)
        if unfit:
            quant = replace(quant, methods=tuple(m for m in quant.methods if m not in unfit))
        if not _has_output_tensor(writer.gguf_arch(model)):
            # e.g. gemma2: llama.cpp's graph has no separate LM head; a quantized head (untied) has no place
            quant = replace(quant, head_bits=tuple(b for b in quant.head_bits if b is None or b >= FLOAT_BITS))
        return {**spaces, "quantization": quant}

    def methods_unfit(self, model) -> dict[str, str]:
        if _names_every_tensor(model):
            return {}
        return {"llama-quant": "it plans a type per GGUF tensor, and gguf-py names no tensors of the "
                               f"{gguf_arch_name(model)!r} architecture"}

    def _workdir(self) -> Path:
        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix="planner-gguf-"))
            atexit.register(shutil.rmtree, self._work, ignore_errors=True)
        return self._work

    def prepare(self, request: Request) -> Path:
        """The latency reference: the uncompressed model's GGUF, written once per model and process."""
        if self._reference is None or self._reference[0] is not request.model:
            path = self._workdir() / f"reference-{time.monotonic_ns()}.gguf"
            written = writer.write(request.model, request.tokenizer, path, name="reference (uncompressed)")
            if self._reference is not None:
                self._reference[1].unlink(missing_ok=True)
            self._reference = (request.model, path, written)
        return self._reference[1]

    def measure(self, request: Request, model, label: str) -> Measured:
        if model is request.model and getattr(model, writer.PLAN_ATTRIBUTE, None) is None:
            # the uncompressed model is its reference file: measured from it, not written a second time (at 1.24 B
            # parameters a second float32 GGUF is 5 GB more of mapped pages while the two are timed head to head)
            measured = self.measure_file(request, self.prepare(request), label)
            measured.details["runtime"].update(self._reference[2])
            return measured
        path = self._workdir() / f"candidate-{os.getpid()}-{time.monotonic_ns()}.gguf"
        try:
            written = writer.write(model, request.tokenizer, path)
            del model  # the file is what is measured: the float candidate is freed before the runtime loads it
            request.release()
            measured = self.measure_file(request, path, label)
            measured.details["runtime"].update(written)
            return measured
        finally:
            path.unlink(missing_ok=True)

    def measure_file(self, request: Request, path: Path, label: str) -> Measured:
        reference = self.prepare(request)
        facts = gguf_facts(path)
        tensor_bytes = facts["tensor_bytes"]
        context = request.perplexity.context_length
        kv = kv_cache_bytes(facts, context)
        details = {"memory": {"total_bytes": tensor_bytes, "resident_bytes": tensor_bytes,
                              "disk_bytes": facts["file_bytes"], "kv_cache_bytes": kv,
                              "kv_cache_context": context, "method": "gguf_tensor_bytes"},
                   "runtime": {"target": self.name, "runtime": runtime_version()}}
        figures = {"disk_bytes": facts["file_bytes"], "kv_cache_bytes": kv}
        if "latency" in request.evaluators:
            ab = time_ab(path, reference, request.latency, request.unclear)
            timed, left_out = latency_figures(ab)
            figures.update(timed)
            disk = from_disk_reason(ab)
            details["latency"] = {**ab.to_dict(), **({"prefill_left_out": left_out} if left_out else {}),
                                  **({"from_disk": disk} if disk else {})}
        measured = Measured(metrics_row(label, tensor_bytes, **figures), details)

        @contextmanager
        def runtime():
            with loaded(path, context, request.latency.threads, logits_all=True) as llm:
                yield window_logits(llm, context, request.perplexity.stride), "cpu", "gguf"

        return scored(request, measured, runtime)

    def stock(self) -> dict[str, str]:
        return stock.presets()

    def measure_stock(self, request: Request, name: str, context) -> Measured:
        """llama-quantize's preset `name` on the source model with the study's importance matrix, written from
        the latency reference (the float GGUF) and measured like a candidate."""
        path = self._workdir() / f"stock-{name}-{time.monotonic_ns()}.gguf"
        try:
            written = stock.quantize_preset(self._study_imatrix(request.model, context), self.prepare(request),
                                            path, name)
            measured = self.measure_file(request, path, stock.label(name))
            types = writer.types_written(written)
            measured.details["runtime"].update(quantizer="llama.cpp", file_type=name, **types)
            measured.row["stages"] = f"{measured.row['stages']} [{types['stored']}]"
            return measured
        finally:
            path.unlink(missing_ok=True)

    def _study_imatrix(self, model, context) -> tuple:
        """The study's importance matrix of `model`, computed once per model and process (every preset compared
        against uses it), held with its model as the reference GGUF is."""
        if self._imatrix is None or self._imatrix[0] is not model:
            self._imatrix = (model, stock.study_imatrix(model, context, self._calibration))
        return self._imatrix[1]

    def ship(self, model, tokenizer, stages: list, out: Path, runtime: dict | None = None) -> Path:
        path = Path(out) / ARTIFACT
        # by the writer that wrote the measured file: the two write the same tensors, not the same metadata bytes
        writer.write(model, tokenizer, path, using=(runtime or {}).get("writer"))
        writer.write_imatrix(model, out)  # the importance matrix it was quantized with, for llama-quantize
        return path

    def measure_shipped(self, request: Request, artifact: Path) -> Measured:
        return self.measure_file(request, artifact, "shipped")

    def how_to_load(self, artifact: Path, latency: LatencyProtocol) -> str:
        # the thread counts it was timed with, spelled out: its figures hold for those
        threads = serving_threads(latency.threads)
        return f"serve it with llama.cpp, e.g. llama_cpp.Llama('{artifact}', {threads.as_kwargs()})"


def _has_output_tensor(arch: str | None) -> bool:
    """Whether a GGUF architecture has a separate LM head tensor (`output.weight`) llama.cpp can load."""
    import gguf

    found = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
    return found is None or gguf.MODEL_TENSOR.OUTPUT in gguf.MODEL_TENSORS.get(found, ())


LLAMA_CPP = register_target(LlamaCppTarget())
