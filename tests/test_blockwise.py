import pytest
import torch

from lords.blockwise import (
    block_absmax,
    compute_dtype,
    dequantize_blockwise,
    expand_blocks,
    quantize_blockwise,
    safe_divide,
)
from lords.codebooks import nearest_codes, nf_codebook


@pytest.mark.parametrize("shape", [(16, 128), (33, 256)])
def test_nf4_blockwise_equals_bitsandbytes(shape):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(shape) * 0.02
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    reference = bnb_functional.dequantize_4bit(packed, state)
    codes, absmax = quantize_blockwise(weight, nf_codebook(4), 64)
    ours = dequantize_blockwise(codes, absmax, nf_codebook(4), 64)
    assert torch.equal(absmax.reshape(-1), state.absmax)  # bit-identical
    # bitsandbytes' table differs from ours by up to 4.9e-7 relative: 5.9e-7 measured over 30 seeds
    assert torch.allclose(ours, reference, atol=0, rtol=3e-6)


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


def test_safe_divide_keeps_the_sign_and_a_floor_of_1e_12():
    scale = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0, -4.0], dtype=torch.float64)
    expected = torch.tensor([1e12, -1e12, 1e12, -1e12, 0.5, -0.25], dtype=torch.float64)
    assert torch.equal(safe_divide(torch.ones(6, dtype=torch.float64), scale), expected)
    out = torch.empty(6, dtype=torch.float64)
    assert safe_divide(torch.ones(6, dtype=torch.float64), scale, out=out) is out and torch.equal(out, expected)


@pytest.mark.parametrize("block_size", [0, -32, 48])
def test_block_sizes_that_do_not_tile_a_row_are_refused(block_size):
    with pytest.raises(ValueError, match=f"in_features=128 is not divisible by block_size={block_size}"):
        block_absmax(torch.randn(4, 128), block_size)


def test_absmax_per_block_of_a_stack_and_its_expansion():
    weight = torch.randn(3, 5, 8, dtype=torch.float64)
    absmax = block_absmax(weight, 4)
    assert absmax.shape == (3, 5, 2)
    assert torch.equal(absmax, torch.stack([weight[..., :4].abs().amax(-1), weight[..., 4:].abs().amax(-1)], -1))
    assert torch.equal(block_absmax(weight, 1), weight.abs())
    assert torch.equal(expand_blocks(absmax, 4), absmax.repeat_interleave(4, dim=-1))


@pytest.mark.parametrize("dtype,expected", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_quantization_math_runs_in_float32_or_float64(dtype, expected):
    weight = torch.randn(4, 64).to(dtype)
    codes, absmax = quantize_blockwise(weight, nf_codebook(4), 32)
    assert compute_dtype(weight) == expected and absmax.dtype == expected and codes.dtype == torch.uint8
    reference = nearest_codes(weight.to(expected) / expand_blocks(absmax, 32), nf_codebook(4).to(expected))
    assert torch.equal(codes, reference)
