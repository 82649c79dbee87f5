"""Triton kernels for LoRDS. They know shapes and dtypes only: no models, no configs.

Two ways to compute X @ ((B @ A) * C[codes])^T on the GPU:
- `lords_matmul`: forward.py's one-pass dequantization, then cuBLAS. It was the fastest of ours at every M measured
  in results/kernels.md (H100), so it is what LoRDSLinear runs by default;
- `fused_matmul`: never holds the dense weight. decode.py (the algebraic form, split-K) for up to MAX_ROWS rows,
  forward.py's tiled kernel above. It saves the transient n x m weight, and is slower today.
backward.py's `scale_grads` gives dL/dB and dL/dA for PEFT without an n x m gradient.
"""

import torch.nn.functional as F

from .backward import scale_grads
from .codes import check_input
from .decode import MAX_ROWS, decode_matmul
from .forward import dequantize, tiled_matmul


def lords_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """x (..., K) -> (..., N) for packed codes of an (N, K) weight; scales B (N, r), A (r, K)."""
    check_input(x, scale_a)
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, dequantize(codes, codebook, scale_b, scale_a, bits, x.dtype), bias)


def fused_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """As lords_matmul, without materialising the dense weight."""
    check_input(x, scale_a)
    if x.numel() // x.shape[-1] <= MAX_ROWS:
        return decode_matmul(x, codes, codebook, scale_b, scale_a, bits, bias)
    return tiled_matmul(x, codes, codebook, scale_b, scale_a, bits, bias)
