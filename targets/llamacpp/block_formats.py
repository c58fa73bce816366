"""Where llama.cpp's block types keep each weight's code and each sub-block's scale: read and rewrite the codes of
blocks llama.cpp's own quantizer wrote, its scales kept.

Error-compensated rounding (`compensated.py`) takes the scales (and minima) llama.cpp's quantizer chose for a
block and re-picks every weight's code; the file then holds llama.cpp's block with other codes, which its
dequantizer and kernels read like any other. Each type is described by
- `code_bits`: for each bit of a weight's code, the byte of the block holding it and its shift, per weight of the
  block (ggml-common.h's layouts: the nibbles of Q4_0/Q4_1/IQ4_NL/Q4_K/IQ4_XS, Q5's fifth bits in `qh`, Q3_K's
  `hmask`, Q6_K's `ql`/`qh`), so one routine reads and writes every type;
- `levels`: the integer each code stands for (Q4_0: code - 8; Q3_K: code - 4; IQ4: the non-uniform kvalues);
- `scales`: per sub-block the step and offset a code's level is decoded with, ``value = step * level + offset``,
  read from the block's fp16 and packed 6-bit fields as ggml's dequantize_row_* reads them.
tests/test_block_formats.py checks each type against ggml's own to_float on blocks its quantizer wrote.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

QK_K = 256
# kvalues_iq4nl (ggml-common.h): the 16 levels of IQ4_NL and IQ4_XS
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int32)


@dataclass(frozen=True, eq=False)  # hashed by identity: one instance per type (block_format)
class BlockFormat:
    name: str
    block: int  # weights per block
    block_bytes: int
    sub: int  # weights sharing one step (and offset)
    levels: np.ndarray  # the integer code c stands for: levels[c]
    code_bits: np.ndarray  # (bits, block, 2): per code bit and weight, (byte in the block, shift)
    scales: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]  # blocks (n, bytes) -> (n, block/sub) x2

    @property
    def bits(self) -> int:
        return self.code_bits.shape[0]

    def codes(self, data: np.ndarray) -> np.ndarray:
        """The code of every weight: `data` (rows, row bytes) -> (rows, row width) uint8."""
        blocks = _blocks(data, self.block_bytes)
        codes = np.zeros((blocks.shape[0], self.block), dtype=np.uint8)
        for bit, (where, shift) in enumerate(zip(self.code_bits[..., 0], self.code_bits[..., 1])):
            codes |= ((blocks[:, where] >> shift.astype(np.uint8)) & 1).astype(np.uint8) << np.uint8(bit)
        return codes.reshape(data.shape[0], -1)

    def with_codes(self, data: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """A copy of `data` whose blocks hold `codes` (rows, row width) in place of theirs; scales untouched."""
        blocks = _blocks(data, self.block_bytes).copy()
        codes = np.asarray(codes, dtype=np.uint8).reshape(-1, self.block)
        if int(codes.max(initial=0)) >= len(self.levels):
            raise ValueError(f"{self.name} codes are below {len(self.levels)}, got {int(codes.max())}")
        blocks &= _kept_bits(self)
        # Two weights share a byte (a nibble each) but never a (byte, shift): within one bit and one shift the
        # bytes are distinct, so each fancy-indexed OR writes every byte once.
        for bit, at, where, shift in _bit_runs(self):
            blocks[:, where] |= ((codes[:, at] >> np.uint8(bit)) & 1) << np.uint8(shift)
        return blocks.reshape(data.shape)

    def steps(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(step, offset) per weight's sub-block, (rows, row width / sub) float32 each (offset 0 without one)."""
        step, offset = self.scales(_blocks(data, self.block_bytes))
        rows = data.shape[0]
        step = step.reshape(rows, -1).astype(np.float32)
        return step, (np.zeros_like(step) if offset is None else offset.reshape(rows, -1).astype(np.float32))

    def decode(self, data: np.ndarray) -> np.ndarray:
        """float32 weights (rows, width) from the blocks: step * level + offset, as ggml's dequantizer."""
        step, offset = self.steps(data)
        levels = self.levels[self.codes(data)].astype(np.float32)
        expand = lambda a: np.repeat(a, self.sub, axis=1)  # noqa: E731
        return (expand(step) * levels + expand(offset)).astype(np.float32)


@lru_cache(maxsize=None)
def _kept_bits(fmt: BlockFormat) -> np.ndarray:
    """Per byte of a block, the bits that are not code bits (scales, minima, d)."""
    kept = np.full(fmt.block_bytes, 0xFF, dtype=np.uint8)
    for where, shift in zip(fmt.code_bits[..., 0].ravel(), fmt.code_bits[..., 1].ravel()):
        kept[where] &= np.uint8(~(1 << int(shift)) & 0xFF)
    return kept


@lru_cache(maxsize=None)
def _bit_runs(fmt: BlockFormat) -> list[tuple[int, np.ndarray, np.ndarray, int]]:
    """(code bit, which weights, their bytes, shift) for each code bit and shift value."""
    runs = []
    for bit, (where, shift) in enumerate(zip(fmt.code_bits[..., 0], fmt.code_bits[..., 1])):
        for value in np.unique(shift):
            at = np.flatnonzero(shift == value)
            runs.append((bit, at, where[at], int(value)))
    return runs


def _blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.shape[-1] % block_bytes:
        raise ValueError(f"a row of {data.shape[-1]} bytes is not a whole number of {block_bytes}-byte blocks")
    return data.reshape(-1, block_bytes)


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view("<f2").reshape(-1).astype(np.float32)


def _nibbles(base: int, weights: int, group: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """4 code bits of `weights` weights stored `group` to a run of bytes: weights [k*2g, k*2g + g) in the low
    nibbles of bytes base + k*g ..., the next g in their high nibbles (Q4_0's 32-weight block: g = 16; Q4_K's
    64-weight chunks: g = 32)."""
    index = np.arange(weights)
    chunk, within = index // (2 * group), index % (2 * group)
    byte = base + chunk * group + within % group
    shift = np.where(within < group, 0, 4)
    return [(byte, shift + b) for b in range(4)]


def _format(name, block, block_bytes, sub, levels, bits, scales) -> BlockFormat:
    code_bits = np.stack([np.stack([np.asarray(w), np.asarray(s)], axis=-1) for w, s in bits]).astype(np.int64)
    return BlockFormat(name, block, block_bytes, sub, np.asarray(levels, dtype=np.int32), code_bits, scales)


def _legacy(name: str, bits: int, offset: bool) -> BlockFormat:
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL: one fp16 step (and fp16 minimum), 32 weights."""
    head = 4 if offset else 2
    if bits == 8:
        code = [(head + np.arange(32), np.full(32, b)) for b in range(8)]
        levels = np.arange(256).astype(np.uint8).view(np.int8)  # the byte is the int8 code
        size = head + 32
    elif bits == 5:
        high = [(head + np.arange(32) // 8, np.arange(32) % 8)]  # qh: a little-endian uint32, bit j = weight j
        code = _nibbles(head + 4, 32, 16) + high
        levels = np.arange(32) - (0 if offset else 16)
        size = head + 4 + 16
    else:
        code = _nibbles(head, 32, 16)
        levels = IQ4_LEVELS if name == "IQ4_NL" else np.arange(16) - (0 if offset else 8)
        size = head + 16

    def scales(blocks):
        return _fp16(blocks, 0)[:, None], _fp16(blocks, 2)[:, None] if offset else None
    return _format(name, 32, size, 32, levels, code, scales)


def _scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and minima of Q4_K/Q5_K's 12 bytes (get_scale_min_k4)."""
    q = packed.astype(np.int32)
    scale, minimum = np.empty((q.shape[0], 8), np.int32), np.empty((q.shape[0], 8), np.int32)
    for j in range(8):
        if j < 4:
            scale[:, j], minimum[:, j] = q[:, j] & 63, q[:, j + 4] & 63
        else:
            scale[:, j] = (q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4)
            minimum[:, j] = (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
    return scale, minimum


def _k_affine(name: str, bits: int) -> BlockFormat:
    """Q4_K (144 bytes) and Q5_K (176): fp16 d and dmin, 12 bytes of 6-bit scales and minima for 8 sub-blocks
    of 32, then (Q5_K) 32 bytes of fifth bits and 128 bytes of nibbles in 64-weight chunks;
    value = (d * scale) * code - (dmin * min)."""
    low = 16 + (32 if bits == 5 else 0)
    code = _nibbles(low, QK_K, 32)
    if bits == 5:
        index = np.arange(QK_K)
        code.append((16 + index % 32, index // 32))  # qh[l], bit 2*chunk + (second half of the chunk)

    def scales(blocks):
        scale, minimum = _scale_min_k4(blocks[:, 4:16])
        d, dmin = _fp16(blocks, 0)[:, None], _fp16(blocks, 2)[:, None]
        return (d * scale).astype(np.float32), -(dmin * minimum).astype(np.float32)
    return _format(name, QK_K, low + 128, 32, np.arange(2 ** bits), code, scales)


def _q6_k() -> BlockFormat:
    """Q6_K (210 bytes): ql[128], qh[64], int8 scales[16], fp16 d; 128-weight halves of 4 quarters of 32, quarter
    k of a half: low nibbles of ql[l + 32 (k odd)] (high nibbles for k >= 2), bits 2k, 2k+1 of qh[l]."""
    index = np.arange(QK_K)
    half, quarter, lane = index // 128, (index % 128) // 32, index % 32
    low_byte = half * 64 + lane + 32 * (quarter % 2)
    low_shift = 4 * (quarter // 2)
    high_byte = 128 + half * 32 + lane
    code = [(low_byte, low_shift + b) for b in range(4)] + [(high_byte, 2 * quarter + b) for b in range(2)]

    def scales(blocks):
        return _fp16(blocks, 208)[:, None] * blocks[:, 192:208].view(np.int8).astype(np.float32), None
    return _format("Q6_K", QK_K, 210, 16, np.arange(64) - 32, code, scales)


def _two_bit_planes(base: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 2 low code bits of Q2_K and Q3_K: in each 128-weight half, pass j (shift 2j) covers 32 weights, qs[l]
    then qs[16 + l] (lane 0..31 of the half's 32 bytes from `base`)."""
    index = np.arange(QK_K)
    half, within = index // 128, index % 128
    return [(base + half * 32 + within % 32, 2 * (within // 32) + b) for b in range(2)]


def _q2_k() -> BlockFormat:
    """Q2_K (84 bytes): scales[16] (low nibble the sub-block's scale, high its minimum; 16 sub-blocks of 16),
    qs[64], fp16 d and dmin; value = (d * scale) * code - (dmin * min)."""
    def scales(blocks):
        packed = blocks[:, :16].astype(np.float32)
        d, dmin = _fp16(blocks, 80)[:, None], _fp16(blocks, 82)[:, None]
        return (d * (packed % 16)).astype(np.float32), -(dmin * (packed // 16)).astype(np.float32)
    return _format("Q2_K", QK_K, 84, 16, np.arange(4), _two_bit_planes(16), scales)


def _q3_k() -> BlockFormat:
    """Q3_K (110 bytes): hmask[32], qs[64], 12 bytes of 6-bit scales for 16 sub-blocks of 16, fp16 d. In each
    128-weight half, pass j (shift 2j of qs) covers 32 weights: qs[l] then qs[16 + l]; the third bit is bit
    4*half + j of hmask[l] (set: the level is the 2 bits; clear: 4 less)."""
    index = np.arange(QK_K)
    half, within = index // 128, index % 128
    code = _two_bit_planes(32) + [(within % 32, 4 * half + within // 32)]

    def scales(blocks):
        aux = blocks[:, 96:108].copy().view("<u4").astype(np.uint32)
        k1, k2, tmp = np.uint32(0x03030303), np.uint32(0x0F0F0F0F), aux[:, 2].copy()
        unpacked = np.stack([(aux[:, 0] & k2) | (((tmp >> 0) & k1) << 4), (aux[:, 1] & k2) | (((tmp >> 2) & k1) << 4),
                             ((aux[:, 0] >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                             ((aux[:, 1] >> 4) & k2) | (((tmp >> 6) & k1) << 4)], axis=1).astype("<u4")
        six_bit = unpacked.view(np.int8).reshape(-1, 16).astype(np.float32)
        return _fp16(blocks, 108)[:, None] * (six_bit - 32), None
    return _format("Q3_K", QK_K, 110, 16, np.arange(8) - 4, code, scales)


def _iq4_xs() -> BlockFormat:
    """IQ4_XS (136 bytes): fp16 d, scales_h (uint16), scales_l[4], qs[128]: 8 sub-blocks of 32 as IQ4_NL's
    nibbles, each with the 6-bit scale ls (low 4 bits in scales_l, high 2 in scales_h); step d * (ls - 32)."""
    code = _nibbles(8, QK_K, 16)

    def scales(blocks):
        high = blocks[:, 2:4].copy().view("<u2").astype(np.int32)
        low = blocks[:, 4:8].astype(np.int32)
        ib = np.arange(8)
        ls = ((low[:, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((high >> (2 * ib)) & 3) << 4)
        return _fp16(blocks, 0)[:, None] * (ls - 32).astype(np.float32), None
    return _format("IQ4_XS", QK_K, 136, 32, IQ4_LEVELS, code, scales)


@lru_cache(maxsize=None)
def block_format(name: str) -> BlockFormat:
    """The layout of a type whose codes error-compensated rounding may choose; KeyError for one it may not."""
    makers = {"Q4_0": lambda: _legacy("Q4_0", 4, False), "Q4_1": lambda: _legacy("Q4_1", 4, True),
              "Q5_0": lambda: _legacy("Q5_0", 5, False), "Q5_1": lambda: _legacy("Q5_1", 5, True),
              "Q8_0": lambda: _legacy("Q8_0", 8, False), "IQ4_NL": lambda: _legacy("IQ4_NL", 4, False),
              "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": lambda: _k_affine("Q4_K", 4), "Q5_K": lambda: _k_affine("Q5_K", 5),
              "Q6_K": _q6_k, "IQ4_XS": _iq4_xs}
    return makers[name]()


COMPENSABLE = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_0", "IQ4_NL", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0")
