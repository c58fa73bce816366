"""A built candidate as the GGUF file llama.cpp serves: config, tokenizer and every tensor as it is stored.

Tensors are written as the candidate stores them, never re-quantized: a layer rounded onto a GGUF grid
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) writes its own blocks (`StoredWeights.stored_tensors()["blocks"]`), a 16-bit
layer its F16/BF16 weight, and everything else (norms, untouched layers, embeddings) its float tensor as held
(F32 for a float32 model). So the file decodes, tensor by tensor, to exactly the weights that were
evaluated, and its tensor bytes are the candidate's stored weight bytes.

Architectures: Llama (SmolLM, Mistral's decoder is the same graph) as GGUF ``llama`` and Qwen2 as ``qwen2``.
llama.cpp's ``llama`` graph applies rotary embeddings to interleaved pairs where transformers rotates
halves, so the query and key rows are permuted on the way out (whole rows: the blocks along each row are
unchanged). Pruned depth, MLP width and heads are just another config; a student is its own model.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from search_spaces.layers import text_config
from search_spaces.quantization.grid import GGUF_GRID
from search_spaces.quantization.modules import FLOAT, PACKED, SHARED, StoredWeights
from targets.llamacpp.errors import UnsupportedForGGUF
from targets.llamacpp.vocab import GGUFVocab, vocab_of

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> GGUF
PERMUTED = {"llama"}  # GGUF archs whose q/k rows are stored for interleaved rotary pairs
# GGUF archs whose attention may be narrower than the hidden size (head_dim x heads != hidden: pruned heads);
# llama.cpp's qwen2 graph checks its q projection is hidden x hidden.
FREE_HEAD_SPLIT = {"llama"}
# Rotary scalings the writer writes, per GGUF arch: llama3's is a tensor of per-pair frequency factors
# (`rope_freqs`, as llama.cpp's converter computes it), no config key.
ROTARY_SCALINGS = {"llama": ("default", "llama3")}

BLOCK_TENSORS = {  # transformers module (relative to the decoder block) -> GGUF tensor (relative to blk.N)
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_architecture(config) -> str:
    """The GGUF architecture of a transformers config, or UnsupportedForGGUF saying why not."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedForGGUF(f"the llama.cpp target serves {', '.join(sorted(ARCHITECTURES))} models, "
                                 f"not {model_type!r}")
    arch = ARCHITECTURES[model_type]
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ROTARY_SCALINGS.get(arch, ("default",)):
        raise UnsupportedForGGUF(f"the GGUF writer does not write {rope_type!r} rotary scaling for {arch}")
    if arch not in FREE_HEAD_SPLIT and head_dim_of(config) * config.num_attention_heads != config.hidden_size:
        raise UnsupportedForGGUF(f"llama.cpp's {arch} graph needs attention heads that span the hidden size "
                                 f"({config.num_attention_heads} x {head_dim_of(config)} != {config.hidden_size})")
    return arch


def rope_parameters(config) -> dict:
    """The model's rotary settings, its base frequency always among them (transformers 5 keeps them in
    `rope_parameters`, earlier versions in `rope_scaling` and `rope_theta`)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {**rope, "rope_theta": theta, "rope_type": rope.get("rope_type", rope.get("type", "default"))}


def rope_freqs(config) -> np.ndarray | None:
    """llama3 rotary scaling's factor per rotary pair (float32), computed as llama.cpp's converter computes it
    (LlamaModel.generate_extra_tensors: in float32 torch for the base frequencies, in Python floats for the
    factors); None for a model without it."""
    rope = rope_parameters(config)
    if rope["rope_type"].lower() != "llama3":
        return None
    dim = head_dim_of(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings",
                       getattr(config, "original_max_position_embeddings", None) or 8192)
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """transformers' half-rotated q/k rows -> llama.cpp's interleaved pairs, per head (rows only)."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _float_type(dtype):
    from gguf import GGMLQuantizationType as T

    return {np.dtype(np.float32): T.F32, np.dtype(np.float16): T.F16}.get(dtype)


def _float_array(tensor: torch.Tensor) -> tuple[np.ndarray, object]:
    from gguf import GGMLQuantizationType as T

    tensor = tensor.detach().cpu()
    if tensor.dim() <= 1:  # norms and biases in F32 whatever the model's precision, as the converter writes them
        return tensor.float().numpy(), T.F32  # (llama.cpp's CPU kernels multiply by no 16-bit vector)
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits as uint16
        return tensor.view(torch.uint16).numpy(), T.BF16
    array = tensor.numpy() if tensor.dtype in (torch.float32, torch.float16) else tensor.float().numpy()
    return array, _float_type(array.dtype)


def module_tensors(module: nn.Module) -> list[tuple[str, np.ndarray, object]]:
    """(suffix, data, GGML type) of what one module stores: its weight as held, its bias in float."""
    from gguf import GGMLQuantizationType as T

    out = []
    kind = getattr(module, "stored_kind", None) if isinstance(module, StoredWeights) else None
    if kind == PACKED:
        fmt = module.stored_format
        if fmt.scheme != GGUF_GRID:
            raise UnsupportedForGGUF(f"a layer on a {fmt.scheme} grid cannot be written to GGUF (build it on gguf grids)")
        out.append(("weight", module.stored_tensors()["blocks"].numpy(), T[fmt.gguf_type]))
    elif kind == FLOAT:
        out.append(("weight", *_float_array(module.stored_tensors()["weight"])))
    elif kind != SHARED:
        out.append(("weight", *_float_array(module.weight)))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        out.append(("bias", *_float_array(bias)))
    return out


def gguf_tensors(model: nn.Module) -> list[tuple[str, np.ndarray, object]]:
    """(GGUF name, data, GGML type) of every tensor of the model's GGUF, q/k rows permuted where the arch wants."""
    config = text_config(model)
    arch = gguf_architecture(config)
    modules = dict(model.named_modules())
    tensors = []
    factors = rope_freqs(config)
    if factors is not None:  # first, where the converter writes it
        tensors.append(("rope_freqs.weight", factors, _float_type(factors.dtype)))
    tied = _tied(model)
    for name, target in TOP_TENSORS.items():
        if name in modules and not (target == "output" and tied):  # a tied head reads token_embd
            for suffix, data, kind in module_tensors(modules[name]):
                tensors.append((f"{target}.{suffix}", data, kind))
    if not any(t[0] == "output.weight" for t in tensors) and not tied:
        raise UnsupportedForGGUF("the LM head has no stored weight and is not tied to the embedding")
    head_dim = head_dim_of(config)
    for index in range(config.num_hidden_layers):
        for name, target in BLOCK_TENSORS.items():
            module = modules.get(f"model.layers.{index}.{name}")
            if module is None:
                raise UnsupportedForGGUF(f"model.layers.{index}.{name} is missing (not a {arch} block)")
            for suffix, data, kind in module_tensors(module):
                if arch in PERMUTED and target in ("attn_q", "attn_k"):
                    heads = data.shape[0] // head_dim
                    data = _permute(data, heads)
                tensors.append((f"blk.{index}.{target}.{suffix}", data, kind))
    return tensors


def _tied(model: nn.Module) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is embedding.weight


def head_dim_of(config) -> int:
    """An attention head's width: the config's own where it sets one (Gemma, Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_gguf(model: nn.Module, tokenizer, path: Path, name: str = "planner candidate") -> None:
    """Write `model` (a built candidate) and `tokenizer` as one GGUF file at `path`."""
    from gguf import GGUFWriter

    config = text_config(model)
    arch = gguf_architecture(config)
    vocab = vocab_of(tokenizer, config.vocab_size)
    tensors = gguf_tensors(model)
    path = Path(path)
    writer = GGUFWriter(str(path), arch)
    try:
        _write_config(writer, config, arch, name)
        _write_vocab(writer, vocab)
        for tensor_name, data, kind in tensors:
            writer.add_tensor(tensor_name, np.ascontiguousarray(data), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _write_config(writer, config, arch: str, name: str) -> None:
    head_dim = head_dim_of(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _write_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
