"""How the evaluators drive a model: its device and dtype, its context limit, reproducible prompts, eval mode."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def model_device(model) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model that has none)."""
    for tensor in _tensors(model):
        return tensor.device
    return torch.device("cpu")


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for tensor in _tensors(model):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _tensors(model):
    if isinstance(model, torch.nn.Module):
        yield from model.parameters()
        yield from model.buffers()


def require_int(name: str, value: Any, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; a transformers causal LM is expected")
    # Multimodal configs nest the language model's settings; plain LM configs return themselves.
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(model: torch.nn.Module) -> int | None:
    """The model's context length (max_position_embeddings / n_positions) or None when it has none."""
    config = _text_config(model)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_context(model: torch.nn.Module, total_tokens: int) -> None:
    """Raise ValueError when ``total_tokens`` positions do not fit the model's context."""
    limit = max_positions(model)
    if limit is not None and total_tokens > limit:
        raise ValueError(f"{total_tokens} tokens exceed the model's {limit} positions")


def random_prompt(model: torch.nn.Module, tokens: int, seed: int) -> torch.Tensor:
    """A (1, tokens) batch of token ids, reproducible from ``seed``, on the model's device."""
    vocab_size = getattr(_text_config(model), "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"model config needs an integer vocab_size >= 2, got {vocab_size!r}")
    return random_token_ids(vocab_size, tokens, seed).unsqueeze(0).to(model_device(model))


def random_token_ids(vocab_size: int, tokens: int, seed: int) -> torch.Tensor:
    """`tokens` ids reproducible from ``seed``, the same for every runtime that times a prompt of them."""
    # A private CPU generator: the prompt is the same on every device and torch's global RNG is untouched.
    generator = torch.Generator().manual_seed(seed)
    # Id 0 is often a special token (pad/unk/bos), which some models treat differently.
    return torch.randint(1, vocab_size, (tokens,), generator=generator)


@contextlib.contextmanager
def inference_eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode plus inference_mode; every module's own training flag is restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in flags:
            module.training = training
