"""The transformers target: what plain `from_pretrained` gives, on the CPU or the GPU.

Figures are those of the candidate as transformers holds it: float / bf16 weights, dynamic int8 and
bitsandbytes layers as built; rtn and GPTQ candidates are compressed-tensors checkpoints, which
transformers decompresses to float on load, so their latency is the float graph's, their resident
``weight_bytes`` count the decompressed float weights, and the packed size is their ``disk_bytes``
(`measurements["memory"]["decompressed_on_load"]` says so).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from torch import nn

from evaluators.kl import torch_windows
from evaluators.latency import measure_latency
from evaluators.memory import weight_bytes
from evaluators.runtime import inference_eval, model_device, model_dtype
from search_spaces.quantization.modules import FLOAT, PACKED, StoredWeights
from targets.base import Measured, Request, Target, register_target
from targets.figures import metrics_row, scored


def decompressed_bytes(model: nn.Module) -> int:
    """Bytes transformers holds beyond the checkpoint's for rtn/gptq layers once it has loaded them: packed
    layers are decompressed, and 16-bit copies cast back, to the model's float dtype (the dtype its config
    names); 0 for a model without such layers."""
    total = 0
    for module in model.modules():
        if isinstance(module, StoredWeights) and module.stored_kind in (PACKED, FLOAT):
            total += module.weight.numel() * module.weight.element_size() - module.stored_weight_bytes()
            bias = getattr(module, "bias", None)
            total += 0 if bias is None else bias.numel() * bias.element_size()
    return total


def measure_torch(request: Request, model, label: str) -> Measured:
    """The figures of a torch model: memory, latency, then the accuracy figures from one pass over the held-out
    windows unless the latency already rules the candidate out."""
    weight = weight_bytes(model)
    extra = decompressed_bytes(model)
    resident = weight.total_bytes + extra
    details = {"memory": {**weight.to_dict(), "disk_bytes": weight.total_bytes, "resident_bytes": resident,
                          "decompressed_on_load": extra > 0}}
    latency = None
    if "latency" in request.evaluators:
        latency = measure_latency(model, request.latency)
        details["latency"] = latency.to_dict()
    measured = Measured(metrics_row(label, resident, latency, disk_bytes=weight.total_bytes), details)

    @contextmanager
    def runtime():
        with inference_eval(model):
            yield (torch_windows(model, request.perplexity), str(model_device(model)),
                   str(model_dtype(model)).replace("torch.", ""))

    return scored(request, measured, runtime)


class TransformersTarget(Target):
    name = "transformers"
    runtime = "transformers (PyTorch)"
    artifact = "a checkpoint folder for from_pretrained (compressed-tensors for rtn/gptq)"

    def prepare(self, request: Request) -> None:
        # The first model timed in a fresh process decodes slowly (the fidelity benchmark found a stored
        # baseline ~45% slow), which would loosen relative latency budgets: one untimed pass first.
        if "latency" in request.evaluators:
            measure_latency(request.model, request.latency)

    def measure(self, request: Request, model, label: str) -> Measured:
        return measure_torch(request, model, label)

    def ship(self, model, tokenizer, stages: list, out: Path) -> Path:
        from search_spaces import TECHNIQUES

        if stages:
            last = stages[-1]
            TECHNIQUES[last.technique].save(model, last.spec, out)  # ValueError: no loadable format
        else:
            model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    def measure_shipped(self, request: Request, artifact: Path) -> Measured:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(artifact).to(request.device).eval()
        measured = measure_torch(request, model, "shipped")
        # As stored: the checkpoint files' tensors (loading casts 16-bit copies to the config's dtype).
        measured.row["disk_bytes"] = checkpoint_tensor_bytes(artifact)
        return measured

    def how_to_load(self, artifact: Path) -> str:
        return f"load it with AutoModelForCausalLM.from_pretrained('{artifact}')"


def checkpoint_tensor_bytes(folder: Path) -> int:
    """Bytes of every tensor in a checkpoint folder's safetensors files, read from their headers."""
    import json
    import struct

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        total += sum(end - begin for name, entry in header.items() if name != "__metadata__"
                     for begin, end in [entry["data_offsets"]])
    return total


TRANSFORMERS = register_target(TransformersTarget())
