"""Bit-packing of 2-, 3- and 4-bit codes, in the layout the kernels read.

Each row of an (n, m) code matrix is cut into SEGMENTS[bits] segments of S = ceil(m / SEGMENTS) columns (the last
one zero-padded), and byte column j of the packed row holds the codes of columns j, S + j, 2S + j, ... side by side:

- 4 bits: 2 segments, byte j = code[j] | code[S + j] << 4                      (n, S) bytes
- 2 bits: 4 segments, byte j = code[j] | code[S + j] << 2 | ... << 4 | ... << 6  (n, S) bytes
- 3 bits: 8 segments; the 24-bit word of column j (bits 2s: low two bits of segment s, bit 16 + s: its high bit)
  is stored as three byte planes [word & 255 | word >> 8 & 255 | word >> 16], each S wide: (n, 3S) bytes.

So a kernel loads a contiguous (rows x BLOCK) byte tile with wide loads and gets SEGMENTS column tiles out of it with
shifts alone, no interleaving of registers; every kernel then works segment by segment.
"""

import torch

from .codebooks import check_bits

SEGMENTS = {2: 4, 3: 8, 4: 2}


def segment_width(in_features: int, bits: int) -> int:
    check_bits(bits)
    return -(-in_features // SEGMENTS[bits])


def row_bytes(in_features: int, bits: int) -> int:
    return segment_width(in_features, bits) * SEGMENTS[bits] * bits // 8


def _shifts(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where segment s keeps its low bits and (3 bits only) its high bit inside the word of a byte column."""
    segments = torch.arange(SEGMENTS[bits], device=device)
    return segments * (2 if bits == 3 else bits), 16 + segments


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack an (n, m) matrix of integer codes in [0, 2^bits) into (n, row_bytes(m, bits)) uint8."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_codes takes an (n, m) matrix of codes, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.int32)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) to pack at {bits} bits")
    rows, in_features = codes.shape
    width = segment_width(in_features, bits)
    segments = torch.nn.functional.pad(codes, (0, width * SEGMENTS[bits] - in_features)).view(rows, -1, width)
    low_shift, high_shift = _shifts(bits, codes.device)
    if bits == 3:
        words = ((segments & 3) << low_shift[:, None]).sum(1) | ((segments >> 2) << high_shift[:, None]).sum(1)
    else:
        words = (segments << low_shift[:, None]).sum(1)
    planes = [(words >> (8 * plane)) & 0xFF for plane in range(row_bytes(in_features, bits) // width)]
    return torch.cat(planes, dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of pack_codes: the (n, m) uint8 codes."""
    rows, in_features = shape
    if tuple(packed.shape) != (rows, row_bytes(in_features, bits)):
        raise ValueError(
            f"packed codes have shape {tuple(packed.shape)}, expected {(rows, row_bytes(in_features, bits))} for "
            f"{rows} x {in_features} codes at {bits} bits"
        )
    width = segment_width(in_features, bits)
    planes = packed.to(torch.int32).reshape(rows, -1, width)
    words = (planes << (8 * torch.arange(planes.shape[1], device=packed.device))[:, None]).sum(1, keepdim=True)
    low_shift, high_shift = _shifts(bits, packed.device)
    if bits == 3:
        segments = ((words >> low_shift[:, None]) & 3) | (((words >> high_shift[:, None]) & 1) << 2)
    else:
        segments = (words >> low_shift[:, None]) & (2**bits - 1)
    return segments.reshape(rows, -1)[:, :in_features].to(torch.uint8)
