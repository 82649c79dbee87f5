"""Block-wise absmax quantization: one scale per `block_size` consecutive input elements of a row.

At 4 bits with the NF codebook and block_size 64 this is bitsandbytes' NF4 (for in_features divisible by 64, the
flattened 64-element blocks of bitsandbytes are exactly these row blocks). It is both the LoRDS baseline and the
source of the LoRDS initialization.
"""

import torch

from .codebooks import nearest_codes


def check_block_size(in_features: int, block_size: int) -> None:
    if block_size < 1 or in_features % block_size:
        raise ValueError(f"in_features={in_features} is not divisible by block_size={block_size}")


def block_absmax(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., n, m) -> (..., n, m // block_size): max |w| over each block of a row."""
    *lead, in_features = weight.shape
    check_block_size(in_features, block_size)
    return weight.abs().reshape(*lead, in_features // block_size, block_size).amax(dim=-1)


def expand_blocks(block_scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., n, g) -> (..., n, g * block_size): the piecewise-constant scale matrix S_blk."""
    return block_scale.repeat_interleave(block_size, dim=-1)


def safe_divide(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W / S with |S| kept at least 1e-12 and its sign bit kept (so -0.0 divides as -1e-12): no NaN or Inf can
    appear. `out` (S's shape) receives the result without a new allocation."""
    guarded = torch.abs(scale, out=out).clamp_min_(1e-12).copysign_(scale)
    return weight / guarded if out is None else torch.div(weight, guarded, out=out)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """Quantization math runs in float32, or float64 when given float64 (the tests' references)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def quantize_blockwise(weight: torch.Tensor, codebook: torch.Tensor, block_size: int):
    """Round-to-nearest with absmax block scales. Returns (codes uint8 (..., n, m), absmax (..., n, m/b))."""
    weight = weight.to(compute_dtype(weight))
    absmax = block_absmax(weight, block_size)
    codes = nearest_codes(safe_divide(weight, expand_blocks(absmax, block_size)), codebook)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, block_size: int):
    return expand_blocks(absmax, block_size) * codebook.to(absmax.device)[codes.long()]
