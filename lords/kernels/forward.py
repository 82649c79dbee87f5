"""The tiled LoRDS forward Y = X @ ((B @ A) * C[codes])^T + bias, and the one-pass dequantization.

- tiled: each program owns a BLOCK_M x BLOCK_N tile of Y and walks the packed byte columns; per step it loads one
  tile of words and, for every segment, decodes its level tile, computes the scale tile B[n_tile] @ A[:, k_tile] with
  one tl.dot (rank padded to a power of two >= 16) and reuses it across the BLOCK_M rows;
- dequantize: writes the dense weight in one pass over the codes (scale tile by tl.dot, as above), so that a long
  prefill can hand the GEMM to cuBLAS. Each program decodes one tile of words and writes its columns in every
  segment.
"""

import torch
import triton
import triton.language as tl

from .autotune import autotune
from .codes import (check_input, layout_args, layout_meta, load_scale_a, load_scale_b, load_words, rank_pad,
                    segment_columns, segment_levels)

# Autotune picks one per (M bucket, N, K, bits).
TILED_CONFIGS = [
    # Small M: narrow N tiles, so that even M = 1 launches enough programs to fill the GPU.
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_J": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_J": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_J": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_J": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_J": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_J": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_J": 64}, num_warps=8, num_stages=3),
    # 3 bits unroll 8 segments a step: these fit its shared memory
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_J": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_J": 32}, num_warps=4, num_stages=1),
]
# Five of 12 (BLOCK_N, BLOCK_J, warps) swept on the H100 (8B and 70B shapes, 2-4 bits): those most often among the
# four fastest.
DEQUANT_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_J": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 64, "BLOCK_J": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 64, "BLOCK_J": 128}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 32, "BLOCK_J": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 128, "BLOCK_J": 64}, num_warps=8, num_stages=1),
]
INTERPRET_TILED = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_J": 32}, num_warps=4, num_stages=1)]
INTERPRET_DEQUANT = [triton.Config({"BLOCK_N": 16, "BLOCK_J": 32}, num_warps=4, num_stages=1)]


def m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


@triton.jit
def _tiled_kernel(
    x_ptr, codes_ptr, codebook_ptr, scale_b_ptr, scale_a_ptr, bias_ptr, y_ptr,
    M, N, K, RANK, SEGMENT, ROW_BYTES,
    stride_xm, stride_xk, stride_ym, stride_yn,
    M_BUCKET,
    BITS: tl.constexpr, SEGMENTS: tl.constexpr, TABLE: tl.constexpr, RANK_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # B rows for this tile stay in registers for the whole loop.
    scale_b = load_scale_b(scale_b_ptr, offs_n, offs_r, N, RANK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, SEGMENT, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        word = load_words(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BITS)
        for segment in tl.static_range(SEGMENTS):
            offs_k, mask_k = segment_columns(offs_j, segment, SEGMENT, K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            scale = tl.dot(scale_b, load_scale_a(scale_a_ptr, offs_r, offs_k, mask_k, K, RANK))
            level = segment_levels(word, codebook_ptr, segment, BITS, TABLE)
            acc += tl.dot(x, tl.trans((scale * level).to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(
    codes_ptr, codebook_ptr, scale_b_ptr, scale_a_ptr, w_ptr,
    N, K, RANK, SEGMENT, ROW_BYTES,
    BITS: tl.constexpr, SEGMENTS: tl.constexpr, TABLE: tl.constexpr, RANK_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_r = tl.arange(0, RANK_PAD)
    # One tile of words and of B serves every segment. A program per segment loads both SEGMENTS times, and its best
    # config took 76.1 us against 70.6 on 14336 x 4096 at 4 bits (H100); a loop over column tiles was no faster.
    scale_b = load_scale_b(scale_b_ptr, offs_n, offs_r, N, RANK)
    word = load_words(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BITS)
    for segment in tl.static_range(SEGMENTS):
        offs_k, mask_k = segment_columns(offs_j, segment, SEGMENT, K)
        scale = tl.dot(scale_b, load_scale_a(scale_a_ptr, offs_r, offs_k, mask_k, K, RANK))
        weight = scale * segment_levels(word, codebook_ptr, segment, BITS, TABLE)
        tl.store(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], weight.to(w_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < N) & mask_k[None, :])


_tiled = autotune(TILED_CONFIGS, INTERPRET_TILED, key=["M_BUCKET", "N", "K", "BITS"])(_tiled_kernel)
_dequantize = autotune(DEQUANT_CONFIGS, INTERPRET_DEQUANT, key=["N", "K", "BITS"])(_dequantize_kernel)


def tiled_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None) -> torch.Tensor:
    """x (..., K) -> (..., N) with the tiled kernel; codes of an (N, K) weight, scales B (N, r), A (r, K)."""
    check_input(x, scale_a)
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    x2 = x.reshape(-1, in_features)
    M = x2.shape[0]
    y = torch.empty(M, out_features, device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"]))

    _tiled[grid](
        x2, codes, codebook.float().contiguous(), scale_b.to(x.dtype).contiguous(),
        scale_a.to(x.dtype).contiguous(), bias if bias is not None else y, y,
        M, out_features, in_features, rank, **layout_args(in_features, bits),
        stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1),
        M_BUCKET=m_bucket(M), RANK_PAD=rank_pad(rank), HAS_BIAS=bias is not None, **layout_meta(bits, codebook),
    )
    return y.reshape(*x.shape[:-1], out_features)


def dequantize(codes, codebook, scale_b, scale_a, bits, dtype=torch.bfloat16) -> torch.Tensor:
    """The dense (N, K) weight (B @ A) * C[codes] in `dtype`, written in one pass over the codes."""
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    weight = torch.empty(out_features, in_features, device=codes.device, dtype=dtype)

    def grid(meta):
        return (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(layout["SEGMENT"], meta["BLOCK_J"]))

    layout = layout_args(in_features, bits)
    _dequantize[grid](
        codes, codebook.float().contiguous(), scale_b.to(dtype).contiguous(), scale_a.to(dtype).contiguous(), weight,
        out_features, in_features, rank, **layout, RANK_PAD=rank_pad(rank), **layout_meta(bits, codebook),
    )
    return weight
