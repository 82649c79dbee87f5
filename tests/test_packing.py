import pytest
import torch

from lords.packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (16, 64), (3, 5, 11)])
def test_round_trip(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(codes.numel(), bits)
    assert torch.equal(unpack_codes(packed, bits, shape), codes)


def test_three_bit_is_dense():
    assert packed_size(64, 3) == 24  # 3 bits per code, not 4
    assert packed_size(64, 2) == 16 and packed_size(64, 4) == 32


def test_four_bit_layout_low_nibble_first():
    packed = pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.uint8), 4)
    assert packed.tolist() == [0x21, 0x43, 0x65, 0x87]


def test_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_codes(torch.tensor([8]), 3)


def test_rejects_wrong_packed_length():
    packed = pack_codes(torch.zeros(16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(packed, 4, (4, 5))
