"""The llama.cpp target: candidates ship as one GGUF file and are measured in llama.cpp itself.

Space: rtn and GPTQ round onto GGUF grids (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; F16 for 16-bit layers), pruned
shapes and students are written as their own config; bitsandbytes and torch's dynamic int8 have no GGUF
form and are left out of the space up front. Figures: latency timed A/B against the uncompressed model's
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
from dataclasses import replace
from pathlib import Path

import torch

from evaluators.kl import score_windows
from evaluators.perplexity import check_protocol
from search_spaces.quantization.grid import GGUF_BITS, GGUF_BLOCK, GGUF_GRID
from search_spaces.quantization.spec import FLOAT_BITS, GRID_BITS, NO_QUANTIZATION
from targets.base import Target, register_target
from targets.figures import metrics_row, skip_if_hopeless
from targets.llamacpp.gguf_file import FREE_HEAD_SPLIT, UnsupportedForGGUF, gguf_architecture, vocab_of, write_gguf
from targets.llamacpp.runtime import RUNTIME, loaded, runtime_version, time_ab, window_logits

GGUF_METHODS = ("rtn", "gptq")  # rounding algorithms; the grid is GGUF's own
ARTIFACT = "model.gguf"


def gguf_facts(path: Path) -> dict:
    """Tensor bytes, file bytes and the KV-cache shape of a GGUF, read from the file itself."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()

    def field(key: str) -> int:
        return int(reader.fields[f"{arch}.{key}"].contents())

    return {"tensor_bytes": sum(int(t.n_bytes) for t in reader.tensors), "file_bytes": path.stat().st_size,
            "layers": field("block_count"), "kv_heads": field("attention.head_count_kv"),
            "head_dim": field("attention.key_length")}


def kv_cache_bytes(facts: dict, context: int) -> int:
    """llama.cpp's default KV cache (F16 keys and values) for `context` positions."""
    return 2 * facts["layers"] * context * facts["kv_heads"] * facts["head_dim"] * 2


def _threads(bench) -> int:
    return bench.settings.latency_protocol().threads or torch.get_num_threads()


class LlamaCppTarget(Target):
    name = "llama.cpp"
    runtime = RUNTIME
    artifact = f"one GGUF file ({ARTIFACT})"

    def __init__(self):
        self._work: Path | None = None
        # (the uncompressed model, its GGUF): held with the model so a process that measures several models
        # (tests, apply after search) never times a candidate against another model's reference.
        self._reference: tuple[object, Path] | None = None

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
        try:
            gguf_architecture(model.config)
            vocab_of(tokenizer, model.config.get_text_config().vocab_size)
        except UnsupportedForGGUF as exc:
            return str(exc)
        return None

    def space_defaults(self) -> dict:
        return {"quantization": {"grid": GGUF_GRID, "group_sizes": [GGUF_BLOCK],
                                 "bits": list(GRID_BITS[GGUF_GRID])}}

    def fit_spaces(self, spaces: dict, model) -> dict:
        if gguf_architecture(model.config) not in FREE_HEAD_SPLIT:  # pruned or student heads: no such GGUF
            spaces = {name: replace(space, heads_keep=(1.0,)) if space is not None and hasattr(space, "heads_keep")
                      else space for name, space in spaces.items()}
        quant = spaces.get("quantization")
        if quant is None:
            return spaces
        methods = tuple(m for m in quant.methods if m in (NO_QUANTIZATION,) + GGUF_METHODS)
        bits = tuple(b for b in quant.bits if b in GGUF_BITS + (FLOAT_BITS,)) or (4, 8)
        head = tuple(b for b in quant.head_bits if b is None or b in GGUF_BITS + (FLOAT_BITS,))
        fitted = replace(quant, methods=methods or (NO_QUANTIZATION,), bits=bits, head_bits=head,
                         group_sizes=(GGUF_BLOCK,), grid=GGUF_GRID)
        return {**spaces, "quantization": fitted}

    def _workdir(self) -> Path:
        if self._work is None:
            self._work = Path(tempfile.mkdtemp(prefix="planner-gguf-"))
            atexit.register(shutil.rmtree, self._work, ignore_errors=True)
        return self._work

    def open(self, bench) -> Path:
        """The latency reference: the uncompressed model's GGUF, written once per model and process."""
        if self._reference is None or self._reference[0] is not bench.model:
            path = self._workdir() / f"reference-{time.monotonic_ns()}.gguf"
            write_gguf(bench.model, bench.tokenizer, path, name="reference (uncompressed)")
            if self._reference is not None:
                self._reference[1].unlink(missing_ok=True)
            self._reference = (bench.model, path)
        return self._reference[1]

    def measure(self, bench, model, label: str, trial=None) -> tuple[dict, dict]:
        path = self._workdir() / f"candidate-{os.getpid()}-{time.monotonic_ns()}.gguf"
        try:
            write_gguf(model, bench.tokenizer, path)
            return self.measure_file(bench, path, label, trial)
        finally:
            path.unlink(missing_ok=True)

    def measure_file(self, bench, path: Path, label: str, trial=None) -> tuple[dict, dict]:
        reference = self.open(bench)
        facts = gguf_facts(path)
        tensor_bytes = facts["tensor_bytes"]
        protocol = bench.settings.perplexity_protocol()
        kv = kv_cache_bytes(facts, protocol.context_length)
        details = {"memory": {"total_bytes": tensor_bytes, "resident_bytes": tensor_bytes,
                              "disk_bytes": facts["file_bytes"], "kv_cache_bytes": kv,
                              "kv_cache_context": protocol.context_length, "method": "gguf_tensor_bytes"},
                   "runtime": {"target": self.name, "runtime": runtime_version()}}
        figures = {"disk_bytes": facts["file_bytes"], "kv_cache_bytes": kv}
        threads = _threads(bench)
        if "latency" in bench.evaluators():
            ab = time_ab(path, reference, bench.settings.latency_protocol(), threads)
            details["latency"] = ab.to_dict()
            figures.update(decode_ms_p50=ab.decode["p50_ms"], prefill_ms_p50=ab.prefill["p50_ms"],
                           decode_ratio=ab.decode_ratio, prefill_ratio=ab.prefill_ratio)
        row = metrics_row(label, tensor_bytes, **figures)
        if skip_if_hopeless(bench, row, trial):
            return row, details
        encoded = check_protocol(bench.model, bench.tokenizer, bench.corpus.eval, protocol)
        started = time.perf_counter()
        with loaded(path, protocol.context_length, threads, logits_all=True) as llm:
            windows = window_logits(llm, protocol.context_length, protocol.stride)
            perplexity, kl = score_windows(windows, encoded, protocol, bench.reference, "cpu", "gguf", started)
        details["perplexity"] = perplexity.to_dict()
        if kl is not None:
            details["kl"] = kl.to_dict()
        return metrics_row(label, tensor_bytes, perplexity=perplexity, kl=kl, **figures), details

    def ship(self, model, tokenizer, stages: list, out: Path) -> Path:
        path = Path(out) / ARTIFACT
        write_gguf(model, tokenizer, path)
        return path

    def measure_shipped(self, bench, artifact: Path) -> tuple[dict, dict]:
        return self.measure_file(bench, artifact, "shipped")


LLAMA_CPP = register_target(LlamaCppTarget())
