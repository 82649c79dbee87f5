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
