"""Decoding packed codes into codebook levels, shared by every LoRDS kernel.

Codes come in lords.packing's segment layout: byte column j of a row holds the codes of columns s * S + j for every
segment s (at 3 bits, in three byte planes). A kernel loads one (BLOCK_N, BLOCK_J) tile of bytes per plane with
contiguous, 16-byte loads (the launcher passes the row length and S as arguments, so Triton sees when they are
multiples of 16) and regroups it four bytes to an int32 (load_planes): an int32 then holds the codes of four
consecutive columns of every segment, so one shift and mask hand the level lookup a segment's four codes, with no
per-code extraction and repacking (the decode kernel: 9.9 -> 8.5 SASS instructions per weight at 4 bits, 12.3 ->
6.7 at 3 bits, results/kernels_sass.md). The lookup (level_lookup) is a register table on the GPU, or for an integer
codebook a few instructions without one, and a gather from the 4- to 16-entry codebook under the interpreter.

Beside the codes, the helpers every kernel shares: loading tiles of B and A.
"""

import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..packing import SEGMENTS, row_bytes, segment_width
from .autotune import INTERPRET, next_power_of_2

# Four codes (one per byte of register `codes`, at most 16 levels) to two registers of 16-bit level pairs (fp16 or
# bf16), `first` holding the levels of codes 0 and 1 and `second` those of codes 2 and 3, through registers: prmt
# picks byte k of an 8-byte table with the low three bits of code k, once from levels 0-7 and once from 8-15, bit 3
# chooses between the two (lop3 0xE4 is "mask ? a : b"), and the high and low bytes are interleaved into the two
# pairs. A codebook of at most 8 levels (2 and 3 bits) needs neither the second pick nor the choice. A gather from
# the codebook in memory costs one load per weight, which measured 2.5x slower than the whole kernel without it
# (results/kernels_h100.md).
def _table_pairs_ptx(words: dict[str, str], levels: int, codes: str, first: str, second: str) -> str:
    def pick_bytes(out: str, half: str) -> str:  # byte k of `out`: byte (code k & 7) of levels 0-7 or 8-15 of `half`
        low = f"mov.b32 a, {words[half + '0']};\nmov.b32 b, {words[half + '1']};\nprmt.b32 {out}, a, b, s;\n"
        if levels <= 8:
            return low
        return (low + f"mov.b32 a, {words[half + '2']};\nmov.b32 b, {words[half + '3']};\nprmt.b32 a, a, b, s;\n"
                f"lop3.b32 {out}, a, {out}, m, 0xE4;\n")

    return ("{\n.reg .b32 s, m, a, b, hi, lo;\n"
            # prmt's selector, the low three bits of code k in nibble k: bytes 0 and 2 of s | s >> 4 (the kernels
            # hand over codes of at most 3 bits where the codebook has at most 8 levels)
            + (f"and.b32 s, {codes}, 0x07070707;\n" if levels > 8 else f"mov.b32 s, {codes};\n")
            + "shr.u32 m, s, 4;\nor.b32 s, s, m;\nprmt.b32 s, s, 0, 0x20;\n"
            # bit 3 of each code as a byte mask: shifted into the byte's sign bit, which prmt's mode 8-11 replicates
            + (f"shl.b32 m, {codes}, 4;\nprmt.b32 m, m, 0, 0xBA98;\n" if levels > 8 else "")
            + pick_bytes("hi", "hi") + pick_bytes("lo", "lo")
            + f"prmt.b32 {first}, lo, hi, 0x5140;\nprmt.b32 {second}, lo, hi, 0x7362;\n}}\n")


def _integer_pairs_ptx(dtype: torch.dtype, offset: int, codes: str, first: str, second: str) -> str:
    """The table's interface for an integer codebook: a code placed in the low mantissa bits of 128.0 (bf16) or
    1024.0 (fp16) makes 128 + code or 1024 + code exactly, and one packed add of offset - 128 (or - 1024) leaves
    code + offset, an exact small integer. Two levels take three instructions (prmt, or, fma) where the table takes
    about nine."""
    base, one, kind = (128, 0x3F80, "bf16x2") if dtype == torch.bfloat16 else (1024, 0x3C00, "f16x2")
    halves = torch.tensor([base, offset - base], dtype=dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    magic, shift = halves.tolist()
    return ("{\n.reg .b32 one, shift;\n"
            f"mov.b32 one, {one * 0x10001:#x};\nmov.b32 shift, {shift * 0x10001:#x};\n"
            # bytes 0, 1 (and 2, 3) of the codes to the low bytes of the two halves
            f"prmt.b32 {first}, {codes}, 0, 0x4140;\nprmt.b32 {second}, {codes}, 0, 0x4342;\n"
            f"or.b32 {first}, {first}, {magic * 0x10001:#x};\nor.b32 {second}, {second}, {magic * 0x10001:#x};\n"
            f"fma.rn.{kind} {first}, {first}, one, shift;\nfma.rn.{kind} {second}, {second}, one, shift;\n}}\n")


def _lookup_ptx(pairs_ptx, form: str) -> str:
    """The inline assembly of a lookup form (level_lookup) around pairs_ptx(codes, first, second)."""
    if form == "pairs":  # codes in $2, level pairs in $0, $1
        return pairs_ptx("$2", "$0", "$1")
    if form == "quads":  # codes in $4, four 16-bit levels in $0-$3
        return ("{\n.reg .b32 lords_p, lords_q;\n" + pairs_ptx("$4", "lords_p", "lords_q")
                + "mov.b32 {$0, $1}, lords_p;\nmov.b32 {$2, $3}, lords_q;\n}")
    # "nibbles": the eight 4-bit codes in the bytes of $8; $0-$3 are the levels of the low nibbles of bytes 0-3,
    # $4-$7 those of the high nibbles (a table's words come in $9-$16: LevelLookup.words)
    nibbles = []
    for shift, out in enumerate((0, 4)):
        nibbles.append(("shr.b32 lords_c, $8, 4;\nand.b32 lords_c, lords_c, 0x0F0F0F0F;\n" if shift else
                        "and.b32 lords_c, $8, 0x0F0F0F0F;\n")
                       + pairs_ptx("lords_c", "lords_p", "lords_q")
                       + f"mov.b32 {{${out}, ${out + 1}}}, lords_p;\nmov.b32 {{${out + 2}, ${out + 3}}}, lords_q;\n")
    return "{\n.reg .b32 lords_c, lords_p, lords_q;\n" + "".join(nibbles) + "}"


def integer_levels(codebook: torch.Tensor) -> tuple[int, float] | None:
    """(offset, step) when every level is (code + offset) * step with a small integer offset, as in lords.codebooks'
    int codebooks ((code - 8) / 7 at 4 bits); None for any other codebook."""
    levels = codebook.detach().to("cpu", torch.float64)
    step = (levels[1] - levels[0]).item()
    if step <= 0:
        return None
    offset = round(levels[0].item() / step)
    expected = (torch.arange(levels.numel(), dtype=torch.float64) + offset) * step
    if abs(offset) > 64 or (levels - expected).abs().max() > 1e-6 * levels.abs().max():
        return None
    return offset, step


class LevelLookup(NamedTuple):
    """How a kernel turns codes into levels: `table`, the register lookup's PTX giving them in `dtype` (None under
    the interpreter, which gathers from `levels` in memory; on the GPU `levels` is the codebook itself, unread), as
    levels / `scale`: the kernel scales its output. `integer`: the codebook's levels are integers times the scale,
    decoded without a table. `words`: the table's eight 32-bit words, which the "nibbles" form takes as operands
    $9-$16 (as int32 kernel arguments, so that they stay in registers over a loop; empty without a table).
    `values`: the levels as Python floats and `offset`: the integer codebook's offset (levels = (code + offset) *
    scale), for kernels that take them as arguments (the CUDA kernel)."""
    table: str | None
    levels: torch.Tensor
    scale: float
    dtype: torch.dtype
    integer: bool
    words: tuple[int, ...] = ()
    values: tuple[float, ...] = ()
    offset: int = 0


_lookups: dict[tuple, tuple] = {}  # (id(codebook), dtype, form) -> (weak reference, version, LevelLookup)
FORMS = ("quads", "pairs", "nibbles")


def level_lookup(codebook: torch.Tensor, dtype: torch.dtype = torch.float16, form: str = "quads") -> LevelLookup:
    """The level lookup for this codebook with levels in `dtype` (float16 or bfloat16) on the GPU; a kernel that
    feeds them straight to a tensor-core product asks for its operand type and saves two conversions per weight. A
    register table (PTX, the levels as immediates) takes, by `form` (_lookup_ptx), four codes in one register to four
    16-bit registers ("quads": quad_levels), to two registers of level pairs ("pairs": byte_levels), or eight 4-bit
    codes in one register to eight 16-bit levels ("nibbles": the Gluon kernel); an integer codebook (integer_levels)
    takes no table: its levels come out as code + offset and the step is the kernel's output scale. Cached per
    codebook tensor, dtype and form, so that only the first call reads the levels back from the GPU (later calls can
    be captured in a CUDA graph)."""
    key = (id(codebook), dtype, form)
    cached = _lookups.get(key)
    # a dead reference means another tensor took over the id; a new version means the levels were written to
    if cached is None or cached[0]() is not codebook or cached[1] != codebook._version:
        if form not in FORMS:
            raise ValueError(f"unknown level lookup form {form!r}; choose one of {FORMS}")
        integer = integer_levels(codebook)
        offset, step = integer if integer is not None else (0, 1.0)
        # No GPU tensor is made here: one made at the first call inside torch.compile's CUDA-graph trees, and kept
        # in this cache, would outlive the call, which they refuse. Only the interpreter gathers levels.
        words = ()
        if INTERPRET:
            table, levels = None, codebook.detach().float() / step
            if integer is not None:
                levels = levels.round()
        else:
            if integer is not None:
                def pairs_ptx(codes, first, second):
                    return _integer_pairs_ptx(dtype, offset, codes, first, second)
            else:
                words = _table_words(codebook, dtype)
                operands = {name: f"${9 + index}" for index, name in enumerate(words)} if form == "nibbles" else {
                    name: hex(word) for name, word in words.items()}

                def pairs_ptx(codes, first, second):
                    return _table_pairs_ptx(operands, codebook.numel(), codes, first, second)
                words = tuple(word - (1 << 32) * (word >> 31) for word in words.values())  # as int32
            table, levels = _lookup_ptx(pairs_ptx, form), codebook.detach()
        values = tuple(codebook.detach().to("cpu", torch.float32).tolist())
        lookup = LevelLookup(table, levels.contiguous(), step, dtype, integer is not None, words, values, offset)
        cached = _lookups[key] = (weakref.ref(codebook), codebook._version, lookup)
    return cached[2]


def _table_words(codebook: torch.Tensor, dtype: torch.dtype) -> dict[str, int]:
    """The levels in `dtype` as eight 32-bit words: low bytes (lo0-lo3) and high bytes (hi0-hi3) of 16 levels."""
    levels = torch.zeros(16, dtype=dtype)
    levels[: codebook.numel()] = codebook.detach().to("cpu", dtype)
    bits = levels.view(torch.int16).to(torch.int32) & 0xFFFF
    words = {}
    for name, byte in (("lo", bits & 0xFF), ("hi", bits >> 8)):
        for reg in range(4):
            words[f"{name}{reg}"] = sum(int(byte[4 * reg + i]) << (8 * i) for i in range(4))
    return words


def check_input(x: torch.Tensor, scale_a: torch.Tensor) -> None:
    if not x.dtype.is_floating_point:  # else Triton fails to compile the dot, with no word of the input
        raise TypeError(f"the LoRDS kernels take floating-point inputs, got {x.dtype}")
    if x.shape[-1] != scale_a.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {scale_a.shape[1]}")


def check_grouped_input(x: torch.Tensor, experts: torch.Tensor, scale_a: torch.Tensor) -> None:
    """For the grouped kernels: rows x (T, K), the experts of each row (T, k), and a stack of A (E, r, K)."""
    check_input(x, scale_a[0])
    if x.dim() != 2 or experts.dim() != 2 or experts.shape[0] != x.shape[0]:
        raise ValueError(f"a grouped matmul takes rows (T, K) and the experts of each row (T, k), got "
                         f"{tuple(x.shape)} and {tuple(experts.shape)}")


def rank_pad(rank: int) -> int:
    """tl.dot needs every dimension >= 16; powers of two keep tl.arange legal."""
    return max(16, next_power_of_2(rank))


def layout_args(in_features: int, bits: int) -> dict:
    """The packed-layout arguments every kernel takes."""
    return {"SEGMENT": segment_width(in_features, bits), "ROW_BYTES": row_bytes(in_features, bits)}


def layout_meta(bits: int, lookup: LevelLookup) -> dict:
    """The compile-time arguments every kernel takes: bit width, segments, and the level lookup (level_lookup)."""
    return {"BITS": bits, "SEGMENTS": SEGMENTS[bits], "TABLE": lookup.table,
            "BF16_LEVELS": lookup.dtype == torch.bfloat16}


@triton.jit
def load_quads(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """The (BLOCK_N, BLOCK_J // 4) int32 words of byte columns offs_j taken four at a time (little-endian): a word's
    bytes hold the codes (or, at 3 bits, the code bits of this byte plane) of four consecutive columns in each
    segment."""
    rows = codes_ptr + offs_n[:, None].to(tl.int64) * ROW_BYTES + offs_j[None, :]
    byte = tl.load(rows, mask=(offs_n[:, None] < N) & (offs_j[None, :] < SEGMENT), other=0)
    even, odd = tl.split(byte.reshape(BLOCK_N, BLOCK_J // 4, 2, 2))
    low, high = tl.split(even.to(tl.int32) | (odd.to(tl.int32) << 8))
    return low | (high << 16)


@triton.jit
def load_planes(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_J: tl.constexpr):
    """load_quads of every byte plane of the tile: one at 2 and 4 bits (returned three times), three at 3 bits (bits
    0-1 of segments 0-3, of segments 4-7, bit 2 of all eight: packing.py)."""
    quad = load_quads(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BLOCK_N, BLOCK_J)
    if BITS == 3:
        quad_mid = load_quads(codes_ptr + SEGMENT, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BLOCK_N, BLOCK_J)
        quad_high = load_quads(codes_ptr + 2 * SEGMENT, offs_n, offs_j, N, SEGMENT, ROW_BYTES, BLOCK_N, BLOCK_J)
    else:
        quad_mid = quad
        quad_high = quad
    return quad, quad_mid, quad_high


@triton.jit
def segment_quad(quad, quad_mid, quad_high, segment, BITS: tl.constexpr):
    """The codes of segment `segment` (compile-time or run-time), one per byte, from the int32s of load_planes."""
    if BITS == 3:
        low = tl.where(segment < 4, quad, quad_mid) >> (2 * (segment % 4))
        return (low & 0x03030303) | (((quad_high >> segment) & 0x01010101) << 2)
    return (quad >> (BITS * segment)) & (0x01010101 * ((1 << BITS) - 1))


@triton.jit
def quad_levels(quad, codebook_ptr, TABLE: tl.constexpr, BF16_LEVELS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_J: tl.constexpr):
    """C[codes] for the four codes in each int32 of `quad` (one per byte, (BLOCK_N, BLOCK_J // 4)) as the
    (BLOCK_N, BLOCK_J) tile of their columns: through level_lookup's PTX (TABLE), in bfloat16 or float16 as
    BF16_LEVELS says it was built, else in float32, gathered from the codebook."""
    if TABLE is None:
        l0 = tl.load(codebook_ptr + (quad & 0xFF))
        l1 = tl.load(codebook_ptr + ((quad >> 8) & 0xFF))
        l2 = tl.load(codebook_ptr + ((quad >> 16) & 0xFF))
        l3 = tl.load(codebook_ptr + ((quad >> 24) & 0xFF))
    elif BF16_LEVELS:
        l0, l1, l2, l3 = tl.inline_asm_elementwise(TABLE, "=h,=h,=h,=h,r", [quad], dtype=(tl.bfloat16,) * 4,
                                                   is_pure=True, pack=1)
    else:
        l0, l1, l2, l3 = tl.inline_asm_elementwise(TABLE, "=h,=h,=h,=h,r", [quad], dtype=(tl.float16,) * 4,
                                                   is_pure=True, pack=1)
    # (w, q, p) -> column 4 w + 2 q + p holds code 2 q + p
    return tl.join(tl.join(l0, l2), tl.join(l1, l3)).reshape(BLOCK_N, BLOCK_J)


@triton.jit
def load_bytes(codes_ptr, offs_n, offs_j, N, SEGMENT, ROW_BYTES):
    """The (BLOCK_N, BLOCK_J) tile of byte columns offs_j (at 2 and 4 bits, the codes of every segment) as int32."""
    rows = codes_ptr + offs_n[:, None].to(tl.int64) * ROW_BYTES + offs_j[None, :]
    return tl.load(rows, mask=(offs_n[:, None] < N) & (offs_j[None, :] < SEGMENT), other=0).to(tl.int32)


@triton.jit
def byte_levels(byte, codebook_ptr, segment, BITS: tl.constexpr, TABLE: tl.constexpr, BF16_LEVELS: tl.constexpr):
    """C[codes] of segment `segment` for a load_bytes tile (2 and 4 bits), element by element: through
    level_lookup(..., form="pairs")'s PTX or gathered, as quad_levels. The tiled kernel's dots want this tile's layout:
    quad_levels' joins cost it two more layout conversions a step (H100: 1.05-1.11x the time at M = 16)."""
    code = (byte >> (BITS * segment)) & ((1 << BITS) - 1)
    # (one branch per result type: Triton 3.6 takes no constexpr dtype here)
    if TABLE is None:
        level = tl.load(codebook_ptr + code)
    elif BF16_LEVELS:
        level = tl.inline_asm_elementwise(TABLE, "=r,=r,r", [code.to(tl.uint8)], dtype=tl.bfloat16, is_pure=True,
                                          pack=4)
    else:
        level = tl.inline_asm_elementwise(TABLE, "=r,=r,r", [code.to(tl.uint8)], dtype=tl.float16, is_pure=True,
                                          pack=4)
    return level


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
