"""Gradients of the LoRDS scales without an n x m tensor in memory.

With W = (B @ A) * C[codes] and G = dY^T X (the dense weight gradient), dL/dB = (G * C[codes]) A^T and
dL/dA = B^T (G * C[codes]). Each program owns a BLOCK_N x BLOCK_J tile of one code segment: it builds that tile of
G with a tl.dot loop over the rows of dY and X, multiplies by the decoded levels, and adds its share of dB
(BLOCK_N x r) and dA (r x BLOCK_J) into float32 outputs with atomic adds. G never leaves registers. (dX = dY @ W
is a forward product on the transposed problem and is served by the dequantize + cuBLAS path.)
"""

import torch
import triton
import triton.language as tl

from .autotune import autotune, cdiv
from ..packing import SEGMENTS
from .codes import (layout_args, layout_meta, level_lookup, load_planes, load_scale_a, load_scale_b, quad_levels,
                    rank_pad, segment_columns, segment_quad)

CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_J": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_J": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_J": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_J": 128}, num_warps=8, num_stages=3),
]
INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_J": 32}, num_warps=4, num_stages=1)]


@triton.jit
def _scale_grad_kernel(
    dy_ptr, x_ptr, codes_ptr, codebook_ptr, scale_b_ptr, scale_a_ptr, grad_b_ptr, grad_a_ptr,
    M, N, K, RANK, SEGMENT, ROW_BYTES, stride_dym, stride_xm, LEVEL_SCALE,
    BITS: tl.constexpr, SEGMENTS: tl.constexpr, TABLE: tl.constexpr, BF16_LEVELS: tl.constexpr, RANK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    segment = tl.program_id(2)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k, mask_k = segment_columns(offs_j, segment, SEGMENT, K)
    offs_r = tl.arange(0, RANK_PAD)
    mask_n = offs_n < N
    grad_w = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        grad_w += tl.dot(tl.trans(dy), x)
    quad, quad_mid, quad_high = load_planes(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BITS, BLOCK_N, BLOCK_J)
    level = quad_levels(segment_quad(quad, quad_mid, quad_high, segment, BITS), codebook_ptr, TABLE, BF16_LEVELS,
                        BLOCK_N, BLOCK_J)
    grad_scale = grad_w * (level * LEVEL_SCALE)
    mask_r = offs_r < RANK
    scale_a = load_scale_a(scale_a_ptr, offs_r, offs_k, mask_k, K, RANK).to(tl.float32)
    scale_b = load_scale_b(scale_b_ptr, offs_n, offs_r, N, RANK).to(tl.float32)
    tl.atomic_add(grad_b_ptr + offs_n[:, None] * RANK + offs_r[None, :], tl.dot(grad_scale, tl.trans(scale_a)),
                  mask=mask_n[:, None] & mask_r[None, :])
    tl.atomic_add(grad_a_ptr + offs_r[:, None] * K + offs_k[None, :], tl.dot(tl.trans(scale_b), grad_scale),
                  mask=mask_r[:, None] & mask_k[None, :])


_scale_grad = autotune(CONFIGS, INTERPRET_CONFIGS, key=["N", "K", "RANK", "BITS", "TABLE"],
                       reset_to_zero=["grad_b_ptr", "grad_a_ptr"])(_scale_grad_kernel)


def scale_grads(grad_out, x, codes, codebook, scale_b, scale_a, bits) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dB, dL/dA) in float32 for Y = X @ ((B @ A) * C[codes])^T; grad_out (..., N), x (..., K)."""
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    dy = grad_out.reshape(-1, out_features)
    x2 = x.reshape(-1, in_features).to(dy.dtype)
    dy, x2 = (t if t.stride(1) == 1 else t.contiguous() for t in (dy, x2))
    grad_b = torch.zeros(out_features, rank, device=x.device, dtype=torch.float32)
    grad_a = torch.zeros(rank, in_features, device=x.device, dtype=torch.float32)

    def grid(meta):
        return (cdiv(out_features, meta["BLOCK_N"]), cdiv(layout["SEGMENT"], meta["BLOCK_J"]),
                SEGMENTS[bits])

    layout = layout_args(in_features, bits)
    lookup = level_lookup(codebook)
    _scale_grad[grid](
        dy, x2, codes, lookup.levels, scale_b.contiguous(), scale_a.contiguous(), grad_b, grad_a,
        dy.shape[0], out_features, in_features, rank, **layout, stride_dym=dy.stride(0), stride_xm=x2.stride(0),
        LEVEL_SCALE=lookup.scale, RANK_PAD=rank_pad(rank), **layout_meta(bits, lookup),
    )
    return grad_b, grad_a
