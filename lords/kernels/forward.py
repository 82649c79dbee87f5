"""The tiled LoRDS forward Y = X @ ((B @ A) * C[codes])^T + bias, and the one-pass dequantization.

- tiled: BLOCK_M x BLOCK_N tiles of Y, each walking the packed byte columns; per step a program loads one tile of
  words and, for every segment, decodes its level tile, computes the scale tile B[n_tile] @ A[:, k_tile] with one
  tl.dot (rank padded to a power of two >= 16) and reuses it across the BLOCK_M rows (for a few rows, W_LEFT configs
  compute the tile transposed, Y^T = W X^T, below). As in decode.py, one wave of programs shares the (tile, step)
  work out evenly and partial tiles meet in a float32 workspace (stream_k.py): at small M a grid of one program per
  tile can leave the GPU half idle (4096 x 14336 at M = 16 has 128 tiles of 16 x 32 for 132 multiprocessors; one
  wave took 0.70x the time);
- dequantize: writes the dense weight in one pass over the codes (scale tile by tl.dot, as above), so that a long
  prefill can hand the GEMM to cuBLAS. Each program decodes one tile of words and writes its columns in every
  segment.
"""

import torch
import triton
import triton.language as tl

from .autotune import autotune, cdiv, next_power_of_2, processors
from .codes import (byte_levels, check_input, layout_args, layout_meta, level_lookup, load_bytes, load_planes,
                    load_scale_a, load_scale_b, quad_levels, rank_pad, segment_columns, segment_quad)
from .stream_k import reserve_workspace, store_tile, tile_slot, tile_steps, work_share, workspace

# Autotune picks one per (M bucket, N, K, rank, bits, lookup). PER_SM, programs per multiprocessor, as in decode.py: the
# grid is one wave that shares the (M tile, N tile, K step) work out evenly. PER_SM = 0 is one program per tile, no
# sharing.
TILED_TILES = [
    # Small M: narrow N tiles
    ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_J": 128}, 4, 4, (1,)),
    ({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_J": 128}, 4, 4, (1,)),
    ({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_J": 256}, 4, 3, (1,)),
    ({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_J": 128}, 4, 3, (1,)),
    ({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_J": 32}, 4, 2, (0, 1, 2)),
    ({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_J": 64}, 4, 3, (1, 2)),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_J": 64}, 4, 3, (0, 1)),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_J": 64}, 8, 3, (0, 1)),
    # 3 bits unroll 8 segments a step: these fit its shared memory
    ({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_J": 32}, 4, 1, (0, 1, 2, 4)),
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_J": 32}, 4, 1, (0, 1, 2, 4)),
]
# W_LEFT: the weight tile is the dot's left operand, Y^T = W X^T. The scale tile leaves its tl.dot in the tensor-core
# accumulator layout, which the next wgmma takes as its register operand as it is, so the weight tile never goes
# through shared memory, and at small M the N tile (>= 64) fills the wgmma's rows where BLOCK_M = 16 rows cannot.
W_LEFT_TILES = [
    ({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_J": 32}, 4, 2, (0, 1, 2)),
    ({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_J": 64}, 4, 3, (0, 1, 2)),
    ({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_J": 64}, 4, 3, (0, 2)),
    ({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_J": 64}, 4, 3, (0, 1, 2)),
    ({"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_J": 32}, 8, 2, (0, 1)),
    ({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_J": 32}, 4, 1, (0, 1, 2, 4)),
]
W_LEFT_MAX_ROWS = 32
TILED_CONFIGS = [triton.Config({**tile, "PER_SM": per_sm, "W_LEFT": w_left}, num_warps=warps, num_stages=stages)
                 for w_left, tiles in ((False, TILED_TILES), (True, W_LEFT_TILES))
                 for tile, warps, stages, per_sms in tiles for per_sm in per_sms]
# Five of 12 (BLOCK_N, BLOCK_J, warps) swept on the H100 (8B and 70B shapes, 2-4 bits): those most often among the
# four fastest.
DEQUANT_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_J": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 64, "BLOCK_J": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 64, "BLOCK_J": 128}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 32, "BLOCK_J": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 128, "BLOCK_J": 64}, num_warps=8, num_stages=1),
]
INTERPRET_TILED = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_J": 32, "PER_SM": 3, "W_LEFT": False},
                                 num_warps=4, num_stages=1)]
reserve_workspace(TILED_CONFIGS + INTERPRET_TILED, lambda tile: tile["BLOCK_M"] * tile["BLOCK_N"])
INTERPRET_DEQUANT = [triton.Config({"BLOCK_N": 16, "BLOCK_J": 32}, num_warps=4, num_stages=1)]


def m_bucket(m: int) -> int:
    """The row bucket a tuned config serves."""
    return next_power_of_2(m)


@triton.jit(do_not_specialize=["PER_SM"])
def _tiled_kernel(
    x_ptr, codes_ptr, codebook_ptr, scale_b_ptr, scale_a_ptr, bias_ptr, y_ptr, sums_ptr, counts_ptr,
    M, N, K, RANK, SEGMENT, ROW_BYTES, stride_xm, stride_xk,
    M_BUCKET, PER_SM, LEVEL_SCALE,
    BITS: tl.constexpr, SEGMENTS: tl.constexpr, TABLE: tl.constexpr, BF16_LEVELS: tl.constexpr, RANK_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    W_LEFT: tl.constexpr,
):
    # units: (N tile, M tile, K step), in that order, so that the programs of one N tile read its codes from L2
    steps = tl.cdiv(SEGMENT, BLOCK_J)
    m_tiles = tl.cdiv(M, BLOCK_M)
    units = tl.cdiv(N, BLOCK_N) * m_tiles * steps
    start, end = work_share(units)
    offs_r = tl.arange(0, RANK_PAD)
    for tile in range(start // steps, (end - 1) // steps + 1):
        offs_m = (tile % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (tile // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        first, last = tile_steps(tile, start, end, steps)
        # B rows for this tile stay in registers for the whole loop.
        scale_b = load_scale_b(scale_b_ptr, offs_n, offs_r, N, RANK)
        if W_LEFT:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(first, last):
            offs_j = step * BLOCK_J + tl.arange(0, BLOCK_J)
            # 3-bit codes four bytes at a time (load_planes: 0.82-0.92x the time at M = 16 on the H100); 2- and
            # 4-bit codes byte by byte, in the layout the dots want (byte_levels)
            if BITS == 3:
                quad, quad_mid, quad_high = load_planes(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BITS,
                                                        BLOCK_N, BLOCK_J)
            else:
                byte = load_bytes(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES)
            for segment in tl.static_range(SEGMENTS):
                offs_k, mask_k = segment_columns(offs_j, segment, SEGMENT, K)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                scale = tl.dot(scale_b, load_scale_a(scale_a_ptr, offs_r, offs_k, mask_k, K, RANK))
                if BITS == 3:
                    level = quad_levels(segment_quad(quad, quad_mid, quad_high, segment, BITS), codebook_ptr, TABLE,
                                        BF16_LEVELS, BLOCK_N, BLOCK_J)
                else:
                    level = byte_levels(byte, codebook_ptr, segment, BITS, TABLE, BF16_LEVELS)
                weight = (scale * level).to(x.dtype)
                if W_LEFT:
                    acc += tl.dot(weight, tl.trans(x))
                else:
                    acc += tl.dot(x, tl.trans(weight))
        # the tile of Y as the accumulator holds it: (m, n) indices broadcast along its rows and columns, so that
        # W_LEFT's Y^T tile is stored as it is (no layout conversion)
        if W_LEFT:
            rows, cols = offs_m[None, :], offs_n[:, None]
        else:
            rows, cols = offs_m[:, None], offs_n[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        else:
            bias = 0.0
        slot = tile_slot(tile, steps, units)
        store_tile(acc * LEVEL_SCALE, bias, y_ptr + rows * N + cols, (rows < M) & (cols < N),
                   sums_ptr + slot * (BLOCK_M * BLOCK_N) + rows % BLOCK_M * BLOCK_N + cols % BLOCK_N, counts_ptr + slot,
                   last - first, steps)


@triton.jit
def _dequantize_kernel(
    codes_ptr, codebook_ptr, scale_b_ptr, scale_a_ptr, w_ptr,
    N, K, RANK, SEGMENT, ROW_BYTES, LEVEL_SCALE,
    BITS: tl.constexpr, SEGMENTS: tl.constexpr, TABLE: tl.constexpr, BF16_LEVELS: tl.constexpr, RANK_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_r = tl.arange(0, RANK_PAD)
    # One tile of words and of B serves every segment. A program per segment loads both SEGMENTS times, and its best
    # config took 76.1 us against 70.6 on 14336 x 4096 at 4 bits (H100); a loop over column tiles was no faster.
    scale_b = load_scale_b(scale_b_ptr, offs_n, offs_r, N, RANK)
    quad, quad_mid, quad_high = load_planes(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BITS, BLOCK_N, BLOCK_J)
    for segment in tl.static_range(SEGMENTS):
        offs_k, mask_k = segment_columns(offs_j, segment, SEGMENT, K)
        scale = tl.dot(scale_b, load_scale_a(scale_a_ptr, offs_r, offs_k, mask_k, K, RANK))
        level = quad_levels(segment_quad(quad, quad_mid, quad_high, segment, BITS), codebook_ptr, TABLE, BF16_LEVELS,
                            BLOCK_N, BLOCK_J)
        weight = scale * LEVEL_SCALE * level
        tl.store(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], weight.to(w_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < N) & mask_k[None, :])


def w_left_small_m(configs, named_args, **kwargs):
    """W_LEFT configs for at most W_LEFT_MAX_ROWS rows only: at 64 they took 1.6-1.8x the time of the others (H100),
    and they were checked on the GPU over many calls up to 32 rows."""
    if kwargs["M_BUCKET"] <= W_LEFT_MAX_ROWS:
        return configs
    return [config for config in configs if not config.kwargs["W_LEFT"]]


# The level lookup (TABLE) is in the keys: an integer codebook's short decode has other fastest configs than a table.
_tiled = autotune(TILED_CONFIGS, INTERPRET_TILED, key=["M_BUCKET", "N", "K", "RANK", "BITS", "TABLE"],
                  prune_configs_by={"early_config_prune": w_left_small_m})(_tiled_kernel)
_dequantize = autotune(DEQUANT_CONFIGS, INTERPRET_DEQUANT, key=["N", "K", "RANK", "BITS", "TABLE"])(
    _dequantize_kernel)


def tiled_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None) -> torch.Tensor:
    """x (..., K) -> (..., N) with the tiled kernel; codes of an (N, K) weight, scales B (N, r), A (r, K)."""
    check_input(x, scale_a)
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    x2 = x.reshape(-1, in_features)
    M = x2.shape[0]
    y = torch.empty(M, out_features, device=x.device, dtype=x.dtype)
    layout = layout_args(in_features, bits)
    sums, counts = workspace(x.device)

    def grid(meta):
        tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(out_features, meta["BLOCK_N"])
        if meta["PER_SM"] == 0:
            return (tiles,)
        return (min(tiles * cdiv(layout["SEGMENT"], meta["BLOCK_J"]), processors(x.device) * meta["PER_SM"]),)

    lookup = level_lookup(codebook, form="pairs" if bits != 3 else "quads")
    _tiled[grid](
        x2, codes, lookup.levels, scale_b.to(x.dtype).contiguous(), scale_a.to(x.dtype).contiguous(),
        bias if bias is not None else y, y, sums, counts,
        M, out_features, in_features, rank, **layout, stride_xm=x2.stride(0), stride_xk=x2.stride(1),
        M_BUCKET=m_bucket(M), LEVEL_SCALE=lookup.scale, RANK_PAD=rank_pad(rank), HAS_BIAS=bias is not None,
        **layout_meta(bits, lookup),
    )
    return y.reshape(*x.shape[:-1], out_features)


def dequantize(codes, codebook, scale_b, scale_a, bits, dtype=torch.bfloat16) -> torch.Tensor:
    """The dense (N, K) weight (B @ A) * C[codes] in `dtype`, written in one pass over the codes."""
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    weight = torch.empty(out_features, in_features, device=codes.device, dtype=dtype)

    def grid(meta):
        return (cdiv(out_features, meta["BLOCK_N"]), cdiv(layout["SEGMENT"], meta["BLOCK_J"]))

    layout = layout_args(in_features, bits)
    lookup = level_lookup(codebook)
    _dequantize[grid](
        codes, lookup.levels, scale_b.to(dtype).contiguous(), scale_a.to(dtype).contiguous(), weight,
        out_features, in_features, rank, **layout, LEVEL_SCALE=lookup.scale, RANK_PAD=rank_pad(rank),
        **layout_meta(bits, lookup),
    )
    return weight
