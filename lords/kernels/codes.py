"""Decoding a tile of packed codes into codebook levels, shared by every LoRDS kernel.

Codes use lords.packing's layout (row-major, 8 codes in `bits` bytes, little-endian). When every row starts on a byte
(2 and 4 bits with K divisible by 4 or 2) the tile's bytes are loaded once and split with shifts; the launcher passes
the row length in bytes as an argument so that Triton can see it is a multiple of 16 and issue 16-byte loads.
Otherwise (3 bits) each code is gathered from the two bytes that can hold it.
"""

import torch
import triton
import triton.language as tl


def check_input(x: torch.Tensor, scale_a: torch.Tensor) -> None:
    if x.shape[-1] != scale_a.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {scale_a.shape[1]}")


def row_aligned(bits: int, in_features: int) -> bool:
    return bits != 3 and in_features % (8 // bits) == 0


def rank_pad(rank: int) -> int:
    """tl.dot needs every dimension >= 16; powers of two keep tl.arange legal."""
    return max(16, triton.next_power_of_2(rank))


@triton.jit
def load_levels(codes_ptr, codebook_ptr, offs_n, offs_k, k0, N, K, ROW_BYTES,
                BITS: tl.constexpr, ROW_ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) tile of levels C[codes] in float32; zero outside the matrix."""
    tile_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if ROW_ALIGNED:
        per_byte: tl.constexpr = 8 // BITS
        offs_b = k0 // per_byte + tl.arange(0, BLOCK_K // per_byte)
        packed = tl.load(codes_ptr + offs_n[:, None].to(tl.int64) * ROW_BYTES + offs_b[None, :],
                         mask=(offs_n[:, None] < N) & (offs_b[None, :] < ROW_BYTES), other=0).to(tl.int32)
        if BITS == 4:
            code = tl.join(packed & 15, packed >> 4).reshape(BLOCK_N, BLOCK_K)
        else:
            # join(join(a, c), join(b, d)) interleaves to a, b, c, d: the order the four 2-bit codes sit in a byte.
            code = tl.join(tl.join(packed & 3, (packed >> 4) & 3), tl.join((packed >> 2) & 3, (packed >> 6) & 3))
            code = code.reshape(BLOCK_N, BLOCK_K)
    else:
        index = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        bit = (index % 8) * BITS
        byte = (index // 8) * BITS + bit // 8
        low = tl.load(codes_ptr + byte, mask=tile_mask, other=0).to(tl.int32)
        high = tl.load(codes_ptr + byte + 1, mask=tile_mask & ((bit % 8) + BITS > 8), other=0).to(tl.int32)
        code = ((low | (high << 8)) >> (bit % 8)) & ((1 << BITS) - 1)
    return tl.load(codebook_ptr + code, mask=tile_mask, other=0.0)


@triton.jit
def load_scale_b(scale_b_ptr, offs_n, offs_r, N, RANK):
    """The (BLOCK_N, RANK_PAD) tile of B; zero past the matrix and in the rank padding."""
    return tl.load(scale_b_ptr + offs_n[:, None] * RANK + offs_r[None, :],
                   mask=(offs_n[:, None] < N) & (offs_r[None, :] < RANK), other=0.0)


@triton.jit
def load_scale_a(scale_a_ptr, offs_r, offs_k, K, RANK):
    """The (RANK_PAD, BLOCK_K) tile of A; zero past the matrix and in the rank padding."""
    return tl.load(scale_a_ptr + offs_r[:, None] * K + offs_k[None, :],
                   mask=(offs_r[:, None] < RANK) & (offs_k[None, :] < K), other=0.0)
