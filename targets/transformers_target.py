"""The transformers target: what plain `from_pretrained` gives, on the CPU or the GPU.

Figures are those of the candidate as transformers holds it: float / bf16 weights, dynamic int8 and
bitsandbytes layers as built; rtn and GPTQ candidates are compressed-tensors checkpoints, which
transformers decompresses to float on load, so their latency is the float graph's, their resident
``weight_bytes`` count the decompressed float weights, and the packed size is their ``disk_bytes``
(`measurements["memory"]["decompressed_on_load"]` says so).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from torch import nn

from evaluators.kl import torch_windows
from evaluators.latency import measure_latency
from evaluators.memory import weight_bytes
from evaluators.runtime import inference_eval, model_device, model_dtype
from search_spaces.quantization.methods.base import QUANT_METHODS
from search_spaces.quantization.modules import FLOAT, PACKED, StoredWeights
from search_spaces.quantization.schemes import scheme_named
from search_spaces.quantization.spec import NO_QUANTIZATION
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
    artifacts = frozenset({"compressed-tensors"})
    runtime = "transformers (PyTorch)"
    artifact = "a checkpoint folder for from_pretrained (compressed-tensors for rtn/gptq)"

    def fit_spaces(self, spaces: dict, model) -> dict:
        """Methods that store their layers in a checkpoint transformers loads (e.g. not llama.cpp's own types)."""
        quant = spaces.get("quantization")
        if quant is None:
            return spaces
        scheme = scheme_named(quant.grid)
        kept = tuple(m for m in quant.methods if m == NO_QUANTIZATION or QUANT_METHODS[m].accepts(scheme))
        return {**spaces, "quantization": replace(quant, methods=kept or (NO_QUANTIZATION,))}

    def prepare(self, request: Request) -> None:
        # The first model timed in a fresh process decodes slowly (the fidelity benchmark found a stored
        # baseline ~45% slow), which would loosen relative latency budgets: one untimed pass first.
        if "latency" in request.evaluators:
            measure_latency(request.model, request.latency)

    def measure(self, request: Request, model, label: str) -> Measured:
        return measure_torch(request, model, label)

    def ship(self, model, tokenizer, stages: list, out: Path, runtime: dict | None = None) -> Path:
        """The checkpoint; a last stage applied at load (dynamic int8) is shipped as `model`, the model before it
        (the caller builds it so), with the stage's spec beside it in AT_LOAD_FILE."""
        from search_spaces import TECHNIQUES

        last = stages[-1] if stages else None
        if last is not None and TECHNIQUES[last.technique].applied_at_load(last.spec):
            model.save_pretrained(out)
            (Path(out) / AT_LOAD_FILE).write_text(json.dumps({"technique": last.technique,
                                                              "spec": last.spec.to_dict()}, indent=2) + "\n")
        elif last is not None:
            TECHNIQUES[last.technique].save(model, last.spec, out)  # ValueError: no loadable format
        else:
            model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out

    def measure_shipped(self, request: Request, artifact: Path) -> Measured:
        model = load_shipped(artifact, request.device)
        measured = measure_torch(request, model, "shipped")
        # As stored: the checkpoint files' tensors (loading casts 16-bit copies to the config's dtype).
        measured.row["disk_bytes"] = checkpoint_tensor_bytes(artifact)
        if (Path(artifact) / AT_LOAD_FILE).is_file():  # what it serves is the re-applied stage's: resident bytes
            measured.row["applied_at_load"] = True
        return measured

    def how_to_load(self, artifact: Path, latency) -> str:
        if (Path(artifact) / AT_LOAD_FILE).is_file():
            return (f"load it with targets.transformers_target.load_shipped('{artifact}') (from_pretrained, then "
                    f"the stage in {AT_LOAD_FILE} applied again)")
        return f"load it with AutoModelForCausalLM.from_pretrained('{artifact}')"


AT_LOAD_FILE = "planner-at-load.json"  # a stage applied again once the checkpoint is loaded (dynamic int8)


def load_shipped(folder: Path, device="cpu"):
    """A shipped checkpoint as it serves: from_pretrained, then the stage in AT_LOAD_FILE (if any) applied to it
    (deterministic, no calibration data: e.g. torch's dynamic int8 on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from search_spaces import TECHNIQUES, BuildContext

    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    at_load = Path(folder) / AT_LOAD_FILE
    if at_load.is_file():
        stage = json.loads(at_load.read_text())
        technique = TECHNIQUES[stage["technique"]]
        spec = technique.spec_type.from_dict(stage["spec"], AT_LOAD_FILE)
        model = technique.apply(model, spec, BuildContext(tokenizer=None, calibration=[], device=torch.device(device)))
    return model.eval()


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
