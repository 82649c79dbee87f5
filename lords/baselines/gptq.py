"""The GPTQ baseline: block-wise absmax scales (NF or INT levels, groups of 64 or 128) with GPTQ's error-feedback
codes in act-order, damping 0.01 of the mean diagonal, lazy blocks of 128 columns.

The groups are static (llm-compressor's actorder "static", its default; GPTQModel's static_groups): each group's
scale is the absmax of the original weights of its contiguous columns, fixed before the codes are assigned, so the
format is bitsandbytes-style block-wise storage (no column permutation to store). With the INT levels this is
llm-compressor's symmetric INT GPTQ given those scales: benchmarks/gptq_reference.py checks it against
llm-compressor's quantize_weight (results/gptq_reference_tiny.md).
"""

import torch

from ..blockwise import block_absmax, compute_dtype, dequantize_blockwise, expand_blocks
from ..gptq import gptq_codes

SCALE_BITS = 16  # one fp16 absmax per group


def gptq_blockwise(
    weight: torch.Tensor, hessian: torch.Tensor, codebook: torch.Tensor, group_size: int, act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, group absmax in float16 (.., n, m / group_size)) for a weight (n, m) or stack (L, n, m)."""
    weight = weight.to(compute_dtype(weight))
    absmax = block_absmax(weight, group_size).to(torch.float16)
    scale = expand_blocks(absmax.to(weight.dtype), group_size)
    return gptq_codes(weight, scale, codebook, hessian, act_order=act_order), absmax


def gptq_blockwise_weight(weight, hessian, codebook, group_size: int, act_order: bool = True) -> torch.Tensor:
    """The dequantized weight of gptq_blockwise, in float32 (float64 if given float64)."""
    dtype = compute_dtype(weight)
    codes, absmax = gptq_blockwise(weight, hessian, codebook, group_size, act_order)
    return dequantize_blockwise(codes, absmax.to(dtype), codebook.to(dtype), group_size)
