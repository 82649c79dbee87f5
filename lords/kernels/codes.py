"""Decoding packed codes into codebook levels, shared by every LoRDS kernel.

Codes come in lords.packing's segment layout: byte column j of a row holds the codes of columns s * S + j for every
segment s. A kernel loads one (BLOCK_N, BLOCK_J) tile of words with contiguous, 16-byte loads (the launcher passes
the row length and S as arguments, so Triton sees when they are multiples of 16), then takes segment s's code tile
out of it with shifts: no register interleaving. The level lookup is a gather from the 4- to 16-entry codebook,
which stays in L1.
"""

import torch
import triton
import triton.language as tl

from ..packing import SEGMENTS, row_bytes, segment_width


def check_input(x: torch.Tensor, scale_a: torch.Tensor) -> None:
    if x.shape[-1] != scale_a.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {scale_a.shape[1]}")


def rank_pad(rank: int) -> int:
    """tl.dot needs every dimension >= 16; powers of two keep tl.arange legal."""
    return max(16, triton.next_power_of_2(rank))


def layout_args(in_features: int, bits: int) -> dict:
    """The packed-layout arguments every kernel takes."""
    return {"SEGMENT": segment_width(in_features, bits), "ROW_BYTES": row_bytes(in_features, bits)}


def layout_meta(bits: int) -> dict:
    return {"BITS": bits, "SEGMENTS": SEGMENTS[bits]}


@triton.jit
def load_words(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BITS: tl.constexpr):
    """The (BLOCK_N, BLOCK_J) int32 words of byte columns offs_j: one byte, or three byte planes at 3 bits."""
    rows = codes_ptr + offs_n[:, None].to(tl.int64) * ROW_BYTES + offs_j[None, :]
    mask = (offs_n[:, None] < N) & (offs_j[None, :] < SEGMENT)
    word = tl.load(rows, mask=mask, other=0).to(tl.int32)
    if BITS == 3:
        word |= tl.load(rows + SEGMENT, mask=mask, other=0).to(tl.int32) << 8
        word |= tl.load(rows + 2 * SEGMENT, mask=mask, other=0).to(tl.int32) << 16
    return word


@triton.jit
def segment_levels(word, codebook_ptr, segment, BITS: tl.constexpr):
    """C[codes] in float32 for segment `segment` (compile-time or run-time) of a tile of words."""
    if BITS == 3:
        code = ((word >> (2 * segment)) & 3) | (((word >> (16 + segment)) & 1) << 2)
    else:
        code = (word >> (BITS * segment)) & ((1 << BITS) - 1)
    return tl.load(codebook_ptr + code)


@triton.jit
def segment_columns(offs_j, segment, SEGMENT, K):
    """The weight columns of byte columns offs_j in `segment`, and which of them exist."""
    offs_k = segment * SEGMENT + offs_j
    return offs_k, (offs_j < SEGMENT) & (offs_k < K)


@triton.jit
def load_scale_b(scale_b_ptr, offs_n, offs_r, N, RANK):
    """The (BLOCK_N, RANK_PAD) tile of B; zero past the matrix and in the rank padding."""
    return tl.load(scale_b_ptr + offs_n[:, None] * RANK + offs_r[None, :],
                   mask=(offs_n[:, None] < N) & (offs_r[None, :] < RANK), other=0.0)


@triton.jit
def load_scale_a(scale_a_ptr, offs_r, offs_k, mask_k, K, RANK):
    """The (RANK_PAD, BLOCK) tile of A at columns offs_k; zero where mask_k is off and in the rank padding."""
    return tl.load(scale_a_ptr + offs_r[:, None] * K + offs_k[None, :],
                   mask=(offs_r[:, None] < RANK) & mask_k[None, :], other=0.0)
