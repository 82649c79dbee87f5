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


def _check_packed_shape(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> None:
    rows, in_features = shape
    if tuple(packed.shape) != (rows, row_bytes(in_features, bits)):
        raise ValueError(
            f"packed codes have shape {tuple(packed.shape)}, expected {(rows, row_bytes(in_features, bits))} for "
            f"{rows} x {in_features} codes at {bits} bits"
        )


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of pack_codes: the (n, m) uint8 codes."""
    _check_packed_shape(packed, bits, shape)
    rows, in_features = shape
    width = segment_width(in_features, bits)
    planes = packed.to(torch.int32).reshape(rows, -1, width)
    words = (planes << (8 * torch.arange(planes.shape[1], device=packed.device))[:, None]).sum(1, keepdim=True)
    low_shift, high_shift = _shifts(bits, packed.device)
    if bits == 3:
        segments = ((words >> low_shift[:, None]) & 3) | (((words >> high_shift[:, None]) & 1) << 2)
    else:
        segments = (words >> low_shift[:, None]) & (2**bits - 1)
    return segments.reshape(rows, -1)[:, :in_features].to(torch.uint8)


def packed_columns(packed: torch.Tensor, bits: int, in_features: int, first: int, width: int) -> torch.Tensor:
    """The packed codes of columns [first, first + width) of packed (n, row_bytes(in_features)) codes: a column
    shard of a layer (tensor parallelism). Segments interleave the columns within each byte, so the codes are
    unpacked, sliced and packed again."""
    codes = unpack_codes(packed, bits, (packed.shape[0], in_features))
    return pack_codes(codes[:, first:first + width], bits)


def _lookup_keys(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """(n, groups, 1, width) int64 keys of packed codes into the table of _key_levels. At 2 and 4 bits a byte holds
    the codes of every segment of its column: one group, keyed by the byte. At 3 bits a column's 24-bit word is too
    wide for a table: two groups, segments 0-3 and 4-7, each keyed by its low-bits byte plus its four high bits."""
    planes = packed.view(packed.shape[0], -1, 1, width).long()
    if bits != 3:
        return planes
    high = planes[:, 2:]
    return planes[:, :2] | torch.cat([high & 15, high >> 4], dim=1) << 8


def _key_levels(bits: int, codebook: torch.Tensor) -> torch.Tensor:
    """(segments per group, keys) float32: the level a key gives each segment of its group (the same for both 3-bit
    groups), read from unpack_codes so that the layout stays defined in one place."""
    if bits != 3:
        every_byte = torch.arange(256, device=codebook.device).to(torch.uint8)[:, None]
        codes = unpack_codes(every_byte, bits, (256, SEGMENTS[bits]))
    else:
        key = torch.arange(4096, device=codebook.device)
        low_plane, high_plane = key & 255, key >> 8
        packed = torch.stack([low_plane, torch.zeros_like(key), high_plane], dim=1).to(torch.uint8)
        codes = unpack_codes(packed, bits, (4096, 8))[:, :4]
    return codebook.float()[codes.T.long()]


def unpack_levels(packed: torch.Tensor, bits: int, shape: tuple[int, int], codebook: torch.Tensor) -> torch.Tensor:
    """codebook[unpack_codes(packed, bits, shape)] as float32, (n, m), with one gather from a table of the levels of
    every byte (3 bits: of every 12-bit key), where unpacking the codes and indexing with them took several passes
    over the weight: 4-5x faster on the CPU (a 1536 x 576 layer, one core: 9.8 -> 2.4 ms at 4 bits, 20.9 -> 4.3 ms
    at 3 bits)."""
    _check_packed_shape(packed, bits, shape)
    rows, in_features = shape
    width = segment_width(in_features, bits)
    keys = _lookup_keys(packed, bits, width)
    table = _key_levels(bits, codebook)
    groups, per_group = keys.shape[1], table.shape[0]
    levels = torch.gather(table.expand(rows, groups, *table.shape), 3, keys.expand(rows, groups, per_group, width))
    return levels.view(rows, -1)[:, :in_features]
