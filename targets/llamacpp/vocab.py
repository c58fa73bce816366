"""A transformers tokenizer as GGUF's vocabulary, so llama.cpp tokenizes text exactly as transformers does.

Byte-level BPE tokenizers (GPT-2 style: SmolLM, Qwen2, Llama 3) are written as GGUF's ``gpt2`` model with
their merges; the pre-tokenizer (how text is split before merging) is named by the llama.cpp pre-tokenizer
whose rules it equals. Any other tokenizer (SentencePiece-style BPE with byte fallback, Unigram, WordPiece)
and any unknown pre-tokenizer is refused up front: llama.cpp would silently tokenize differently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from targets.llamacpp.errors import UnsupportedForGGUF

# Token types of GGUF's vocabulary (llama.cpp's llama_token_type).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# The pre-tokenizers llama.cpp implements, by the tokenizers description they equal (compared as JSON).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_SPLIT_THEN_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_REGEX), _SPLIT_THEN_BYTES]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _SPLIT_THEN_BYTES]},
}


@dataclass(frozen=True)
class GGUFVocab:
    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos, eos, unk, pad -> id
    add_bos: bool
    chat_template: str | None


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:

    found = _canonical(pre_tokenizer)
    for name, description in PRE_TOKENIZERS.items():
        if _canonical(description) == found:
            return name
    raise UnsupportedForGGUF(f"llama.cpp has no pre-tokenizer known to equal this tokenizer's "
                             f"({(pre_tokenizer or {}).get('type', 'none')}): its GGUF would tokenize differently")


def vocab_of(tokenizer, vocab_size: int) -> GGUFVocab:

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedForGGUF(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    described = json.loads(backend.to_str())
    model = described["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedForGGUF(f"the GGUF writer writes byte-level BPE tokenizers, not "
                                 f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}")
    pre = pre_tokenizer_name(described.get("pre_tokenizer"))
    by_id = {index: token for token, index in model["vocab"].items()}
    added = {entry["id"]: entry for entry in described.get("added_tokens", [])}
    by_id.update({index: entry["content"] for index, entry in added.items()})
    if max(by_id) >= vocab_size:
        raise UnsupportedForGGUF(f"the tokenizer has ids up to {max(by_id)}, the model only {vocab_size} embeddings")
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embeddings past the tokenizer (padding to a round size)
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[index])
            types.append((CONTROL if added[index].get("special") else USER_DEFINED) if index in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special_ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int):
            special_ids[kind] = token_id
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab("gpt2", pre, tokens, types, merges, special_ids, adds_bos,
                     template if isinstance(template, str) else None)
