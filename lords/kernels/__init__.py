"""Triton kernels for LoRDS. They know shapes and dtypes only: no models, no configs.

X @ ((B @ A) * C[codes])^T on the GPU, three ways, and `lords_matmul` picks by the number of rows M (the thresholds
come from results/kernels.md, H100):
- decode.py, the algebraic form with split-K, for M <= DECODE_ROWS (its cost grows as M x rank);
- forward.py's tiled kernel, the scale tile computed per K-step and shared by the rows of a tile, up to TILED_ROWS;
- forward.py's one-pass dequantization and cuBLAS beyond, where the GEMM dominates and cuBLAS is the faster GEMM.
`fused_matmul` never materialises the dense weight (decode, then tiled at any M). backward.py's `scale_grads` gives
dL/dB and dL/dA for PEFT without an n x m gradient.
"""

import torch.nn.functional as F

from .backward import scale_grads
from .codes import check_input
from .decode import MAX_ROWS, decode_matmul  # noqa: F401  (MAX_ROWS: the decode kernel's limit)
from .forward import dequantize, tiled_matmul

DECODE_ROWS = 2
TILED_ROWS = 64


def dequant_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """The dense weight in x's dtype from one Triton pass, then cuBLAS."""
    check_input(x, scale_a)
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, dequantize(codes, codebook, scale_b, scale_a, bits, x.dtype), bias)


def lords_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """x (..., K) -> (..., N) for packed codes of an (N, K) weight; scales B (N, r), A (r, K). What LoRDSLinear runs
    on CUDA."""
    check_input(x, scale_a)
    rows = x.numel() // x.shape[-1]
    if rows <= DECODE_ROWS:
        return decode_matmul(x, codes, codebook, scale_b, scale_a, bits, bias)
    if rows <= TILED_ROWS:
        return tiled_matmul(x, codes, codebook, scale_b, scale_a, bits, bias)
    return dequant_matmul(x, codes, codebook, scale_b, scale_a, bits, bias)


def fused_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """As lords_matmul, without materialising the dense weight at any M."""
    check_input(x, scale_a)
    if x.numel() // x.shape[-1] <= DECODE_ROWS:
        return decode_matmul(x, codes, codebook, scale_b, scale_a, bits, bias)
    return tiled_matmul(x, codes, codebook, scale_b, scale_a, bits, bias)
