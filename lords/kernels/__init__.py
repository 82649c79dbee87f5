"""Triton kernels for LoRDS. They know shapes and dtypes only: no models, no configs.

`lords_matmul` picks the kernel by the number of rows M:
- decode.py, the algebraic form with split-K, up to DECODE_MAX_TOKENS;
- forward.py's tiled kernel up to TILED_MAX_TOKENS;
- above, forward.py's one-pass dequantization and cuBLAS: at long prefill the GEMM dwarfs the pass.
"""

import torch.nn.functional as F

from .codes import check_input
from .decode import MAX_ROWS, decode_matmul
from .forward import dequantize, tiled_matmul

DECODE_MAX_TOKENS = MAX_ROWS
TILED_MAX_TOKENS = 256


def lords_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """x (..., K) -> (..., N) for packed codes of an (N, K) weight; scales B (N, r), A (r, K)."""
    check_input(x, scale_a)
    tokens = x.numel() // x.shape[-1]
    if tokens <= DECODE_MAX_TOKENS:
        return decode_matmul(x, codes, codebook, scale_b, scale_a, bits, bias)
    if tokens <= TILED_MAX_TOKENS:
        return tiled_matmul(x, codes, codebook, scale_b, scale_a, bits, bias)
    return F.linear(x, dequantize(codes, codebook, scale_b, scale_a, bits, x.dtype), bias)
