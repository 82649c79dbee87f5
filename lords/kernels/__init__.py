"""Triton kernels for LoRDS. They know shapes and dtypes only: no models, no configs.

X @ ((B @ A) * C[codes])^T on the GPU, three ways:
- decode.py, the algebraic form with split-K, for at most MAX_ROWS rows (its cost grows as rows x rank), with X*A
  formed per tile or once per call;
- forward.py's tiled kernel, the scale tile computed per K-step and shared by the rows of a tile;
- forward.py's one-pass dequantization and cuBLAS, where the GEMM dominates and cuBLAS is the faster GEMM.
Which one is fastest depends on the shape as well as on M (results/kernels_h100.md: at M = 64 the tiled kernel wins by
1.8x on 14336 x 4096 and loses by 1.8x on 4096 x 14336), so `lords_matmul` times the candidates the first time it
meets a (row bucket, N, K, bits, dtype, integer codebook or not) and keeps the winner, as Triton's autotuner does for
configs; a choice stored by an earlier process, or shipped in the package for this GPU (autotune.load_choice), is
taken without timing.
On Hopper, GPU-only kernels join the candidates: lords.kernels.cuda's gemv4 (CUDA, one row, 4 bits) and gemm4
(CUDA, 2 to 128 rows, 4 bits).
`grouped_matmul` multiplies rows by matrices of a stack (a mixture-of-experts layer's experts): the decode kernel
for a few (row, expert) pairs, the tiled kernel on the pairs sorted by expert for more.
`fused_matmul` never materialises the dense weight. backward.py's `scale_grads` gives dL/dB and dL/dA for PEFT
without an n x m gradient.
"""

import warnings

import torch
import torch.nn.functional as F

from .autotune import INTERPRET, gpu_time, load_choice, save_choice
from .backward import scale_grads  # noqa: F401
from .codes import check_grouped_input, check_input, level_lookup
from .decode import MAX_ROWS, decode_matmul, grouped_decode_matmul, spills  # noqa: F401
from .forward import (GROUPED_PAD_ROWS, dequantize, grouped_tiled_matmul, m_bucket, sort_by_expert,  # noqa: F401
                      tiled_matmul)
from .cuda import gemm4_matmul, gemm4_ready, gemv4_matmul, gemv4_ready

# Used where timing cannot run (the CPU interpreter, inside a CUDA-graph capture): the H100 measurements' majority.
DECODE_ROWS = 2
TILED_ROWS = 16
# Beyond this the tiled kernel took milliseconds on every measured shape; it is not even timed.
TILED_MAX_ROWS = 256
# Up to this many (row, expert) pairs grouped_matmul runs the decode kernel, a group per pair, which reads the codes
# of the experts hit once per pair; beyond it the tiled kernel on the pairs sorted by expert, which reads them once
# per M tile of an expert's pairs. 256 pairs is decoding 32 tokens at top-8; the crossing is not measured on a GPU.
GROUPED_DECODE_MAX_PAIRS = 256
# At 4 rows the decode kernel with X*A once per call was slower than the tiled kernel on all five benchmark shapes
# (H100, README), and with Triton 3.9 every one of its configs spills there.
XA_ONCE_MAX_ROWS = 2


def dequant_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """The dense weight in x's dtype from one Triton pass, then cuBLAS."""
    check_input(x, scale_a)
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, dequantize(codes, codebook, scale_b, scale_a, bits, x.dtype), bias)


def decode_xa_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """The decode kernel with X*A computed once per call."""
    return decode_matmul(x, codes, codebook, scale_b, scale_a, bits, bias, xa_once=True)


KERNELS = {"decode": decode_matmul, "decode-xa": decode_xa_matmul, "tiled": tiled_matmul, "dequant": dequant_matmul,
           "cuda-gemv4": gemv4_matmul, "cuda-gemm4": gemm4_matmul}
_choices: dict[tuple, str] = {}


def candidates(rows: int, rank: int) -> list[str]:
    """The kernels lords_matmul times for this many rows of a layer of this rank. The decode kernel is left out where
    every config of it would spill its registers (decode.spills): 12x the tiled kernel's time there on the H100."""
    decode_fits = rows <= MAX_ROWS and not spills(rows, rank)
    return [name for name, fits in (("decode", decode_fits), ("decode-xa", decode_fits and rows <= XA_ONCE_MAX_ROWS),
                                    ("tiled", rows <= TILED_MAX_ROWS), ("dequant", True)) if fits]


def default_choice(rows: int, rank: int) -> str:
    if rows <= DECODE_ROWS and not spills(rows, rank):
        return "decode"
    return "tiled" if rows <= TILED_ROWS else "dequant"


def _can_time(x: torch.Tensor) -> bool:
    return not INTERPRET and x.is_cuda and not torch.cuda.is_current_stream_capturing()


def lords_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """x (..., K) -> (..., N) for packed codes of an (N, K) weight; scales B (N, r), A (r, K). What LoRDSLinear runs
    on CUDA: the fastest kernel for this shape, timed once per (row bucket, N, K, bits, dtype, integer codebook or
    not) and GPU model, and kept on disk for later processes (autotune.TUNING_CACHE), unless stored or shipped
    already (autotune.load_choice). Each kernel checks the input's width."""
    rows = x.numel() // x.shape[-1]
    args = (x, codes, codebook, scale_b, scale_a, bits, bias)
    key = (m_bucket(rows), scale_b.shape[0], scale_a.shape[1], bits, x.dtype, level_lookup(codebook).integer)
    choice = _choices.get(key)
    if choice is None:
        if not _can_time(x):
            return KERNELS[default_choice(rows, scale_b.shape[1])](*args)
        # the GPU-only kernels (Hopper only: lords.kernels.cuda) are timed with the others where they run
        names = candidates(rows, scale_b.shape[1])
        if gemv4_ready(x, bits, codes, scale_b, scale_a):
            names = ["cuda-gemv4", *names]
        if gemm4_ready(x, bits, codes, scale_b, scale_a):
            names = ["cuda-gemm4", *names]
        device_name = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
        choice = load_choice(key, device_name)
        if choice not in names:
            times = {}
            for name in names:
                try:  # gpu_time's first call runs outside its capture: each kernel autotunes its own configs there
                    times[name] = gpu_time(lambda name=name: KERNELS[name](*args))
                except RuntimeError as error:  # a kernel that cannot be captured is not chosen; the others can be
                    warnings.warn(f"lords_matmul: {name} kernel left out for {key}: {error}")
            choice = min(times, key=times.get) if times else default_choice(rows, scale_b.shape[1])
            if times:
                save_choice(key, device_name, choice, times)
        _choices[key] = choice
    return KERNELS[choice](*args)


def route_pairs(experts: torch.Tensor, num_experts: int) -> torch.Tensor | None:
    """The (token, expert) pairs of experts (T, k) sorted by expert for the grouped tiled kernel (sort_by_expert), or
    None where grouped_matmul runs the decode kernel. Computed once, it serves every grouped_matmul over the same
    routing: a layer's gate_up on its tokens and down on their pairs."""
    if experts.numel() <= GROUPED_DECODE_MAX_PAIRS:
        return None
    return sort_by_expert(experts.reshape(-1), num_experts, GROUPED_PAD_ROWS)


def grouped_matmul(x, experts, codes, codebook, scale_b, scale_a, bits, pairs=None):
    """x (T, K) and experts (T, k) in [0, E) -> (T, k, N): y[t, j] = x[t] times matrix experts[t, j] of a stack
    (packed codes (E, N, bytes), scales B (E, N, r), A (E, r, K)), through the decode kernel for a few pairs
    (GROUPED_DECODE_MAX_PAIRS) and the grouped tiled kernel beyond: mixture-of-experts inference, one launch, and
    nothing waits for the GPU to learn which experts were hit. pairs: route_pairs(experts) if the caller has it."""
    check_grouped_input(x, experts, scale_a)
    tokens, top_k = experts.shape
    if experts.numel() > GROUPED_DECODE_MAX_PAIRS:
        return grouped_tiled_matmul(x, experts, codes, codebook, scale_b, scale_a, bits, pairs)
    rows = x.repeat_interleave(top_k, dim=0) if top_k > 1 else x
    return grouped_decode_matmul(rows, experts.reshape(-1), codes, codebook, scale_b, scale_a, bits).view(
        tokens, top_k, -1)


def fused_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """x @ W^T without materialising the dense weight at any M: decode for a few rows, else tiled."""
    kernel = decode_matmul if x.numel() // x.shape[-1] <= DECODE_ROWS else tiled_matmul
    return kernel(x, codes, codebook, scale_b, scale_a, bits, bias)
