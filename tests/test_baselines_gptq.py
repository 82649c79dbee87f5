"""The GPTQ baseline: static absmax groups with error-feedback codes."""

import torch

from lords.baselines.gptq import gptq_blockwise, gptq_blockwise_weight
from lords.blockwise import block_absmax, dequantize_blockwise, expand_blocks
from lords.codebooks import int_codebook, nf_codebook
from lords.factorize import assign_codes
from lords.gptq import output_error


def test_with_an_identity_hessian_it_is_round_to_nearest_with_fp16_absmax_groups():
    weight = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(0))
    codes, absmax = gptq_blockwise(weight, torch.eye(128), nf_codebook(4), 64)
    assert codes.shape == (2, 8, 128) and absmax.shape == (2, 8, 2) and absmax.dtype == torch.float16
    assert torch.equal(absmax, block_absmax(weight, 64).to(torch.float16))
    scale = expand_blocks(absmax.float(), 64)
    assert torch.equal(codes, assign_codes(weight, scale, nf_codebook(4)))


def test_a_group_size_that_does_not_divide_the_width_leaves_a_shorter_last_group():
    """576 columns (the default model's width) in groups of 128: four groups of 128 and one of 64, as in GPTQ."""
    weight = torch.randn(3, 576, generator=torch.Generator().manual_seed(2))
    codes, absmax = gptq_blockwise(weight, torch.eye(576), nf_codebook(4), 128)
    assert codes.shape == (3, 576) and absmax.shape == (3, 5)
    expected = torch.stack([weight[:, i:i + 128].abs().amax(dim=1) for i in range(0, 576, 128)], dim=1)
    assert torch.equal(absmax, expected.to(torch.float16))
    scale = absmax.float().repeat_interleave(128, dim=1)[:, :576]
    assert torch.equal(codes, assign_codes(weight, scale, nf_codebook(4)))
    approx = gptq_blockwise_weight(weight, torch.eye(576), nf_codebook(4), 128)
    torch.testing.assert_close(approx, scale * nf_codebook(4)[codes.long()], rtol=0, atol=0)


def test_error_feedback_lowers_the_output_error_of_rounding_at_every_width():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(16, 128, generator=generator)
    mixing = torch.eye(128) + torch.randn(128, 128, generator=generator) / 12
    inputs = torch.randn(512, 128, generator=generator) @ mixing
    hessian = inputs.T @ inputs / 512
    for codebook in (nf_codebook(3), int_codebook(4)):
        for group_size in (64, 128):
            absmax = block_absmax(weight, group_size).to(torch.float16).float()
            rounded = dequantize_blockwise(assign_codes(weight, expand_blocks(absmax, group_size), codebook), absmax,
                                           codebook, group_size)
            gptq = gptq_blockwise_weight(weight, hessian, codebook, group_size)
            assert output_error(weight, gptq, hessian) < 0.8 * output_error(weight, rounded, hessian)
