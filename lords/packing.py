"""Bit-packing of 2-, 3- and 4-bit codes.

Layout: the codes are flattened (row-major) and taken in groups of 8; a group of 8 codes of `bits` bits is one
little-endian word of 8*bits bits stored as `bits` bytes. So 4-bit codes are two per byte (low nibble first),
2-bit codes four per byte, and 3-bit codes are packed densely (8 codes in 3 bytes). The tail is zero-padded.
"""

import torch

from .codebooks import check_bits

GROUP = 8


def packed_size(numel: int, bits: int) -> int:
    return -(-numel // GROUP) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) into a flat uint8 tensor of packed_size(codes.numel(), bits) bytes."""
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) to pack at {bits} bits")
    pad = -flat.numel() % GROUP
    groups = torch.nn.functional.pad(flat, (0, pad)).view(-1, GROUP)
    shifts = torch.arange(GROUP, device=flat.device) * bits
    words = (groups << shifts).sum(dim=1, keepdim=True)
    byte_shifts = torch.arange(bits, device=flat.device) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes of the given shape."""
    check_bits(bits)
    numel = 1
    for size in shape:
        numel *= size
    if packed.numel() != packed_size(numel, bits):
        raise ValueError(
            f"packed codes hold {packed.numel()} bytes, expected {packed_size(numel, bits)} for shape {tuple(shape)} at {bits} bits"
        )
    groups = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (groups << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(GROUP, device=packed.device) * bits
    codes = (words >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8).reshape(shape)
