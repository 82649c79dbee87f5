"""Fused LoRDS forward: Y = X @ ((B @ A) * C[codes])^T + bias, without materialising the dense weight.

Each program owns a BLOCK_M x BLOCK_N tile of Y and walks K in BLOCK_K steps. Per step it decodes a BLOCK_N x BLOCK_K
tile of packed codes through the codebook, computes the matching scale tile B[n_tile] @ A[:, k_tile] with one small
tl.dot (rank padded to a power of two >= 16) and multiplies; the scale tile costs ~rank/BLOCK_M of the main product.

Codes use lords.packing's layout (row-major, 8 codes in `bits` bytes, little-endian). When every row starts on a byte
(2 and 4 bits, K divisible by 4 or 2) a tile of bytes is loaded and split with shifts; otherwise (3 bits) each code
is gathered from the two bytes that can hold it.
"""

import os

import torch
import triton
import triton.language as tl

# Autotune picks one per (M bucket, N, K, bits).
CONFIGS = [
    # Small M: narrow N tiles, so that even M = 1 launches enough programs to fill the GPU.
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
INTERPRET_CONFIG = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]


def _m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


@triton.jit
def _lords_forward_kernel(
    x_ptr, codes_ptr, codebook_ptr, scale_b_ptr, scale_a_ptr, bias_ptr, y_ptr,
    M, N, K, RANK,
    stride_xm, stride_xk, stride_ym, stride_yn,
    M_BUCKET,
    BITS: tl.constexpr, ROW_ALIGNED: tl.constexpr, RANK_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # B rows for this tile stay in registers for the whole K loop.
    scale_b = tl.load(
        scale_b_ptr + offs_n[:, None] * RANK + offs_r[None, :],
        mask=mask_n[:, None] & (offs_r[None, :] < RANK), other=0.0,
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        scale_a = tl.load(scale_a_ptr + offs_r[:, None] * K + offs_k[None, :],
                          mask=(offs_r[:, None] < RANK) & mask_k[None, :], other=0.0)
        scale = tl.dot(scale_b, scale_a)  # (BLOCK_N, BLOCK_K) in fp32
        tile_mask = mask_n[:, None] & mask_k[None, :]
        if ROW_ALIGNED:
            # 2- and 4-bit codes of a row start on a byte: load the byte tile once, split it with shifts.
            per_byte: tl.constexpr = 8 // BITS
            row_bytes = K // per_byte
            offs_b = k0 // per_byte + tl.arange(0, BLOCK_K // per_byte)
            packed = tl.load(codes_ptr + offs_n[:, None].to(tl.int64) * row_bytes + offs_b[None, :],
                             mask=mask_n[:, None] & (offs_b[None, :] < row_bytes), other=0).to(tl.int32)
            if BITS == 4:
                code = tl.join(packed & 15, packed >> 4).reshape(BLOCK_N, BLOCK_K)
            else:
                code = tl.join(tl.join(packed & 3, (packed >> 4) & 3), tl.join((packed >> 2) & 3, (packed >> 6) & 3))
                code = code.reshape(BLOCK_N, BLOCK_K)
        else:
            # 3-bit (or a row not starting on a byte): each code from the two bytes that can hold it.
            index = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
            bit = (index % 8) * BITS
            byte = (index // 8) * BITS + bit // 8
            low = tl.load(codes_ptr + byte, mask=tile_mask, other=0).to(tl.int32)
            high = tl.load(codes_ptr + byte + 1, mask=tile_mask & ((bit % 8) + BITS > 8), other=0).to(tl.int32)
            code = ((low | (high << 8)) >> (bit % 8)) & ((1 << BITS) - 1)
        level = tl.load(codebook_ptr + code, mask=tile_mask, other=0.0)
        weight = (scale * level).to(x.dtype)
        acc += tl.dot(x, tl.trans(weight))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# The interpreter (TRITON_INTERPRET=1, CPU tests) runs one small config; the GPU autotunes over CONFIGS.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_forward = triton.autotune(configs=INTERPRET_CONFIG if _INTERPRET else CONFIGS, key=["M_BUCKET", "N", "K", "BITS"])(
    _lords_forward_kernel
)


def lords_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    scale_b: torch.Tensor,
    scale_a: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) -> (..., N) for packed codes of an (N, K) weight; scales B (N, r), A (r, K)."""
    out_features, rank = scale_b.shape
    in_features = scale_a.shape[1]
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    x2 = x.reshape(-1, in_features)
    y = torch.empty(x2.shape[0], out_features, device=x.device, dtype=x.dtype)
    scale_b = scale_b.to(x.dtype).contiguous()
    scale_a = scale_a.to(x.dtype).contiguous()
    codebook = codebook.to(torch.float32).contiguous()
    rank_pad = max(16, triton.next_power_of_2(rank))
    M = x2.shape[0]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"]))

    _forward[grid](
        x2, codes, codebook, scale_b, scale_a, bias if bias is not None else y, y,
        M, out_features, in_features, rank,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        _m_bucket(M),
        BITS=bits, ROW_ALIGNED=bits != 3 and in_features % (8 // bits) == 0, RANK_PAD=rank_pad,
        HAS_BIAS=bias is not None,
    )
    return y.reshape(*x.shape[:-1], out_features)
