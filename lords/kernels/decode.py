"""LoRDS decode (a few rows of X) in the algebraic form, with the K steps shared out evenly ("stream-K").

    Y[m, n] = sum_k X[m, k] (sum_t B[n, t] A[t, k]) C[n, k] = sum_t B[n, t] * sum_k (X[m, k] A[t, k]) C[n, k]

so the M x K activations become M*r columns X*A[t], and the unscaled level tile (decoded in registers) is the left
operand of one tensor-core tl.dot per segment; B is applied once per output tile at the end. Per weight the
elementwise work is the code decode alone (the tiled kernel also multiplies by the scale tile and re-lays it out for
a second dot); the price is r times the multiply-adds per row of X, which is why this form serves at most MAX_ROWS
rows. Every program re-reads the A tile from L2, so BLOCK_N is large (A traffic / code traffic = 4 * RANK_PAD /
BLOCK_N at 4 bits), and the K steps of a tile are shared by several programs so that the GPU still fills; the partial
sums meet in a float32 workspace (stream_k.py).
"""

import torch
import triton
import triton.language as tl

from .autotune import autotune, cdiv, next_power_of_2, processors
from .codes import (check_input, layout_args, layout_meta, level_lookup, load_planes, load_scale_a, load_scale_b,
                    quad_levels, rank_pad, segment_columns, segment_quad)
from .stream_k import reserve_workspace, store_tile, tile_slot, tile_steps, work_share, workspace

MAX_ROWS = 4
# PER_SM: programs per multiprocessor. The grid is one wave of programs (at most as many as fit on the GPU at once)
# that split the (N tile, K step) work evenly, "stream-K": a grid of (N tiles, K splits) left a partial second wave
# (ncu, H100, 14336 x 4096), and one wave took 0.84-0.99x its time at M = 1. How many programs fit depends on the
# registers the config compiles to, so autotuning picks it.
TILES = [
    ({"BLOCK_N": 128, "BLOCK_J": 32}, 4, 3, (1, 2, 3, 4)),
    ({"BLOCK_N": 128, "BLOCK_J": 64}, 4, 3, (1, 2)),
    ({"BLOCK_N": 128, "BLOCK_J": 64}, 8, 3, (2,)),
    ({"BLOCK_N": 256, "BLOCK_J": 64}, 8, 2, (1, 2)),
    ({"BLOCK_N": 64, "BLOCK_J": 64}, 4, 4, (2, 3, 4)),
    # 3 bits unroll 8 segments a step: these small ones fit its shared memory
    ({"BLOCK_N": 64, "BLOCK_J": 32}, 4, 2, (2, 4)),
    ({"BLOCK_N": 128, "BLOCK_J": 16}, 4, 1, (2, 3, 4)),
]
CONFIGS = [triton.Config({**tile, "PER_SM": per_sm}, num_warps=warps, num_stages=stages)
           for tile, warps, stages, per_sms in TILES for per_sm in per_sms]
INTERPRET_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_J": 16, "PER_SM": 3}, num_warps=4, num_stages=1)]
reserve_workspace(CONFIGS + INTERPRET_CONFIGS, lambda tile: tile["BLOCK_N"] * MAX_ROWS)


MAX_VALUES = 128  # accumulator or X*A values a thread holds before a config spills


def values_per_thread(config, m_pad: int, rank_pad: int) -> float:
    """Values of the (BLOCK_N, M*r) accumulator or the (M*r, BLOCK_J) X*A tile, whichever is larger, per thread."""
    return m_pad * rank_pad * max(config.kwargs["BLOCK_N"], config.kwargs["BLOCK_J"]) / (32 * config.num_warps)


def fits_registers(configs, named_args, **kwargs):
    """Drop configs that would hold more than MAX_VALUES values a thread: they spill, and compile for minutes. The
    smallest tile always stays, so that a direct call still runs."""
    per_thread = [values_per_thread(config, kwargs["M_PAD"], kwargs["RANK_PAD"]) for config in configs]
    limit = MAX_VALUES if any(values <= MAX_VALUES for values in per_thread) else min(per_thread)
    return [config for config, values in zip(configs, per_thread) if values <= limit]


def spills(rows: int, rank: int) -> bool:
    """Every config would spill at this many rows and this rank (28672 x 8192 at b = 64, rank 99, at 4 rows, as at 3:
    2.9 ms on the H100 against 0.25 ms for the tiled kernel)."""
    return all(values_per_thread(config, next_power_of_2(rows), rank_pad(rank)) > MAX_VALUES for config in CONFIGS)


@triton.jit(do_not_specialize=["PER_SM", "GROUPS"])  # one binary for every PER_SM and group count
def _decode_kernel(
    x_ptr, xa_ptr, codes_ptr, codebook_ptr, scale_b_ptr, scale_a_ptr, bias_ptr, y_ptr, sums_ptr, counts_ptr,
    expert_ptr, M, N, K, RANK, SEGMENT, ROW_BYTES, stride_xm, GROUPS, PER_SM, LEVEL_SCALE,
    BITS: tl.constexpr, SEGMENTS: tl.constexpr, TABLE: tl.constexpr, BF16_LEVELS: tl.constexpr, RANK_PAD: tl.constexpr,
    M_PAD: tl.constexpr, XA_ONCE: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # the work is groups x n_tiles x steps units, N tile major; this program takes an equal, contiguous share of them,
    # which may end in one tile and go on in the next (PER_SM only sizes the grid). GROUPED: group g is M rows of x
    # and y times the matrix expert_ptr[g] of the stacked codes and scales (mixture-of-experts decoding)
    steps = tl.cdiv(SEGMENT, BLOCK_J)
    n_tiles = tl.cdiv(N, BLOCK_N)
    units = GROUPS * n_tiles * steps
    start, end = work_share(units)
    offs_m = tl.arange(0, M_PAD)
    offs_r = tl.arange(0, RANK_PAD)
    # XA_ONCE: the rows (m, t) of the call's X*A, an (M * RANK, K) matrix, in the accumulator's column order
    xa_rows = (offs_m[:, None] * RANK + offs_r[None, :]).reshape(M_PAD * RANK_PAD)
    xa_mask = ((offs_m[:, None] < M) & (offs_r[None, :] < RANK)).reshape(M_PAD * RANK_PAD)
    for tile in range(start // steps, (end - 1) // steps + 1):
        group = tile // n_tiles
        offs_n = (tile - group * n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        codes, scale_a_tile, scale_b_tile, x_rows, y_rows = codes_ptr, scale_a_ptr, scale_b_ptr, x_ptr, y_ptr
        if GROUPED:
            expert = tl.load(expert_ptr + group).to(tl.int64)
            codes += expert * N * ROW_BYTES
            scale_a_tile += expert * RANK * K
            scale_b_tile += expert * N * RANK
            x_rows += group.to(tl.int64) * M * stride_xm
            y_rows += group.to(tl.int64) * M * N
        first, last = tile_steps(tile, start, end, steps)
        acc = tl.zeros((BLOCK_N, M_PAD * RANK_PAD), dtype=tl.float32)
        for step in range(first, last):
            offs_j = step * BLOCK_J + tl.arange(0, BLOCK_J)
            quad, quad_mid, quad_high = load_planes(codes, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BITS, BLOCK_N,
                                                    BLOCK_J)
            for segment in tl.static_range(SEGMENTS):
                offs_k, mask_k = segment_columns(offs_j, segment, SEGMENT, K)
                if XA_ONCE:
                    xa = tl.load(xa_ptr + xa_rows[:, None] * K + offs_k[None, :],
                                 mask=xa_mask[:, None] & mask_k[None, :], other=0.0)
                else:
                    x = tl.load(x_rows + offs_m[:, None] * stride_xm + offs_k[None, :],
                                mask=(offs_m[:, None] < M) & mask_k[None, :], other=0.0).to(tl.float32)
                    scale_a = load_scale_a(scale_a_tile, offs_r, offs_k, mask_k, K, RANK).to(tl.float32)
                    if M_PAD == 1:
                        xa = scale_a * x
                    else:
                        # rows ordered (m, t), matching the accumulator's columns
                        xa = (x[:, None, :] * scale_a[None, :, :]).reshape(M_PAD * RANK_PAD, BLOCK_J)
                level = quad_levels(segment_quad(quad, quad_mid, quad_high, segment, BITS), codebook_ptr, TABLE,
                                    BF16_LEVELS, BLOCK_N, BLOCK_J)
                acc += tl.dot(level.to(x_ptr.dtype.element_ty), tl.trans(xa.to(x_ptr.dtype.element_ty)))
        scale_b = load_scale_b(scale_b_tile, offs_n, offs_r, N, RANK).to(tl.float32) * LEVEL_SCALE
        y = tl.sum(acc.reshape(BLOCK_N, M_PAD, RANK_PAD) * scale_b[:, None, :], axis=2)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        else:
            bias = 0.0
        slot = tile_slot(tile, steps, units)
        store_tile(y, bias, y_rows + offs_m[None, :] * N + offs_n[:, None], mask_n[:, None] & (offs_m[None, :] < M),
                   sums_ptr + slot * (BLOCK_N * M_PAD) + tl.arange(0, BLOCK_N)[:, None] * M_PAD + offs_m[None, :],
                   counts_ptr + slot, last - first, steps)


_decode = autotune(
    # the level lookup in the key: an integer codebook's (no table) fastest config is not a table's (H100: 41 against 32
    # us at M = 1 on 14336 x 4096 with the config tuned for NF)
    CONFIGS, INTERPRET_CONFIGS, key=["M", "N", "K", "RANK", "BITS", "TABLE", "XA_ONCE", "GROUPED"],
    prune_configs_by={"early_config_prune": fits_registers},
)(_decode_kernel)


def decode_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None, xa_once: bool = False) -> torch.Tensor:
    """x (..., K) -> (..., N) for a handful of rows; packed codes of an (N, K) weight, scales B (N, r), A (r, K).

    xa_once: X*A is computed once for the call, by torch, and the programs load its tiles, instead of each program
    multiplying the X and A tiles of its steps. The kernel then issues fewer instructions per weight (8.5 -> 6.9 in
    the SASS) for one more small kernel a call: faster on the 8B MLP shapes, slower on 4096 x 4096 (README), so
    lords_matmul times both."""
    check_input(x, scale_a)
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"the decode kernel takes at most {MAX_ROWS} rows (its cost grows as rows x rank), got {M}")
    y = torch.empty(M, out_features, device=x.device, dtype=x.dtype)
    sums, counts = workspace(x.device)
    # rounded to x's dtype from the float32 product, as the kernel rounds its own X*A tiles for tl.dot
    xa = (x2[:, None, :] * scale_a.detach()).to(x.dtype) if xa_once else y

    def grid(meta):
        units = cdiv(out_features, meta["BLOCK_N"]) * cdiv(layout["SEGMENT"], meta["BLOCK_J"])
        return (min(units, processors(x.device) * meta["PER_SM"]),)

    layout = layout_args(in_features, bits)
    # the levels go straight into tl.dot: the lookup gives them in its operand type
    lookup = level_lookup(codebook, x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16)

    _decode[grid](
        x2, xa, codes, lookup.levels, scale_b.contiguous(), scale_a.contiguous(), bias if bias is not None else y, y,
        sums, counts, y, M, out_features, in_features, rank, **layout, stride_xm=x2.stride(0), GROUPS=1,
        LEVEL_SCALE=lookup.scale, RANK_PAD=rank_pad(rank), M_PAD=next_power_of_2(M), XA_ONCE=xa_once,
        HAS_BIAS=bias is not None, GROUPED=False, **layout_meta(bits, lookup),
    )
    return y.reshape(*x.shape[:-1], out_features)


def grouped_decode_matmul(x, experts, codes, codebook, scale_b, scale_a, bits) -> torch.Tensor:
    """Row g of x (G, K) times matrix experts[g] of a stack: packed codes (E, N, bytes), scales B (E, N, r) and
    A (E, r, K) -> (G, N). One launch for every row, with no host synchronisation, and only the matrices named in
    experts are read: mixture-of-experts decoding, where a few tokens each go to their top-k experts. experts must
    lie in [0, E)."""
    check_input(x, scale_a[0])
    (_, out_features, rank), in_features = scale_b.shape, scale_a.shape[2]
    if x.dim() != 2 or experts.shape != (x.shape[0],):
        raise ValueError(f"grouped decoding takes rows (G, K) and one expert index per row, got {tuple(x.shape)} "
                         f"and {tuple(experts.shape)}")
    x = x.contiguous()
    groups = x.shape[0]
    y = torch.empty(groups, out_features, device=x.device, dtype=x.dtype)
    if groups == 0:
        return y
    sums, counts = workspace(x.device)
    layout = layout_args(in_features, bits)
    lookup = level_lookup(codebook, x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16)

    def grid(meta):
        units = groups * cdiv(out_features, meta["BLOCK_N"]) * cdiv(layout["SEGMENT"], meta["BLOCK_J"])
        return (min(units, processors(x.device) * meta["PER_SM"]),)

    _decode[grid](
        x, y, codes.contiguous(), lookup.levels, scale_b.contiguous(), scale_a.contiguous(), y, y, sums, counts,
        experts.to(torch.int32).contiguous(), 1, out_features, in_features, rank, **layout, stride_xm=x.stride(0),
        GROUPS=groups, LEVEL_SCALE=lookup.scale, RANK_PAD=rank_pad(rank), M_PAD=1, XA_ONCE=False, HAS_BIAS=False,
        GROUPED=True, **layout_meta(bits, lookup),
    )
    return y
