import pytest
import torch

from lords.codebooks import get_codebook
from lords.packing import pack_codes, packed_columns, row_bytes, unpack_codes, unpack_levels


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (16, 64), (3, 11)])
def test_round_trip(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (shape[0], row_bytes(shape[1], bits))
    unpacked = unpack_codes(packed, bits, shape)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (16, 64), (5, 200)])
def test_unpack_levels_equals_indexing_the_codebook_with_the_codes(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    codebook = get_codebook("nf", bits)
    levels = unpack_levels(pack_codes(codes, bits), bits, shape, codebook)
    assert levels.dtype == torch.float32 and tuple(levels.shape) == shape
    assert torch.equal(levels, codebook[codes.long()])


def test_three_bit_is_dense():
    assert row_bytes(64, 3) == 24  # 3 bits per code, not 4
    assert row_bytes(64, 2) == 16 and row_bytes(64, 4) == 32


def test_four_bit_layout_pairs_the_two_halves_of_a_row():
    packed = pack_codes(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8), 4)
    assert packed.tolist() == [[0x51, 0x62, 0x73, 0x84]]  # byte j: column j (low nibble), column 4 + j (high)


def test_three_bit_layout_keeps_high_bits_in_their_own_plane():
    # 8 columns, one per segment: codes 0..7; low two bits at bit 2s of planes 0-1, the high bit at bit s of plane 2
    packed = pack_codes(torch.arange(8, dtype=torch.uint8)[None], 3)
    low = sum((code & 3) << (2 * code) for code in range(8))
    high = sum((code >> 2) << code for code in range(8))
    assert packed.tolist() == [[low & 255, low >> 8, high]]


def test_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_codes(torch.tensor([[8]]), 3)


def test_rejects_a_flat_tensor():
    with pytest.raises(ValueError, match="matrix"):
        pack_codes(torch.zeros(16, dtype=torch.uint8), 4)


def test_rejects_wrong_packed_shape():
    packed = pack_codes(torch.zeros(4, 4, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(packed, 4, (4, 5))
    with pytest.raises(ValueError, match=r"packed codes have shape \(4, 2\), expected \(4, 3\)"):
        unpack_levels(packed, 4, (4, 5), get_codebook("nf", 4))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_columns_are_the_packed_codes_of_those_columns(bits):
    codes = torch.randint(0, 2**bits, (5, 70), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    for first, width in ((0, 70), (0, 35), (35, 35), (13, 22)):
        assert torch.equal(packed_columns(pack_codes(codes, bits), bits, 70, first, width),
                           pack_codes(codes[:, first:first + width], bits))
