"""Saving a built quantization candidate as a checkpoint that plain transformers loads.

- rtn / gptq -> compressed-tensors ``pack-quantized`` (the format of vLLM and llm-compressor): every
  quantized layer's packed tensors exactly as the candidate holds them (`StoredWeights.stored_tensors`,
  the tensors its memory figure counts), 16-bit layers and the 16-bit embedding as float16/bfloat16
  tensors, everything else as is; one config group per (bits, group size, symmetry) with the layers'
  exact names as targets. 2, 3, 4 and 8 bits all pack (compressed-tensors 0.20 packs 1-8 bits densely).
  Asymmetric grids: transformers 5.23 sizes the zero-point slots unpacked and refuses the packed ones
  (checked), so asymmetric checkpoints set ``"dequantize": true`` in their quantization config; the
  weights are then decoded while loading (as the compressed path decodes them on the first forward).
  That path decodes every layer with the first config group's scheme, so an asymmetric candidate
  exports only if all its quantized layers share one format (bits and effective group size):
  otherwise ExportError, before anything is written (`export_blocker` tells in advance).
- bnb -> transformers' own bitsandbytes serialization (``save_pretrained``).
- dynamic-int8 -> ExportError: torch.ao's packed int8 layers have no format transformers loads;
  re-apply the spec to the float model at load time (no calibration, seconds).
- rtn / gptq layers of GPT-2's Conv1D -> ExportError: transformers only attaches compressed-tensors
  schemes to nn.Linear (and nn.Embedding), so they cannot be stored packed (16-bit ones export fine).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from search_spaces.quantization.modules import PACKED, StoredWeights
from search_spaces.quantization.grid import StorageGrid
from search_spaces.quantization.spec import QuantSpec

COMPRESSED_TENSORS = "compressed-tensors/pack-quantized"
BITSANDBYTES = "bitsandbytes"
SPEC_FILE = "planner-quantization.json"


class ExportError(ValueError):
    """A candidate that has no transformers-loadable checkpoint format."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str  # COMPRESSED_TENSORS or BITSANDBYTES


def _stored_modules(model: nn.Module) -> dict[str, StoredWeights]:
    return {name: m for name, m in model.named_modules() if isinstance(m, StoredWeights)}


def stored_state(model: nn.Module, stored: dict[str, StoredWeights] | None = None) -> dict:
    """The model's state dict with every rtn/gptq layer's own tensors replaced by its stored ones: what a target's
    writer saves, whatever file format it ships (`stored`: the model's stored layers, when already found)."""
    stored = _stored_modules(model) if stored is None else stored
    state = {key: tensor for key, tensor in model.state_dict().items() if key.rpartition(".")[0] not in stored}
    for name, module in stored.items():
        state.update({f"{name}.{leaf}": tensor for leaf, tensor in module.stored_tensors().items()})
    return state


def _packed_formats(stored: dict[str, StoredWeights]) -> dict[StorageGrid, list[str]]:
    by_format: dict[StorageGrid, list[str]] = defaultdict(list)
    for name, module in stored.items():
        if module.stored_kind == PACKED:
            by_format[module.stored_format].append(name)
    return by_format


def _quantization_config(by_format: dict[StorageGrid, list[str]]):
    """compressed-tensors' config: one scheme per storage format, targeting its layers by exact name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups = {}
    for index, (fmt, names) in enumerate(by_format.items()):
        args = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=fmt.symmetric,
                                strategy="channel" if fmt.group_size is None else "group", group_size=fmt.group_size)
        groups[f"group_{index}"] = QuantizationScheme(targets=[f"re:^{re.escape(n)}$" for n in names], weights=args,
                                                      format="pack-quantized")
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed")


def export_blocker(model: nn.Module, spec: QuantSpec) -> str | None:
    """Why the candidate `spec` builds from `model` could not be exported (None if it can), known before building."""
    return spec.quant_method.export_blocker(model, spec)


def _save_compressed_tensors(model: nn.Module, stored: dict[str, StoredWeights], out: Path) -> None:
    from compressed_tensors.compressors import ModelCompressor

    by_format = _packed_formats(stored)
    model.save_pretrained(out, state_dict=stored_state(model, stored))
    if by_format:  # only 16-bit layers: a plain float checkpoint
        ModelCompressor(quantization_config=_quantization_config(by_format)).update_config(str(out))
    if any(not fmt.symmetric for fmt in by_format):
        path = out / "config.json"
        data = json.loads(path.read_text())
        data["quantization_config"]["dequantize"] = True
        path.write_text(json.dumps(data, indent=2, sort_keys=True))


def export(model: nn.Module, spec: QuantSpec, out_dir: str | Path, tokenizer=None) -> ExportResult:
    """Save the candidate `model` (built by `apply` with `spec`) to `out_dir`; see the module notes for formats.

    `AutoModelForCausalLM.from_pretrained(out_dir)` loads the result with plain transformers (the
    compressed-tensors package installed). The spec is written beside it as planner-quantization.json.
    """
    blocker = export_blocker(model, spec)
    if blocker is not None:
        raise ExportError(blocker)
    stored = _stored_modules(model)
    grid = spec.quant_method.grid
    if grid and not stored:
        raise ExportError("the model holds no rtn/gptq layers: build the candidate with apply() before exporting")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if grid:
        _save_compressed_tensors(model, stored, out)
    else:
        model.save_pretrained(out)  # bitsandbytes layers serialize themselves
    fmt = spec.quant_method.checkpoint
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    return ExportResult(out, fmt)
