"""A deployment target: the toy runtime, the one that serves the toy grid (planner_toys.grid), as llama.cpp serves
gguf. Its artifact is a checkpoint folder whose safetensors hold every layer as stored (the toy grid's int8 codes
and scales, 16-bit layers as half floats) with a file naming each packed layer's grid; it measures a candidate
as transformers does, and loads its artifact back by decoding the codes itself."""
from __future__ import annotations

import json
from pathlib import Path

from planner_toys.grid import ARTIFACT, BLOCK, INT6
from search_spaces.layers import is_transposed
from search_spaces.quantization.export import stored_state
from search_spaces.quantization.grid import StorageGrid, decode
from search_spaces.quantization.modules import PACKED, StoredWeights
from search_spaces.quantization.spec import fit_to_scheme, scheme_space_defaults
from targets.base import Measured, Request, Target, register_target
from targets.transformers_target import checkpoint_tensor_bytes, measure_torch

GRIDS = "toy-grids.json"  # packed layer -> its grid's bits and group size


class ToyTarget(Target):
    name, runtime, artifact = "toy", "the toy runtime", "a folder of stored tensors"
    artifacts = frozenset({ARTIFACT})

    def __init__(self):
        self.prepared: set[int] = set()  # the models `prepare` saw, by id

    def space_defaults(self) -> dict:
        return {"quantization": scheme_space_defaults(INT6.name)}

    def fit_spaces(self, spaces: dict, model) -> dict:
        quant = spaces.get("quantization")
        return spaces if quant is None else {**spaces, "quantization": fit_to_scheme(quant, INT6.name)}

    def prepare(self, request: Request) -> None:
        self.prepared.add(id(request.model))

    def measure(self, request: Request, model, label: str) -> Measured:
        measured = measure_torch(request, model, label)
        # stored with the trial: whether the prepare hook ran for this model before it was measured
        measured.details["runtime"] = {"target": self.name, "prepared": id(request.model) in self.prepared}
        return measured

    def ship(self, model, tokenizer, stages: list, out: Path, runtime: dict | None = None) -> Path:
        grids = {name: {"bits": m.stored_format.bits, "group_size": m.stored_format.group_size}
                 for name, m in model.named_modules() if isinstance(m, StoredWeights) and m.stored_kind == PACKED}
        model.save_pretrained(out, state_dict=stored_state(model))
        (Path(out) / GRIDS).write_text(json.dumps(grids, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(out)
        return Path(out)

    def measure_shipped(self, request: Request, artifact: Path) -> Measured:
        measured = measure_torch(request, load(artifact, request.device), "shipped")
        measured.row["disk_bytes"] = checkpoint_tensor_bytes(artifact)  # as stored: codes and scales
        return measured

    def how_to_load(self, artifact: Path, latency) -> str:
        return f"the toy runtime opens {artifact} (planner_toys.target.load)"


def load(folder: Path, device="cpu"):
    """A shipped folder as the toy runtime serves it: a float model whose packed layers are decoded from their
    codes and scales, every other tensor as stored."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    modules = dict(model.named_modules())
    tensors = {k: v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}
    for name, grid in json.loads((folder / GRIDS).read_text()).items():
        codes, scales = tensors.pop(f"{name}.codes"), tensors.pop(f"{name}.scales")
        out, width = codes.shape
        fmt = StorageGrid(grid["bits"], grid["group_size"], True, INT6.name)
        weight = decode(codes.reshape(out, width // BLOCK, BLOCK), scales.unsqueeze(-1), None, fmt).reshape(out, width)
        tensors[f"{name}.weight"] = weight.t() if is_transposed(modules[name]) else weight
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    head = model.get_output_embeddings()  # a tied head is saved once, with the embedding
    tied = {f"{n}.weight" for n, m in modules.items() if m is head} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{folder} does not hold this model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(device).eval()


TOY = register_target(ToyTarget())
