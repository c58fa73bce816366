"""Calibration batches from the training split, shared by GPTQ, Wanda/importance scores and distillation."""
from __future__ import annotations

import random
from typing import Sequence

import torch


def calibration_batches(tokenizer, documents: Sequence, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """A (num_samples, seq_len) LongTensor of token windows drawn from random places in the documents.

    Deterministic for a seed. Only as much text as needed is tokenized: documents are visited in a
    seeded random order until the stream holds twice the tokens asked for, then windows are drawn from it.
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need at least one sample of 2+ tokens, got {num_samples} x {seq_len}")
    docs = [d for d in documents if d.text.strip()]
    if not docs:
        raise ValueError("no calibration text: the training split is empty")
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    wanted = 2 * num_samples * seq_len
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer(docs[i].text, add_special_tokens=False)["input_ids"])
        if len(stream) >= wanted:
            break
    if len(stream) < seq_len + 1:
        raise ValueError(f"the training split has {len(stream)} tokens, fewer than one {seq_len}-token sample")
    starts = [rng.randrange(0, len(stream) - seq_len) for _ in range(num_samples)]
    return torch.tensor([stream[s:s + seq_len] for s in starts], dtype=torch.long)


def training_windows(tokenizer, documents: Sequence, start: int, count: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Windows `start .. start + count - 1` of a seeded stream of (seq_len) token windows from the documents.

    Window i depends only on (seed, i), never on how many are asked for, so training that stops after 50
    steps and resumes for 50 more reads exactly the windows a 100-step run reads (a multi-fidelity rung
    continues a cached student). Each window picks a document with probability proportional to its length
    and a uniform start inside it; only the documents picked are tokenized.
    """
    if count < 1 or seq_len < 2 or start < 0:
        raise ValueError(f"need windows {start}.. (count {count}) of 2+ tokens, got seq_len {seq_len}")
    docs = [d for d in documents if d.text.strip()]
    if not docs:
        raise ValueError("no calibration text: the training split is empty")
    weights = [len(d.text) for d in docs]
    tokens: dict[int, list[int]] = {}
    rows = []
    for i in range(start, start + count):
        rng = random.Random(f"{seed}:{i}")  # a string seed hashes deterministically across processes
        for _ in range(len(docs) * 4):  # a document shorter than a window is drawn again
            pick = rng.choices(range(len(docs)), weights)[0]
            if pick not in tokens:
                tokens[pick] = tokenizer(docs[pick].text, add_special_tokens=False)["input_ids"]
            if len(tokens[pick]) > seq_len:
                break
        else:
            raise ValueError(f"no document of the training split holds a {seq_len}-token window")
        offset = rng.randrange(0, len(tokens[pick]) - seq_len)
        rows.append(tokens[pick][offset:offset + seq_len])
    return torch.tensor(rows, dtype=torch.long)
