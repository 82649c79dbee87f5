"""Codebooks: the 2^bits levels a code can take, and nearest-level assignment."""

import torch

SUPPORTED_BITS = (2, 3, 4)
CODEBOOK_KINDS = ("nf", "int")

# QLoRA's offset: the quantile range is cut where the 4-bit table's outermost bins would otherwise reach +/-inf.
NF_OFFSET = 0.9677083


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def nf_codebook(bits: int) -> torch.Tensor:
    """NormalFloat levels (QLoRA construction): 2^(bits-1) positive quantiles, 2^(bits-1)-1 negative, one exact 0."""
    check_bits(bits)
    half = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    levels = levels / levels.abs().max()
    return levels.sort().values.to(torch.float32)


def int_codebook(bits: int) -> torch.Tensor:
    """Symmetric-integer levels -2^(bits-1) .. 2^(bits-1)-1 divided by 2^(bits-1)-1.

    This is the absmax/7 convention of INT4 (absmax/3 at INT3, /1 at INT2): absmax scaling maps weights into
    [-1, 1], and the extra negative level (-8/7 at 4 bits) is reachable only by scales that training shrinks.
    """
    check_bits(bits)
    half = 2 ** (bits - 1)
    return torch.arange(-half, half, dtype=torch.float32) / (half - 1)


def get_codebook(kind: str, bits: int) -> torch.Tensor:
    if kind == "nf":
        return nf_codebook(bits)
    if kind == "int":
        return int_codebook(bits)
    raise ValueError(f"codebook must be one of {CODEBOOK_KINDS}, got {kind!r}")


def nearest_codes(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook level for every element, as uint8.

    Uses the K-1 midpoints and bucketize, so memory stays O(numel) instead of O(numel * K).
    Ties (a value exactly on a midpoint) go to the lower level.
    """
    codebook = codebook.to(device=values.device, dtype=values.dtype)
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values.contiguous(), midpoints).to(torch.uint8)
