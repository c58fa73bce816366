"""How much memory a study needs for a model, the precision its float model is held in, and what cannot fit.

A study holds the float model the whole time; on top of it, at its peak, one stage's work. Measured on Llama shapes
of 135 M to 1.24 B parameters (bench/cost_growth.py, docs/benchmarks.md section 13: peak anonymous memory; the
mapped pages of llama.cpp's GGUF files are the kernel's to drop and are not counted):
- a candidate without training (quantization, a cut): the model, a cut's own weights (a llama-quant candidate
  shares the model's), the compensated rounding's work (input covariances bounded to 2 GiB, Hessian factors),
  activations and logits;
- training (a student's rung, a healed cut): the trained copy, its gradients and AdamW's two moments, each the
  size of the weights in their precision, besides the teacher (the model itself).
So a study needs the model, `WORK_BYTES` a parameter and `STUDY_OVERHEAD`; training `TRAINING_COPIES` x the
model's bytes and `TRAINING_OVERHEAD`, or the former if more.

On the CPU, `dtype = "auto"` keeps float32 when the whole space fits in it (every candidate compared against an
F32 reference GGUF, as before), else the precision the checkpoint comes in (bfloat16 or float16: the model, every
candidate built from it and the reference GGUF in it; every candidate still compared against that one reference).
Training is left out of the space (distillation, healing) where it would not fit but the rest would; a model
that cannot fit at all is refused up front, saying how much memory it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from evaluators.memory import dtype_name
from planner.errors import PlannerError

# Fitted to the peaks measured (anonymous GB at 135 M / 360 M / 1.24 B in float32, 1.24 B and 3.21 B in bfloat16):
# without training 3.65 / 7.12 / 13.94 / - / 21.11 (the sensitivity tables and a llama-quant trial with compensation:
# their work is in float32 whatever the model's precision, about 3 bytes a parameter beyond the model), with training
# 3.91 / 8.71 / killed past 24.4 / 14.18 / killed (a healed cut, a student rung); every point is covered.
WORK_BYTES = 3.2  # per parameter: the tables' and the compensated rounding's float32 work
STUDY_OVERHEAD = 5.1e9  # what does not grow with the weights: logits, activations, the runtime
TRAINING_COPIES = 5.4  # the teacher, the student, its gradients, AdamW's two moments (slope 5.35 measured)
TRAINING_OVERHEAD = 1.5e9
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Footprint:
    """A model's memory needs in one precision."""

    parameters: int
    dtype: str  # float32, bfloat16, float16

    @property
    def model_bytes(self) -> int:
        return self.parameters * BYTES[self.dtype]

    @property
    def study_bytes(self) -> int:
        """Peak of a study without training: the model and the float32 work of its sensitivity tables."""
        return int(self.model_bytes + WORK_BYTES * self.parameters + STUDY_OVERHEAD)

    @property
    def training_bytes(self) -> int:
        """Peak of a study that trains (students, healing), its other stages included."""
        return max(self.study_bytes, int(TRAINING_COPIES * self.model_bytes + TRAINING_OVERHEAD))


@dataclass(frozen=True)
class Precision:
    """What `choose_precision` decided: the dtype the model is held in, whether training fits, and why."""

    dtype: str
    training: bool
    note: str | None  # a line for the user when the choice is not the plain one (None: float32 and training)


def available_memory() -> int:
    """Bytes this process may still use: the kernel's MemAvailable, or less under a cgroup's memory limit."""
    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def checkpoint_dtype(config) -> str:
    """The precision the checkpoint's weights are stored in (its config's dtype; float32 when it names none)."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        if value is not None and dtype_name(value) in BYTES:
            return dtype_name(value)
    return "float32"


def gb(size: float) -> str:
    return f"{size / 1e9:.1f} GB"


def choose_precision(parameters: int, requested: str, stored: str, available: int, name: str) -> Precision:
    """The precision a study on the CPU holds a model of `parameters` in: `requested` ("auto" or a dtype), the
    checkpoint's `stored` dtype, `available` bytes. "auto": float32 where the whole space fits in it, else the
    checkpoint's 16-bit precision where the whole space fits in that, else the first of the two in which a study
    without training fits (training left out); a dtype asked for is kept, training left out where it would not fit.
    A model that does not fit at all is refused (PlannerError, one line)."""
    half = stored if stored != "float32" else "bfloat16"
    choices = [requested] if requested != "auto" else ["float32", half]
    for training in (True, False):
        for dtype in choices:
            needs = Footprint(parameters, dtype)
            if (needs.training_bytes if training else needs.study_bytes) <= available:
                return Precision(dtype, training, _note(needs, training, available, requested, name))
    smallest = Footprint(parameters, choices[-1])
    raise PlannerError(f"{name} needs about {gb(smallest.study_bytes)} of memory for a study ({parameters / 1e9:.2f} B "
                       f"parameters held in {smallest.dtype}, {gb(smallest.training_bytes)} with distillation); this "
                       f"machine has {gb(available)} available")


def _note(needs: Footprint, training: bool, available: int, requested: str, name: str) -> str | None:
    parts = []
    if needs.dtype != "float32" and requested == "auto":
        in_float32 = Footprint(needs.parameters, "float32")
        parts.append(f"{name} is held in {needs.dtype} as its checkpoint is (in float32 a study needs about "
                     f"{gb(in_float32.training_bytes if training else in_float32.study_bytes)}, {gb(available)} "
                     f"available): "
                     f"the reference GGUF is {needs.dtype}, every candidate compared against it")
    if not training:
        parts.append(f"distillation and healing left out: training needs about {gb(needs.training_bytes)} in "
                     f"{needs.dtype}, {gb(available)} available")
    return "; ".join(parts) or None


def without_training(spaces: dict) -> dict:
    """The spaces with nothing trained: no students, no healed cuts."""
    out = dict(spaces)
    if "distillation" in out:
        out["distillation"] = replace(out["distillation"], enabled=(False,))
    if "pruning" in out:
        out["pruning"] = replace(out["pruning"], heal=(False,))
    return out


def parameter_count(config, trust_remote_code: bool = False) -> int:
    """The model's parameter count from its config alone (built on the meta device: no memory, no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())
