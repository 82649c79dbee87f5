"""One row of X times a 4-bit LoRDS weight on Hopper (sm_90), in Gluon: wgmma with the decoded levels in registers.

    y[n] = sum_t B[n, t] * Z[n, t],   Z[n, t] = sum_k C[codes[n, k]] (x[k] A[t, k])

Z is a (rows x K) @ (K x RANK_PAD) tensor-core product. Its left operand, the levels, is decoded in registers in
the layout wgmma takes them from; its right operand, X*A, is formed once per program for the program's range of K
and kept in shared memory. B is applied once per output tile at the end.

Element order: the K order inside a step is free as long as both operands follow it, so each thread loads its codes
as two contiguous 8-byte words (byte columns 8 t ... 8 t + 7 of its two rows, t its lane's place in its quad), and
the lookup's eight outputs per word land, with no move between threads, in operand column
16 (2 wi + nibble) + 8 h + 2 t + e for byte 4 wi + 2 h + e of the word pair and the nibble (segment) it holds. The
columns of X*A are permuted to match when the program forms them.

Work: the K steps (32 byte columns: 32 weights of each of the two segments, packing.py) are cut into ranges of
STEPS_PER_RANGE steps, and each range's (row tile, step) units are shared out evenly over the programs given to it.
A program brings its range of A in by TMA, multiplies it by x into X*A in place the first time it meets each step,
and streams its codes from global memory straight into registers, eight steps ahead: no shared-memory ring and no
barrier in the main loop. Partial row sums meet in the stream-K workspace, and the program whose steps complete a row
tile writes it (as stream_k.py's store_tile does), counting its steps for all its tiles at its end in one round.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_N = 128  # rows per tile: two warpgroups of 64
BLOCK_J = 32  # byte columns per K step
SHARED_BYTES = 200 * 1024  # of an H100/H200 block's 227 KB: X*A of the range and x, the rest the compiler's
MAX_RANK = 128
MAX_PIECES = 16  # row tiles one program's share may touch (steps_per_range keeps to it)


@gluon.jit
def _load_words(codes_ptr, unit, first_step, valid, N, SEGMENT, STEPS: gl.constexpr, layout: gl.constexpr):
    """The (rows, 8) int32 words of a unit's code tile: word 2 t + wi of a row is its byte columns 8 t + 4 wi ..."""
    rows = unit // STEPS * layout.shape[0] + gl.arange(0, layout.shape[0], layout=gl.SliceLayout(1, layout))
    words = gl.arange(0, 8, layout=gl.SliceLayout(0, layout))
    pointers = codes_ptr + rows[:, None] * (SEGMENT // 4) + (first_step + unit % STEPS) * 8 + words[None, :]
    return gl.load(pointers, mask=(rows[:, None] < N) & valid, other=0)


@gluon.jit
def _operand(words, table_words, TABLE: gl.constexpr, dtype: gl.constexpr, layout: gl.constexpr):
    """The (rows, 64) wgmma register operand of a step's words: the lookup's output (nibble, byte k = 2 h + e) of word
    2 t + wi goes to column 16 (2 wi + nibble) + 8 h + 2 t + e."""
    l0, l1, l2, l3, h0, h1, h2, h3 = gl.inline_asm_elementwise(
        TABLE, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
        [words, table_words[0], table_words[1], table_words[2], table_words[3], table_words[4], table_words[5],
         table_words[6], table_words[7]], dtype=(dtype.value,) * 8, is_pure=True, pack=1)
    low = gl.join(gl.join(l0, l1), gl.join(l2, l3))  # (rows, word, e, h)
    high = gl.join(gl.join(h0, h1), gl.join(h2, h3))
    levels = gl.reshape(gl.join(low, high), [words.shape[0], 4, 2, 2, 2, 2])  # (rows, t, wi, e, h, nibble)
    columns = gl.reshape(gl.permute(levels, (0, 2, 5, 4, 1, 3)), [words.shape[0], 64])
    return gl.convert_layout(columns, layout, assert_trivial=True)


@gluon.jit
def _make_xa(scale_a_tiles, xa_tiles, x_tiles, step, dtype: gl.constexpr):
    """X*A of a step, in place of the step's two TMA boxes of A (one per segment, natural column order), in the
    operand's column order: natural column 8 t + 4 wi + 2 h + e of segment `nibble` goes to column
    16 (2 wi + nibble) + 8 h + 2 t + e."""
    rank_pad: gl.constexpr = scale_a_tiles.type.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [8, 1], [1, 0])
    # (segment, column) with the segment in registers, so that it splits in place
    x_layout: gl.constexpr = gl.DistributedLinearLayout(reg_bases=[[32]], lane_bases=[[1], [2], [4], [8], [16]],
                                                        warp_bases=[[0], [0], [0]], block_bases=[], shape=[64])
    x = x_tiles.index(step).load(x_layout).to(gl.float32)
    x_low, x_high = gl.split(gl.permute(gl.reshape(x, [2, 32]), (1, 0)))
    x_low = gl.convert_layout(x_low, gl.SliceLayout(0, layout))
    x_high = gl.convert_layout(x_high, gl.SliceLayout(0, layout))
    low = scale_a_tiles.index(2 * step).load(layout).to(gl.float32)
    high = scale_a_tiles.index(2 * step + 1).load(layout).to(gl.float32)
    xa = gl.join((low * x_low[None, :]).to(dtype), (high * x_high[None, :]).to(dtype))  # (rank, column, nibble)
    xa = gl.reshape(xa, [rank_pad, 4, 2, 2, 2, 2])  # (rank, t, wi, h, e, nibble)
    xa = gl.reshape(gl.permute(xa, (0, 2, 5, 3, 1, 4)), [rank_pad, 64])
    gl.thread_barrier()  # every thread has read the step's A before any overwrites it
    xa_tiles.index(step).store(xa)
    fence_async_shared()  # the tensor cores read it next
    gl.thread_barrier()


@gluon.jit
def _unit(i, words, state, context, TABLE: gl.constexpr, STEPS: gl.constexpr, HAS_BIAS: gl.constexpr):
    """Unit i of the program's share: its step's X*A on the first pass, the product of its decoded codes with it, and
    at the end of a piece (a row tile's consecutive steps) the rows' partial sums out."""
    acc, previous, scale_b, piece_start = state
    (start, count, first_step, N, RANK, total_steps, LEVEL_SCALE, table_words, scale_a_tiles, xa_tiles, x_tiles,
     scale_a_ready, scale_b_ptr, bias_ptr, y_ptr, sums_ptr) = context
    dtype: gl.constexpr = xa_tiles.dtype
    acc_layout: gl.constexpr = acc.type.layout
    rows = gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, acc_layout))
    ranks = gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc_layout))
    tile = (start + i) // STEPS
    step = (start + i) % STEPS
    fresh = (i == 0) | (step == 0)  # the first unit of a piece
    offs_n = tile * acc.shape[0] + rows
    if fresh:
        piece_start = step
        scale_b = gl.load(scale_b_ptr + offs_n[:, None] * RANK + ranks[None, :],
                          mask=(offs_n[:, None] < N) & (ranks[None, :] < RANK), other=0.0)
    if i < STEPS:  # the first pass over the range: this step's X*A, once
        mbarrier.wait(scale_a_ready.index(step), 0)
        _make_xa(scale_a_tiles, xa_tiles, x_tiles, step, dtype)
    operand_layout: gl.constexpr = previous.type.layout
    operand = _operand(words, table_words, TABLE, dtype, operand_layout)
    acc = warpgroup_mma(operand, xa_tiles.index(step).permute((1, 0)), acc, use_acc=not fresh, is_async=True)
    # the last unit's product is done: its register operand may be overwritten from here on
    acc, previous = warpgroup_mma_wait(num_outstanding=1, deps=(acc, previous))
    previous = operand
    if (step == STEPS - 1) | (i == count - 1):
        acc, previous = warpgroup_mma_wait(num_outstanding=0, deps=(acc, previous))
        partial = gl.sum(acc * scale_b.to(gl.float32), axis=1) * LEVEL_SCALE
        mask = offs_n < N
        if step + 1 - piece_start == total_steps:  # the whole of K in one piece: no other program adds to it
            if HAS_BIAS:
                partial += gl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(gl.float32)
            gl.store(y_ptr + offs_n, partial.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            gl.atomic_add(sums_ptr + offs_n, partial, mask=mask, sem="relaxed")
    return acc, previous, scale_b, piece_start


@gluon.jit
def _finish_tiles(start, count, total_steps, bias_ptr, y_ptr, sums_ptr, counts_ptr, N, STEPS: gl.constexpr,
                  MAX_PIECES: gl.constexpr, HAS_BIAS: gl.constexpr):
    """After a program's last unit: count the steps it added to each row tile it shared with other programs (its
    pieces: the tiles from its first unit's to its last's), all in one round of atomics, and write the tiles whose
    count this completes from the workspace, leaving it zero. One round at the end instead of one per piece: each
    round waits about a microsecond for the atomics' results."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [8], [0])
    piece = gl.arange(0, MAX_PIECES, layout=layout)
    first = start // STEPS
    last = (start + count - 1) // STEPS
    tiles = first + piece
    # steps of each piece: the first starts mid-tile, the last may end mid-tile
    begin = gl.where(piece == 0, start % STEPS, 0)
    end = gl.where(tiles == last, (start + count - 1) % STEPS + 1, STEPS)
    done = end - begin
    shared = (tiles <= last) & (done < total_steps) & (count > 0)
    gl.thread_barrier()  # every thread's partial sums are added before any count is
    before = gl.atomic_add(counts_ptr + tiles, done, mask=shared, sem="acq_rel")
    complete = shared & (before + done == total_steps)
    rows_layout: gl.constexpr = gl.BlockedLayout([1], [32], [8], [0])
    for index in gl.static_range(MAX_PIECES):
        if gl.sum(gl.where(piece == index, complete.to(gl.int32), 0), axis=0) != 0:
            offs_n = (first + index) * 128 + gl.arange(0, 128, layout=rows_layout)
            mask = offs_n < N
            total = gl.load(sums_ptr + offs_n, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += gl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(gl.float32)
            gl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=mask)
            gl.store(sums_ptr + offs_n, gl.zeros_like(total), mask=mask)
            gl.store(counts_ptr + first + index, 0)


@gluon.jit
def _gemv_kernel(scale_a_desc, codes_ptr, x_ptr, scale_b_ptr, bias_ptr, y_ptr, sums_ptr, counts_ptr,
                 N, RANK, SEGMENT, LEVEL_SCALE, PROGRAMS_PER_RANGE, TABLE_WORDS, TABLE: gl.constexpr,
                 RANK_PAD: gl.constexpr, STEPS: gl.constexpr, MAX_STEPS: gl.constexpr, MAX_PIECES: gl.constexpr,
                 HAS_BIAS: gl.constexpr):
    BLOCK_N: gl.constexpr = 128
    BLOCK_J: gl.constexpr = scale_a_desc.block_type.shape[1]
    dtype: gl.constexpr = scale_a_desc.dtype
    total_steps = SEGMENT // BLOCK_J  # a multiple of STEPS, the steps of every range
    first_step = gl.program_id(0) // PROGRAMS_PER_RANGE * STEPS
    units = gl.cdiv(N, BLOCK_N) * STEPS
    share = gl.program_id(0) % PROGRAMS_PER_RANGE
    start = share * units // PROGRAMS_PER_RANGE
    count = (share + 1) * units // PROGRAMS_PER_RANGE - start

    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                         instr_shape=[16, RANK_PAD, 16])
    operand_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    # word 2 t + wi of rows 16 w + g and 16 w + g + 8 in the thread of lane 4 g + t of warp w
    words_layout: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [8, 0]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0], [64, 0]], block_bases=[], shape=[BLOCK_N, 8])

    # A of the steps this program meets by TMA, a barrier per step (a program must not end with copies in flight);
    # x of the range by every thread, into shared memory
    scale_a_tiles = gl.allocate_shared_memory(dtype, [2 * MAX_STEPS] + scale_a_desc.block_type.shape,
                                              scale_a_desc.layout)
    xa_tiles = scale_a_tiles._reinterpret(dtype, [MAX_STEPS, RANK_PAD, 2 * BLOCK_J],
                                          gl.NVMMASharedLayout.get_default_for([RANK_PAD, 2 * BLOCK_J], dtype))
    scale_a_ready = gl.allocate_shared_memory(gl.int64, [MAX_STEPS, 1], mbarrier.MBarrierLayout())
    for barrier in gl.static_range(MAX_STEPS):
        mbarrier.init(scale_a_ready.index(barrier), count=1)
    fence_async_shared()
    for k in range(gl.minimum(count, STEPS)):
        met = (start + k) % STEPS
        column = (first_step + met) * BLOCK_J
        mbarrier.expect(scale_a_ready.index(met), 2 * scale_a_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(scale_a_desc, [0, column], scale_a_ready.index(met),
                                        scale_a_tiles.index(2 * met))
        tma.async_copy_global_to_shared(scale_a_desc, [0, SEGMENT + column], scale_a_ready.index(met),
                                        scale_a_tiles.index(2 * met + 1))
    x_stage_layout: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [8, 1], [1, 0])
    x_row = gl.arange(0, 2 * MAX_STEPS, layout=gl.SliceLayout(1, x_stage_layout))[:, None]  # step 2 j + segment
    x_column = gl.arange(0, BLOCK_J, layout=gl.SliceLayout(0, x_stage_layout))[None, :]
    x_range = gl.load(x_ptr + x_row % 2 * SEGMENT + (first_step + x_row // 2) * BLOCK_J + x_column,
                      mask=(x_row // 2 < STEPS) & (x_column < BLOCK_J), other=0.0)
    x_stage = gl.allocate_shared_memory(dtype, [2 * MAX_STEPS, BLOCK_J], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                        x_range)
    x_tiles = x_stage._reinterpret(dtype, [MAX_STEPS, 2 * BLOCK_J], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    gl.thread_barrier()

    acc = gl.zeros([BLOCK_N, RANK_PAD], gl.float32, layout=acc_layout)
    scale_b = gl.zeros([BLOCK_N, RANK_PAD], dtype, layout=acc_layout)
    previous = gl.zeros([BLOCK_N, 2 * BLOCK_J], dtype, layout=gl.DotOperandLayout(0, acc_layout, 2))
    # The codes of the next eight units wait in registers: the loop is unrolled eight times so that each slot keeps
    # its register (a queue shifted from slot to slot makes each shift wait for the load it moves; the loads' latency
    # was then the top stall reason on the H200).
    queue0 = _load_words(codes_ptr, start, first_step, 0 < count, N, SEGMENT, STEPS, words_layout)
    queue1 = _load_words(codes_ptr, start + 1, first_step, 1 < count, N, SEGMENT, STEPS, words_layout)
    queue2 = _load_words(codes_ptr, start + 2, first_step, 2 < count, N, SEGMENT, STEPS, words_layout)
    queue3 = _load_words(codes_ptr, start + 3, first_step, 3 < count, N, SEGMENT, STEPS, words_layout)
    queue4 = _load_words(codes_ptr, start + 4, first_step, 4 < count, N, SEGMENT, STEPS, words_layout)
    queue5 = _load_words(codes_ptr, start + 5, first_step, 5 < count, N, SEGMENT, STEPS, words_layout)
    queue6 = _load_words(codes_ptr, start + 6, first_step, 6 < count, N, SEGMENT, STEPS, words_layout)
    queue7 = _load_words(codes_ptr, start + 7, first_step, 7 < count, N, SEGMENT, STEPS, words_layout)
    state = (acc, previous, scale_b, 0)  # the accumulator, the last operand, B of the piece, the piece's first step
    context = (start, count, first_step, N, RANK, total_steps, LEVEL_SCALE, TABLE_WORDS, scale_a_tiles, xa_tiles,
               x_tiles, scale_a_ready, scale_b_ptr, bias_ptr, y_ptr, sums_ptr)
    # (whole groups of eight, then the rest: a unit inside an `if` made ptxas serialise the wgmmas)
    for base in range(0, count // 8 * 8, 8):
        state = _unit(base, queue0, state, context, TABLE, STEPS, HAS_BIAS)
        queue0 = _load_words(codes_ptr, start + base + 8, first_step, base + 8 < count, N, SEGMENT, STEPS, words_layout)
        state = _unit(base + 1, queue1, state, context, TABLE, STEPS, HAS_BIAS)
        queue1 = _load_words(codes_ptr, start + base + 9, first_step, base + 9 < count, N, SEGMENT, STEPS, words_layout)
        state = _unit(base + 2, queue2, state, context, TABLE, STEPS, HAS_BIAS)
        queue2 = _load_words(codes_ptr, start + base + 10, first_step, base + 10 < count, N, SEGMENT, STEPS,
                             words_layout)
        state = _unit(base + 3, queue3, state, context, TABLE, STEPS, HAS_BIAS)
        queue3 = _load_words(codes_ptr, start + base + 11, first_step, base + 11 < count, N, SEGMENT, STEPS,
                             words_layout)
        state = _unit(base + 4, queue4, state, context, TABLE, STEPS, HAS_BIAS)
        queue4 = _load_words(codes_ptr, start + base + 12, first_step, base + 12 < count, N, SEGMENT, STEPS,
                             words_layout)
        state = _unit(base + 5, queue5, state, context, TABLE, STEPS, HAS_BIAS)
        queue5 = _load_words(codes_ptr, start + base + 13, first_step, base + 13 < count, N, SEGMENT, STEPS,
                             words_layout)
        state = _unit(base + 6, queue6, state, context, TABLE, STEPS, HAS_BIAS)
        queue6 = _load_words(codes_ptr, start + base + 14, first_step, base + 14 < count, N, SEGMENT, STEPS,
                             words_layout)
        state = _unit(base + 7, queue7, state, context, TABLE, STEPS, HAS_BIAS)
        queue7 = _load_words(codes_ptr, start + base + 15, first_step, base + 15 < count, N, SEGMENT, STEPS,
                             words_layout)
    for i in range(count // 8 * 8, count):  # their codes are loaded already
        state = _unit(i, queue0, state, context, TABLE, STEPS, HAS_BIAS)
        queue0, queue1, queue2, queue3, queue4, queue5, queue6 = queue1, queue2, queue3, queue4, queue5, queue6, queue7
    _finish_tiles(start, count, total_steps, bias_ptr, y_ptr, sums_ptr, counts_ptr, N, STEPS, MAX_PIECES, HAS_BIAS)


def rank_pad(rank: int) -> int:
    """wgmma's N: Gluon tensors have power-of-two shapes."""
    return max(16, triton.next_power_of_2(rank))


def max_steps(rank_pad: int) -> int:
    """The most K steps whose X*A a program keeps in shared memory (the allocation depends on the rank padding
    alone, so that shapes share compiled kernels; one program runs per multiprocessor). A power of two, as Gluon's
    tensor shapes are."""
    fits = SHARED_BYTES // (rank_pad * 2 * BLOCK_J * 2 + 2 * BLOCK_J * 2)
    return min(64, 1 << (fits.bit_length() - 1))


def steps_per_range(out_features: int, in_features: int, rank: int, processors: int) -> tuple[int, int]:
    """(steps per range, programs per range) for the fewest bytes the busiest program moves: its codes (from DRAM)
    plus, at half weight (from L2), its range of A and a B tile per piece. The ranges are equal: their steps divide
    the K steps."""
    total_steps = in_features // (2 * BLOCK_J)
    tile_bytes = 2 * rank_pad(rank) * BLOCK_J * 2
    best = (float("inf"), 0, 0)
    for steps in range(1, min(total_steps, max_steps(rank_pad(rank))) + 1):
        if total_steps % steps:
            continue
        ranges = total_steps // steps
        programs = processors // ranges
        if programs == 0:
            continue
        units = -(-(-(-out_features // BLOCK_N) * steps) // programs)
        if -(-units // steps) + 1 > MAX_PIECES:
            continue
        scales = tile_bytes * steps + BLOCK_N * rank * 2 * (units / steps + 1)
        best = min(best, (BLOCK_N * BLOCK_J * units + scales / 2, steps, programs))
    return best[1], best[2]


def supported(x: torch.Tensor, bits: int, scale_b: torch.Tensor, scale_a: torch.Tensor) -> bool:
    """Shapes and dtypes this kernel takes: one contiguous row, 4 bits, K a multiple of 128 (whole K steps, TMA's
    16-byte row strides), rank at most MAX_RANK, bf16 activations and scales, A 16-byte aligned for TMA (and
    `shares`). float16 runs but gave wrong outputs in 2 of 22 cases of the GPU suite (results/gpu_tests.md), so it
    is not offered."""
    return (x.numel() == x.shape[-1] and x.is_contiguous() and bits == 4 and scale_a.shape[1] % (4 * BLOCK_J) == 0
            and scale_b.shape[1] <= MAX_RANK and x.dtype == scale_a.dtype == scale_b.dtype == torch.bfloat16
            and scale_a.is_contiguous() and scale_a.data_ptr() % 16 == 0)


def shares(out_features: int, in_features: int, rank: int, processors: int) -> bool:
    """Whether some split of the work keeps every program within MAX_PIECES row tiles (steps_per_range)."""
    return steps_per_range(out_features, in_features, rank, processors)[0] > 0


def gemv(x, codes, scale_b, scale_a, bias, y, sums, counts, lookup, processors: int) -> None:
    """y (N,) = x (K,) @ W^T (+ bias) for `supported` inputs; codes (N, K // 2) uint8 in the 4-bit segment layout;
    `lookup` is level_lookup(codebook, x.dtype, "nibbles"); sums, counts: the zeroed stream-K workspace."""
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    steps, programs = steps_per_range(out_features, in_features, rank, processors)
    ranges = in_features // (2 * BLOCK_J * steps)
    pad = rank_pad(rank)
    element = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    scale_a_desc = TensorDescriptor.from_tensor(
        scale_a, [pad, BLOCK_J], gl.NVMMASharedLayout.get_default_for([pad, BLOCK_J], element))
    _gemv_kernel[(ranges * programs,)](
        scale_a_desc, codes.view(torch.int32), x, scale_b, bias if bias is not None else y, y, sums, counts,
        out_features, rank, in_features // 2, lookup.scale, programs, lookup.words or (0,) * 8,
        TABLE=lookup.table, RANK_PAD=pad, STEPS=steps, MAX_STEPS=max_steps(pad), MAX_PIECES=MAX_PIECES,
        HAS_BIAS=bias is not None, num_warps=8)
