"""The GPTQ baseline: block-wise absmax scales (NF or INT levels, groups of 64 or 128) with GPTQ's error-feedback
codes in act-order, damping 0.01 of the mean diagonal, lazy blocks of 128 columns.

The groups are static (llm-compressor's actorder "static", its default; GPTQModel's static_groups): each group's
scale is the absmax of the original weights of its contiguous columns, fixed before the codes are assigned, so the
format is bitsandbytes-style block-wise storage (no column permutation to store). With the INT levels this is
llm-compressor's symmetric INT GPTQ given those scales: benchmarks/gptq_reference.py checks it against
llm-compressor's quantize_weight (results/gptq_reference_tiny.md).
"""

import torch
import torch.nn.functional as F

from ..blockwise import block_absmax, compute_dtype, expand_blocks
from ..gptq import gptq_codes

SCALE_BITS = 16  # one fp16 absmax per group


def group_absmax(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(.., n, ceil(m / group_size)): max |w| over each group of group_size columns. Where group_size does not divide
    the width, the last group is shorter, as GPTQ's groups (column // group_size) are: the default model's 576 columns
    make 4 groups of 128 and one of 64."""
    return block_absmax(F.pad(weight, (0, -weight.shape[-1] % group_size)), group_size)


def group_scale(absmax: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """The (.., n, in_features) scale matrix of group_absmax's groups."""
    return expand_blocks(absmax, group_size)[..., :in_features]


def gptq_blockwise(
    weight: torch.Tensor, hessian: torch.Tensor, codebook: torch.Tensor, group_size: int, act_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, group absmax in float16 (.., n, ceil(m / group_size))) for a weight (n, m) or stack (L, n, m)."""
    weight = weight.to(compute_dtype(weight))
    absmax = group_absmax(weight, group_size).to(torch.float16)
    scale = group_scale(absmax.to(weight.dtype), group_size, weight.shape[-1])
    return gptq_codes(weight, scale, codebook, hessian, act_order=act_order), absmax


def gptq_blockwise_weight(weight, hessian, codebook, group_size: int, act_order: bool = True) -> torch.Tensor:
    """The dequantized weight of gptq_blockwise, in float32 (float64 if given float64)."""
    dtype = compute_dtype(weight)
    codes, absmax = gptq_blockwise(weight, hessian, codebook, group_size, act_order)
    return group_scale(absmax.to(dtype), group_size, weight.shape[-1]) * codebook.to(absmax.device, dtype)[codes.long()]
