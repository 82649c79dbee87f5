"""The tiled LoRDS forward Y = X @ ((B @ A) * C[codes])^T + bias, and the one-pass dequantization.

- tiled: BLOCK_M x BLOCK_N tiles of Y, each walking the packed byte columns; per step a program loads one tile of
  words and, for every segment, decodes its level tile, computes the scale tile B[n_tile] @ A[:, k_tile] with one
  tl.dot (rank padded to a power of two >= 16) and reuses it across the BLOCK_M rows (for a few rows, W_LEFT configs
  compute the tile transposed, Y^T = W X^T, below). As in decode.py, one wave of programs shares the (tile, step)
  work out evenly and partial tiles meet in a float32 workspace (stream_k.py): at small M a grid of one program per
  tile can leave the GPU half idle (4096 x 14336 at M = 16 has 128 tiles of 16 x 32 for 132 multiprocessors; one
  wave took 0.70x the time);
- grouped (GROUPED): the tiled kernel over the (token, expert) pairs of a mixture-of-experts layer sorted by
  expert, each M tile some tokens of one expert of a stack (grouped_tiled_matmul): one launch reads each expert's
  codes once per M tile of its tokens, as vLLM's fused_moe kernel does with its sorted_token_ids and expert_ids;
- dequantize: writes the dense weight in one pass over the codes (scale tile by tl.dot, as above), so that a long
  prefill can hand the GEMM to cuBLAS. Each program decodes one tile of words and writes its columns in every
  segment.
"""

import torch
import triton
import triton.language as tl

from .autotune import autotune, cdiv, next_power_of_2, processors
from .codes import (byte_levels, check_grouped_input, check_input, layout_args, layout_meta, level_lookup, load_bytes,
                    load_planes, load_scale_a, load_scale_b, quad_levels, rank_pad, segment_columns, segment_quad)
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
    pairs_ptr, expert_ptr, M, N, K, RANK, SEGMENT, ROW_BYTES, stride_xm, stride_xk,
    M_BUCKET, PER_SM, LEVEL_SCALE, TOP_K,
    BITS: tl.constexpr, SEGMENTS: tl.constexpr, TABLE: tl.constexpr, BF16_LEVELS: tl.constexpr, RANK_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr, W_LEFT: tl.constexpr,
):
    # units: (N tile, M tile, K step), in that order, so that the programs of one N tile read its codes from L2.
    # GROUPED (mixture-of-experts prefill): the M rows are (row, expert) pairs sorted by expert, each expert's run
    # padded so that every M tile lies in one run (sort_by_expert): row i is pair pairs_ptr[i] (-1 for padding),
    # which reads row pair // TOP_K of x, multiplies it by the matrix expert_ptr[pair] of the stacked codes and
    # scales, and writes row pair of y. A tile of padding only is skipped.
    steps = tl.cdiv(SEGMENT, BLOCK_J)
    m_tiles = tl.cdiv(M, BLOCK_M)
    units = tl.cdiv(N, BLOCK_N) * m_tiles * steps
    start, end = work_share(units)
    offs_r = tl.arange(0, RANK_PAD)
    for tile in range(start // steps, (end - 1) // steps + 1):
        offs_m = (tile % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (tile // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        codes, scale_b_tile, scale_a_tile = codes_ptr, scale_b_ptr, scale_a_ptr
        if GROUPED:
            pairs = tl.load(pairs_ptr + offs_m, mask=offs_m < M, other=-1)
            x_rows, y_rows, mask_m = pairs // TOP_K, pairs, pairs >= 0
            first_pair = tl.load(pairs_ptr + (tile % m_tiles) * BLOCK_M)
            live = first_pair >= 0  # padding comes after an expert's pairs: a tile that starts in it holds none
            expert = tl.load(expert_ptr + tl.maximum(first_pair, 0)).to(tl.int64)
            codes += expert * N * ROW_BYTES
            scale_b_tile += expert * N * RANK
            scale_a_tile += expert * RANK * K
        else:
            x_rows, y_rows, mask_m = offs_m, offs_m, offs_m < M
            live = True
        if live:
            first, last = tile_steps(tile, start, end, steps)
            # B rows for this tile stay in registers for the whole loop.
            scale_b = load_scale_b(scale_b_tile, offs_n, offs_r, N, RANK)
            if W_LEFT:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for step in range(first, last):
                offs_j = step * BLOCK_J + tl.arange(0, BLOCK_J)
                # 3-bit codes four bytes at a time (load_planes: 0.82-0.92x the time at M = 16 on the H100); 2- and
                # 4-bit codes byte by byte, in the layout the dots want (byte_levels)
                if BITS == 3:
                    quad, quad_mid, quad_high = load_planes(codes, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BITS,
                                                            BLOCK_N, BLOCK_J)
                else:
                    byte = load_bytes(codes, offs_n, offs_j, N, SEGMENT, ROW_BYTES)
                for segment in tl.static_range(SEGMENTS):
                    offs_k, mask_k = segment_columns(offs_j, segment, SEGMENT, K)
                    x = tl.load(x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    scale = tl.dot(scale_b, load_scale_a(scale_a_tile, offs_r, offs_k, mask_k, K, RANK))
                    if BITS == 3:
                        level = quad_levels(segment_quad(quad, quad_mid, quad_high, segment, BITS), codebook_ptr,
                                            TABLE, BF16_LEVELS, BLOCK_N, BLOCK_J)
                    else:
                        level = byte_levels(byte, codebook_ptr, segment, BITS, TABLE, BF16_LEVELS)
                    weight = (scale * level).to(x.dtype)
                    if W_LEFT:
                        acc += tl.dot(weight, tl.trans(x))
                    else:
                        acc += tl.dot(x, tl.trans(weight))
            # the tile of Y as the accumulator holds it: (m, n) indices broadcast along its rows and columns, so that
            # W_LEFT's Y^T tile is stored as it is (no layout conversion); its workspace slot is laid out by the
            # tile's own rows
            tile_rows = tl.arange(0, BLOCK_M)
            if W_LEFT:
                rows, cols, in_tile, mask = y_rows[None, :], offs_n[:, None], tile_rows[None, :], mask_m[None, :]
            else:
                rows, cols, in_tile, mask = y_rows[:, None], offs_n[None, :], tile_rows[:, None], mask_m[:, None]
            if HAS_BIAS:
                bias = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
            else:
                bias = 0.0
            slot = tile_slot(tile, steps, units)
            store_tile(acc * LEVEL_SCALE, bias, y_ptr + rows * N + cols, mask & (cols < N),
                       sums_ptr + slot * (BLOCK_M * BLOCK_N) + in_tile * BLOCK_N + cols % BLOCK_N, counts_ptr + slot,
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
_tiled = autotune(TILED_CONFIGS, INTERPRET_TILED, key=["M_BUCKET", "N", "K", "RANK", "BITS", "TABLE", "GROUPED"],
                  prune_configs_by={"early_config_prune": w_left_small_m})(_tiled_kernel)
_dequantize = autotune(DEQUANT_CONFIGS, INTERPRET_DEQUANT, key=["N", "K", "RANK", "BITS", "TABLE"])(
    _dequantize_kernel)
# sort_by_expert pads each expert's run of pairs to a multiple of the largest BLOCK_M autotuning may pick; every
# BLOCK_M is a power of two, so each M tile of any config lies in one run. Padding costs no work beyond the last
# M tile of a run that holds pairs: a tile of padding only is skipped.
GROUPED_PAD_ROWS = max(config.kwargs["BLOCK_M"] for config in _tiled.autotuner.configs)


def _launch_tiled(x2, y, rows, codes, codebook, scale_b, scale_a, bits, bias=None, pairs=None, experts=None,
                  top_k=1) -> None:
    """The tiled kernel over `rows` rows into y; grouped when `pairs` (sort_by_expert) and the pairs' experts are
    given."""
    (out_features, rank), in_features = scale_b.shape[-2:], scale_a.shape[-1]
    layout = layout_args(in_features, bits)
    sums, counts = workspace(x2.device)

    def grid(meta):
        tiles = cdiv(rows, meta["BLOCK_M"]) * cdiv(out_features, meta["BLOCK_N"])
        if meta["PER_SM"] == 0:
            return (tiles,)
        return (min(tiles * cdiv(layout["SEGMENT"], meta["BLOCK_J"]), processors(x2.device) * meta["PER_SM"]),)

    lookup = level_lookup(codebook, form="pairs" if bits != 3 else "quads")
    _tiled[grid](
        x2, codes, lookup.levels, scale_b.to(x2.dtype).contiguous(), scale_a.to(x2.dtype).contiguous(),
        bias if bias is not None else y, y, sums, counts, y if pairs is None else pairs,
        y if experts is None else experts, rows, out_features, in_features, rank, **layout,
        stride_xm=x2.stride(0), stride_xk=x2.stride(1), M_BUCKET=m_bucket(rows), LEVEL_SCALE=lookup.scale,
        TOP_K=top_k, RANK_PAD=rank_pad(rank), HAS_BIAS=bias is not None, GROUPED=pairs is not None,
        **layout_meta(bits, lookup),
    )


def tiled_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None) -> torch.Tensor:
    """x (..., K) -> (..., N) with the tiled kernel; codes of an (N, K) weight, scales B (N, r), A (r, K)."""
    check_input(x, scale_a)
    out_features, in_features = scale_b.shape[0], scale_a.shape[1]
    x2 = x.reshape(-1, in_features)
    y = torch.empty(x2.shape[0], out_features, device=x.device, dtype=x.dtype)
    _launch_tiled(x2, y, x2.shape[0], codes, codebook, scale_b, scale_a, bits, bias)
    return y.reshape(*x.shape[:-1], out_features)


def sort_by_expert(experts: torch.Tensor, num_experts: int, pad_rows: int) -> torch.Tensor:
    """The rows of a grouped tiled launch for pairs routed to experts (P,) in [0, num_experts): the pair indices
    grouped by expert (ascending, each expert's pairs in their order), each expert's run padded with -1 to a multiple
    of pad_rows. The buffer is as long as any routing of P pairs may need, P + min(P, num_experts) * (pad_rows - 1),
    -1 past the last run: its length follows from shapes alone, so nothing waits for the GPU to learn the routing (a
    CUDA graph can capture it)."""
    pairs = experts.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=experts.device)
    counts.index_add_(0, experts, torch.ones_like(experts, dtype=torch.int64))
    padded = (counts + pad_rows - 1) // pad_rows * pad_rows
    order = torch.sort(experts, stable=True).indices
    by_expert = experts[order]
    # the sorted pair i, the n-th of its expert's, goes to row n of that expert's padded run
    rank_in_run = torch.arange(pairs, device=experts.device) - (counts.cumsum(0) - counts)[by_expert]
    slots = (padded.cumsum(0) - padded)[by_expert] + rank_in_run
    rows = torch.full((pairs + min(pairs, num_experts) * (pad_rows - 1),), -1, dtype=torch.int32,
                      device=experts.device)
    return rows.index_copy_(0, slots, order.to(torch.int32))


def grouped_tiled_matmul(x, experts, codes, codebook, scale_b, scale_a, bits, pairs=None) -> torch.Tensor:
    """x (T, K) and experts (T, k) in [0, E) -> (T, k, N): y[t, j] = x[t] times matrix experts[t, j] of a stack
    (packed codes (E, N, bytes), scales B (E, N, r), A (E, r, K)). One launch of the tiled kernel over the (token,
    expert) pairs sorted by expert (sort_by_expert), so that each M tile is some tokens of one expert and its codes
    are read once per tile: mixture-of-experts prefill, without a copy of x per pair and without the host learning
    which experts were hit."""
    check_grouped_input(x, experts, scale_a)
    tokens, top_k = experts.shape
    out_features = scale_b.shape[1]
    y = torch.empty(tokens * top_k, out_features, device=x.device, dtype=x.dtype)
    if y.numel() > 0:
        if pairs is None:  # the caller may have sorted this routing already (lords.kernels.route_pairs)
            pairs = sort_by_expert(experts.reshape(-1), scale_b.shape[0], GROUPED_PAD_ROWS)
        _launch_tiled(x, y, pairs.numel(), codes.contiguous(), codebook, scale_b, scale_a, bits, pairs=pairs,
                      experts=experts.contiguous(), top_k=top_k)
    return y.view(tokens, top_k, out_features)


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
