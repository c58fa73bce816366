"""Deployment targets: where a candidate ships, as what artifact, measured in which runtime (see base)."""
from __future__ import annotations

from targets.base import AUTO, TARGETS, Measured, Request, Target, register_target
from targets.llamacpp.target import LLAMA_CPP
from targets.transformers_target import TRANSFORMERS
from targets.vllm_target import VLLM

__all__ = ["AUTO", "TARGETS", "Measured", "Request", "Target", "TargetError", "register_target", "choose", "check_usable", "LLAMA_CPP", "TRANSFORMERS", "VLLM"]


class TargetError(ValueError):
    """The target asked for cannot serve here or this model; the message says why in one line."""


def choose(name: str, device: str, model, tokenizer) -> Target:
    """The target named (or, for "auto", llama.cpp on a CPU for a model it serves, else transformers)."""
    if name == AUTO:
        if device == "cpu" and LLAMA_CPP.unavailable(device) is None and LLAMA_CPP.unsupported(model, tokenizer) is None:
            return LLAMA_CPP
        return TRANSFORMERS
    if name not in TARGETS:
        raise TargetError(f"unknown target '{name}' (known: {AUTO}, {', '.join(TARGETS)})")
    return check_usable(TARGETS[name], device, model, tokenizer)


def check_usable(target: Target, device: str, model=None, tokenizer=None) -> Target:
    """`target`, or TargetError when it cannot run on this device (or, given a model, cannot serve it)."""
    reason = target.unavailable(device) or (target.unsupported(model, tokenizer) if model is not None else None)
    if reason:
        raise TargetError(f"target {target.name} cannot be used here: {reason}")
    return target
