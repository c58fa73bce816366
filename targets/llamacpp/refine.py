"""An allocation refined by measured KL: bytes moved between groups of tensors, a move kept only when the model's
measured KL drops (EvoPress-style, Sieberling et al. 2024, with the allocation as the starting point).

The allocation (allocated.choose_types) minimises a *predicted* KL, a sum of per-tensor terms, and the prediction
is off (docs/benchmarks.md section 7: measured KL 1.6-2.7x the predicted one, and not uniformly so). Here the
candidate's weights as llama.cpp decodes them (each tensor in its chosen type: llama.cpp's rounding or the
compensated blocks) are put into the model in torch, and a move takes one group (one role in one band of layers,
sensitivity.gain_groups) one step up its tensors' option hulls and another one step down, within the byte target;
the next-token KL from the float model on calibration windows decides. Each evaluation recomputes only the layers
from the first one a move changes (the earlier layers' outputs are replayed). At most `evaluations` forward passes:
the cost cap.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from search_spaces.compute import float32_compute
from search_spaces.quantization.allocation import Option, hull
from targets.llamacpp import sensitivity

WINDOWS = 4  # calibration windows the KL is measured on (after those the KL gains were measured on)


@dataclass
class Refinement:
    chosen: dict[str, Option]
    measured_kl: list[float] = field(default_factory=list)  # the allocation's, then after each kept move
    predicted_kl: list[float] = field(default_factory=list)  # the same choices' predicted KL
    evaluations: int = 0
    kept: int = 0
    seconds: float = 0.0

    def report(self) -> dict:
        """What a recipe and the review keep of it: predicted against measured KL, before and after."""
        return {"evaluations": self.evaluations, "kept": self.kept, "seconds": round(self.seconds, 1),
                "measured_kl": [self.measured_kl[0], self.measured_kl[-1]],
                "predicted_kl": [self.predicted_kl[0], self.predicted_kl[-1]]}


def _moves(hulls: Mapping[str, list[Option]], position: dict[str, int], groups: Sequence[Sequence[str]], up: int,
           down: int) -> dict[str, int] | None:
    """The positions after group `up` goes one step up its hulls and group `down` one step down (None: neither
    can move)."""
    moved = dict(position)
    for name in groups[up]:
        moved[name] = min(position[name] + 1, len(hulls[name]) - 1)
    for name in groups[down]:
        moved[name] = max(position[name] - 1, 0)
    return None if moved == position else moved


@torch.inference_mode()
def refine(model: nn.Module, allowed: Mapping[str, Sequence[Option]], chosen: Mapping[str, Option],
           byte_target: float, windows: torch.Tensor, decoded: Callable[[str, str, np.ndarray], np.ndarray],
           predicted: Callable[[str, Option], float], evaluations: int, seed: int = 0,
           fits: Callable[[dict[str, Option]], bool] = lambda choice: True) -> Refinement:
    """`chosen` (per GGUF tensor, one of its `allowed` options) improved by at most `evaluations` measured moves
    within `byte_target` bytes and `fits`. `decoded(name, kind, weight)`: the float `weight` of a tensor as
    llama.cpp decodes it in that kind; `predicted(name, option)`: its predicted KL. The model's weights are
    restored before returning."""
    started = time.perf_counter()
    tensors = [t for t in sensitivity.quantizable(model, {}) if t.gguf_name in chosen]
    weights = sensitivity.weights_of(model, tensors)
    hulls = {}
    for name, options in allowed.items():
        points = hull(options)
        hulls[name] = points if chosen[name] in points else sorted({*points, chosen[name]}, key=lambda o: o.bytes)
    position = {name: hulls[name].index(chosen[name]) for name in chosen}
    groups = [[t.gguf_name for t in members] for members in sensitivity.gain_groups(tensors).values()]
    replay = sensitivity._Replay(model)
    holders = {t.gguf_name: t.modules for t in tensors}
    originals = {name: weight.detach().clone() for name, weight in weights.items()}
    was_training = model.training
    model.eval()
    windows = windows.to(next(model.parameters()).device)
    out = Refinement(dict(chosen))
    try:
        with float32_compute(model):
            reference = model(input_ids=windows, use_cache=False).logits.float().log_softmax(-1)

        def install(name: str, option: Option) -> None:
            array = originals[name].float().cpu().numpy()
            weights[name].copy_(torch.from_numpy(decoded(name, option.kind, array)).to(weights[name].dtype))

        def measured(first: int) -> float:
            with replay.recording(), replay.from_layer(first), float32_compute(model):
                logits = model(input_ids=windows, use_cache=False).logits.float().log_softmax(-1)
            return float(torch.nn.functional.kl_div(logits, reference, log_target=True, reduction="none")
                         .sum(-1).mean())

        for name, option in chosen.items():
            install(name, option)
        out.measured_kl.append(measured(0))
        out.predicted_kl.append(sum(predicted(n, o) for n, o in chosen.items()))
        total = sum(o.bytes for o in chosen.values())
        rng = random.Random(seed)
        attempts = 0
        while out.evaluations < evaluations and attempts < 50 * max(evaluations, 1):
            attempts += 1
            up, down = rng.sample(range(len(groups)), 2)
            moved = _moves(hulls, position, groups, up, down)
            if moved is None:
                continue
            changed = [n for n in moved if moved[n] != position[n]]
            size = total + sum(hulls[n][moved[n]].bytes - hulls[n][position[n]].bytes for n in changed)
            if size > byte_target or not fits({n: hulls[n][i] for n, i in moved.items()}):
                continue
            kept_outputs = list(replay.outputs)
            for name in changed:
                install(name, hulls[name][moved[name]])
            kl = measured(replay.first_layer([m for n in changed for m in holders[n]]))
            out.evaluations += 1
            if kl < out.measured_kl[-1]:
                position, total = moved, size
                out.kept += 1
                out.measured_kl.append(kl)
                out.predicted_kl.append(sum(predicted(n, hulls[n][position[n]]) for n in position))
            else:
                replay.outputs = kept_outputs
                for name in changed:
                    install(name, hulls[name][position[name]])
    finally:
        for name, weight in weights.items():
            weight.copy_(originals[name])
        model.train(was_training)
    out.chosen = {name: hulls[name][i] for name, i in position.items()}
    out.seconds = time.perf_counter() - started
    return out
