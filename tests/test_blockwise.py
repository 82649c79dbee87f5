import pytest
import torch

from lords.blockwise import dequantize_blockwise, quantize_blockwise, safe_divide
from lords.codebooks import nf_codebook


@pytest.mark.parametrize("shape", [(16, 128), (33, 256)])
def test_nf4_blockwise_equals_bitsandbytes(shape):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(shape) * 0.02
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    reference = bnb_functional.dequantize_4bit(packed, state)
    codes, absmax = quantize_blockwise(weight, nf_codebook(4), 64)
    ours = dequantize_blockwise(codes, absmax, nf_codebook(4), 64)
    assert torch.allclose(absmax.reshape(-1), state.absmax, atol=0, rtol=1e-6)
    # identical up to float rounding of a level * absmax product
    assert torch.allclose(ours, reference, atol=1e-7, rtol=1e-5)


def test_not_divisible_block_size():
    with pytest.raises(ValueError, match="not divisible by block_size"):
        quantize_blockwise(torch.randn(4, 100), nf_codebook(4), 64)


def test_zero_block_gives_zero_codes_and_no_nan():
    weight = torch.randn(4, 128)
    weight[1, :64] = 0
    codes, absmax = quantize_blockwise(weight, nf_codebook(4), 64)
    out = dequantize_blockwise(codes, absmax, nf_codebook(4), 64)
    assert torch.isfinite(out).all()
    assert torch.all(out[1, :64] == 0)


def test_safe_divide_never_infinite():
    scale = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0])
    out = safe_divide(torch.ones(5), scale)
    assert torch.isfinite(out).all()
    assert out[4] == 0.5
