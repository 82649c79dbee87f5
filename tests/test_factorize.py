import re

import pytest
import torch

from lords.blockwise import block_absmax, expand_blocks, quantize_blockwise, safe_divide
from lords.codebooks import get_codebook, nearest_codes, nf_codebook
from lords.factorize import (
    LOW_RANK,
    bits_per_weight,
    block_scale_form,
    blockwise_refine,
    lords_quantize,
    parity_rank,
    reconstruct,
    refine_scales,
    relative_error,
    svd_init,
)


def structured_weight(out_features, in_features, seed=0, dtype=torch.float64):
    """Heavy-ish tails and row/column magnitude structure, like trained LLM weights."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.rand(out_features, 1, generator=generator, dtype=dtype) + 0.5
    cols = torch.rand(1, in_features, generator=generator, dtype=dtype) + 0.5
    weight = torch.randn(out_features, in_features, generator=generator, dtype=dtype) * rows * cols
    weight[:, :3] *= 6
    return weight


def test_parity_rank_matches_spec_examples():
    assert [parity_rank(4096, 4096, 128), parity_rank(1024, 4096, 128), parity_rank(14336, 4096, 128)] == [16, 6, 24]
    assert [parity_rank(4096, 4096, 64), parity_rank(1024, 4096, 64), parity_rank(14336, 4096, 64)] == [32, 12, 49]
    assert parity_rank(8, 8, 128) == 1


def test_bits_per_weight_at_parity_is_bits_plus_16_over_b():
    rank = parity_rank(4096, 4096, 128)
    assert bits_per_weight(4096, 4096, 4, rank) == 4 + 16 / 128  # bit-identical: 4.125 is exact in binary


def test_svd_init_is_best_rank_r_approximation_of_block_scales():
    weight = structured_weight(40, 256)
    block_size, rank = 32, 3
    scale_b, scale_a = svd_init(weight, block_size, rank)
    dense = expand_blocks(block_absmax(weight, block_size), block_size)
    u, s, vh = torch.linalg.svd(dense)
    reference = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert scale_b.shape == (40, rank) and scale_a.shape == (rank, 256)
    assert torch.allclose(scale_b @ scale_a, reference, atol=5e-12, rtol=0)  # measured 7.4e-13 (9.0e-13 on one thread)
    # the singular values are split evenly between B and A
    assert torch.allclose(scale_b.norm(dim=0), scale_a.norm(dim=1), rtol=3e-15, atol=0)  # measured 5.3e-16


def test_svd_init_exact_when_rank_allows():
    weight = structured_weight(24, 128)
    block_size = 32  # 4 blocks, so rank(S_blk) <= 4
    scale_b, scale_a = svd_init(weight, block_size, rank=4)
    dense = expand_blocks(block_absmax(weight, block_size), block_size)
    assert torch.allclose(scale_b @ scale_a, dense, atol=2e-14, rtol=0)  # measured 3.6e-15 (one ulp at 18.8)


def test_svd_init_rank_above_block_count_pads_without_changing_product():
    weight = structured_weight(24, 128)
    scale_b, scale_a = svd_init(weight, 32, rank=7)
    dense = expand_blocks(block_absmax(weight, 32), 32)
    assert scale_b.shape == (24, 7) and scale_a.shape == (7, 128)
    assert torch.allclose(scale_b @ scale_a, dense, atol=2e-14, rtol=0)  # measured 3.6e-15, as without the padding
    assert torch.all(scale_b[:, 4:] == 0) and torch.all(scale_a[4:] != 0)


def test_exact_init_reproduces_block_scales_of_width_m_over_r():
    weight = structured_weight(30, 96)
    rank = 5  # 96 / 5 is not an integer: blocks of 20 and 19
    scale_b, scale_a = svd_init(weight, block_size=64, rank=rank, exact=True)
    sizes = [c.numel() for c in torch.arange(96).tensor_split(rank)]
    block_scale = torch.stack([c.abs().amax(-1) for c in weight.split(sizes, -1)], -1)
    dense = block_scale.repeat_interleave(torch.tensor(sizes), dim=-1)
    assert torch.allclose(scale_b @ scale_a, dense, atol=5e-14, rtol=0)  # measured 7.1e-15


def test_quantize_at_exact_rank_init_equals_blockwise_rtn():
    weight = structured_weight(16, 128)
    codebook = nf_codebook(4).double()
    factors = lords_quantize(weight, codebook, 32, rank=4, steps=0, scale_dtype=torch.float64)
    codes, absmax = quantize_blockwise(weight, codebook, 32)
    blockwise = expand_blocks(absmax, 32) * codebook[codes.long()]
    ours = reconstruct(factors.scale_b @ factors.scale_a, factors.codes, codebook)
    assert torch.allclose(ours, blockwise, atol=1e-13, rtol=0)  # measured 1.4e-14


@pytest.mark.parametrize("kind,bits", [("nf", 4), ("nf", 3), ("nf", 2), ("int", 4)])
def test_refinement_never_ends_worse_and_usually_improves(kind, bits):
    weight = structured_weight(48, 256, seed=bits).float()
    codebook = get_codebook(kind, bits)
    rank = parity_rank(48, 256, 64)
    factors = lords_quantize(weight, codebook, 64, rank, steps=60, scale_dtype=torch.float32)
    assert factors.error <= factors.error_init + 1e-6
    assert factors.error < 0.97 * factors.error_init
    approx = reconstruct(factors.scale_b @ factors.scale_a, factors.codes, codebook)
    assert torch.equal(relative_error(weight, approx), factors.error)  # bit-identical: the same float32 arithmetic


def test_activation_aware_objective_lowers_weighted_error():
    weight = structured_weight(32, 128, seed=3).float()
    channel_weight = torch.rand(128) ** 4 * 100
    codebook = nf_codebook(3)
    plain = lords_quantize(weight, codebook, 32, 2, steps=80, scale_dtype=torch.float32)
    aware = lords_quantize(weight, codebook, 32, 2, steps=80, channel_weight=channel_weight, scale_dtype=torch.float32)
    plain_weighted = relative_error(
        weight, reconstruct(plain.scale_b @ plain.scale_a, plain.codes, codebook), channel_weight
    )
    assert aware.error < plain_weighted
    # the reported error is the channel-weighted one (bit-identical: the same arithmetic; unweighted it is 0.157)
    aware_weighted = relative_error(weight, reconstruct(aware.scale_b @ aware.scale_a, aware.codes, codebook),
                                    channel_weight)
    assert torch.equal(aware.error, aware_weighted)


def test_batched_equals_one_by_one():
    weights = torch.stack([structured_weight(24, 128, seed=s).float() for s in range(3)])
    codebook = nf_codebook(4)
    batched = lords_quantize(weights, codebook, 32, 2, steps=15)
    for i in range(3):  # each layer in its own units (refine_scales): the results are bit-identical
        single = lords_quantize(weights[i], codebook, 32, 2, steps=15)
        for field in ("scale_b", "scale_a", "codes", "error_init", "error"):
            assert torch.equal(getattr(single, field), getattr(batched, field)[i]), field


def test_deterministic_given_seed():
    weight = structured_weight(24, 128).float()
    first = lords_quantize(weight, nf_codebook(4), 32, 6, steps=10, seed=7)
    second = lords_quantize(weight, nf_codebook(4), 32, 6, steps=10, seed=7)
    assert torch.equal(first.scale_b, second.scale_b) and torch.equal(first.codes, second.codes)


def test_blockwise_refine_never_worse_than_rtn():
    weight = structured_weight(32, 256, seed=5).float()
    codebook = nf_codebook(3)
    codes, absmax = quantize_blockwise(weight, codebook, 64)
    rtn = relative_error(weight, expand_blocks(absmax, 64) * codebook[codes.long()])
    codes, block_scale = blockwise_refine(weight, codebook, 64, steps=40)
    refined = relative_error(weight, expand_blocks(block_scale, 64) * codebook[codes.long()])
    assert refined < rtn


def test_blockwise_refine_weights_the_channels_of_each_layer():
    """A stack of two layers, each with its own channel weights: the weighted error is lower than when refining
    without them (measured 0.90x and 0.78x)."""
    weights = torch.stack([structured_weight(32, 128, seed=s).float() for s in (0, 10)])
    channel_weight = torch.rand(2, 128, generator=torch.Generator().manual_seed(0)) ** 4 * 100
    codebook = nf_codebook(3)
    errors = []
    for given in (None, channel_weight):
        codes, block_scale = blockwise_refine(weights, codebook, 32, 40, lr=0.1, channel_weight=given,
                                              scale_dtype=torch.float32)
        assert codes.shape == (2, 32, 128) and block_scale.shape == (2, 32, 4)
        errors.append(relative_error(weights, expand_blocks(block_scale, 32) * codebook[codes.long()], channel_weight))
    assert torch.all(errors[1] < 0.95 * errors[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rejects_non_finite_weights(bad):
    weight = torch.randn(8, 64)
    weight[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        lords_quantize(weight, nf_codebook(4), 32, 1, steps=0)


def test_zero_weight_gives_finite_output():
    weight = torch.zeros(8, 64)
    weight[0, 0] = 1.0
    factors = lords_quantize(weight, nf_codebook(4), 32, 2, steps=5)
    for tensor in (factors.scale_b, factors.scale_a, factors.error):
        assert torch.isfinite(tensor.float()).all()


def _autograd_refinement(weight, codebook, scale_b, scale_a, steps, lr, channel_weight):
    """The refinement as autograd computes it (the implementation before the hand-written gradient)."""
    units = [p.pow(2).mean(dim=(1, 2), keepdim=True).sqrt() for p in (scale_b, scale_a)]
    normalized = [(p / unit).requires_grad_(True) for p, unit in zip((scale_b, scale_a), units)]
    optimizer = torch.optim.Adam(normalized, lr=lr)
    losses = []
    for step in range(steps + 1):
        scale = (normalized[0] * units[0]) @ (normalized[1] * units[1])
        codes = nearest_codes(safe_divide(weight, scale.detach()), codebook)
        loss = relative_error(weight, reconstruct(scale, codes, codebook), channel_weight).pow(2)
        losses.append(loss.detach())
        if step == steps:
            break
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    return torch.stack(losses)


def test_refinement_follows_the_autograd_reference_in_float64():
    """The hand-written gradient of refine_scales against autograd's: in float64 the trajectories agree to a few
    ulp after 20 steps, so the best loss does too."""
    torch.manual_seed(0)
    weight = torch.randn(3, 48, 128, dtype=torch.float64)
    channels = torch.rand(3, 128, dtype=torch.float64) + 0.5
    codebook = nf_codebook(4).double()
    scale_b, scale_a = svd_init(weight, 32, 4)
    reference = _autograd_refinement(weight, codebook, scale_b, scale_a, 20, 0.1, channels)
    # refine_scales' default lr is 0.1
    _, start, best = refine_scales(weight, codebook, [scale_b, scale_a], LOW_RANK, 20, channel_weight=channels)
    # measured 2.3e-16 (start) and 0 (best); with one thread or without SIMD, 0 and 3.9e-16: the same float64
    # arithmetic in another order
    torch.testing.assert_close(start.pow(2), reference[0], rtol=2e-15, atol=0)
    torch.testing.assert_close(best.pow(2), reference.min(dim=0).values, rtol=2e-15, atol=0)


def test_refinement_reports_progress_in_layer_steps():
    weight = torch.randn(5, 16, 64)
    calls = []
    lords_quantize(weight, nf_codebook(4), 32, 2, steps=7, progress=calls.append)
    assert calls == [5] * 7


def test_relative_error_against_its_definition_at_any_magnitude():
    """||W - W_hat||_h / ||W||_h in float64, for weights far below 1 (the 1e-30 floor only guards an all-zero W)."""
    weight = structured_weight(8, 64) * 1e-4
    approx = weight + torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e-5
    channels = torch.rand(64, dtype=torch.float64) + 0.1
    expected = ((weight - approx).pow(2) * channels).sum().sqrt() / (weight.pow(2) * channels).sum().sqrt()
    # measured 1.6e-16 both (one ulp): the same sums in another order
    torch.testing.assert_close(relative_error(weight, approx, channels), expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(relative_error(weight, approx), (weight - approx).norm() / weight.norm(), rtol=1e-15,
                               atol=0)
    assert relative_error(torch.zeros(4, 8), torch.zeros(4, 8)) == 0


def test_padding_directions_start_from_the_seed_at_a_hundredth_of_the_scales_rms():
    weight = structured_weight(24, 128)
    scale_b, scale_a = svd_init(weight, 32, rank=7)  # 4 blocks: 3 directions past the singular values
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 3, 128, generator=generator, dtype=torch.float64)[0]
    assert scale_a.dtype == torch.float64
    assert torch.equal(scale_a[4:], noise * scale_a[:4].pow(2).mean().sqrt() * 1e-2)
    assert not torch.equal(svd_init(weight, 32, rank=7, seed=1)[1][4:], scale_a[4:])
    # lords_quantize starts from the init with its seed, 0 unless given: with no steps its scales are the init's
    default = lords_quantize(weight, nf_codebook(4), 32, 7, steps=0, scale_dtype=torch.float64)
    seeded = lords_quantize(weight, nf_codebook(4), 32, 7, steps=0, scale_dtype=torch.float64, seed=7)
    assert torch.equal(default.scale_a, scale_a) and torch.equal(seeded.scale_a, svd_init(weight, 32, 7, seed=7)[1])


def test_exact_init_takes_a_rank_up_to_the_width():
    weight = structured_weight(8, 16)
    scale_b, scale_a = svd_init(weight, 64, rank=16, exact=True)  # one column a block: S_blk = |W|
    torch.testing.assert_close(scale_b @ scale_a, weight.abs(), rtol=0, atol=3e-14)  # measured 5.3e-15


@pytest.mark.parametrize("call,message", [
    (lambda: svd_init(torch.randn(8, 64), 32, 0), "rank must be >= 1, got 0"),
    (lambda: svd_init(torch.randn(8, 16), 64, 17, exact=True), "exact init needs rank <= in_features=16, got rank=17"),
    (lambda: lords_quantize(torch.randn(64), nf_codebook(4), 32, 1),
     "weight must be (out, in) or (layers, out, in), got shape (64,)"),
    (lambda: lords_quantize(torch.randn(1, 2, 8, 64), nf_codebook(4), 32, 1),
     "weight must be (out, in) or (layers, out, in), got shape (1, 2, 8, 64)"),
    (lambda: lords_quantize(torch.full((8, 64), float("nan")), nf_codebook(4), 32, 1),
     "weight contains NaN or Inf values; refusing to quantize it"),
    (lambda: lords_quantize(torch.randn(8, 64), nf_codebook(4), 32, 1, channel_weight=torch.full((64,), float("inf"))),
     "channel_weight contains NaN or Inf values"),
    (lambda: refine_scales(torch.randn(8, 64), nf_codebook(4), [torch.ones(8, 2)], block_scale_form(32), 1),
     "weight must be a stack (layers, out, in), got shape (8, 64)"),
])
def test_refusals_name_the_problem(call, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()


def test_reconstruct_in_the_scales_dtype():
    scale = torch.rand(4, 8) + 0.5
    codes = torch.randint(0, 16, (4, 8), dtype=torch.uint8)
    out = reconstruct(scale, codes, nf_codebook(4).double())
    assert out.dtype == torch.float32 and torch.equal(out, scale * nf_codebook(4)[codes.long()])


def test_half_precision_weights_are_quantized_as_float32():
    weight = structured_weight(16, 128, seed=2).to(torch.bfloat16)
    ours, reference = (lords_quantize(w, nf_codebook(4), 32, 2, steps=5) for w in (weight, weight.float()))
    for field in ("scale_b", "scale_a", "codes", "error_init", "error"):
        assert torch.equal(getattr(ours, field), getattr(reference, field)), field
    ours, reference = (blockwise_refine(w, nf_codebook(4), 32, steps=5) for w in (weight, weight.float()))
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])


def test_stored_scales_are_bfloat16_by_default_and_errors_in_the_compute_dtype():
    weight = structured_weight(16, 128, seed=4).float()
    channel_weight = torch.rand(128, dtype=torch.float64)  # the compute dtype is the weight's, not this one's
    factors = lords_quantize(weight, nf_codebook(4), 32, 2, steps=3, channel_weight=channel_weight)
    assert factors.scale_b.dtype == factors.scale_a.dtype == torch.bfloat16
    assert factors.error.dtype == factors.error_init.dtype == torch.float32
    codes, block_scale = blockwise_refine(weight, nf_codebook(4), 32, steps=3)
    assert codes.shape == (16, 128) and codes.dtype == torch.uint8
    assert block_scale.shape == (16, 4) and block_scale.dtype == torch.bfloat16
    codes, block_scale = blockwise_refine(weight[None].expand(2, -1, -1), nf_codebook(4), 32, steps=3)
    assert codes.shape == (2, 16, 128) and block_scale.shape == (2, 16, 4)


def test_default_refinement_runs_500_steps():
    calls = []
    lords_quantize(torch.randn(8, 32), nf_codebook(4), 32, 1, progress=calls.append)
    assert calls == [1] * 500


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_blockwise_refine_gives_a_zero_block_the_zero_level_in_every_scale_dtype(scale_dtype):
    """A zero block keeps a zero scale; the codes are assigned with it widened to float32, whose 1e-12 floor (0 in
    float16) keeps 0 / S finite."""
    weight = structured_weight(4, 64).float()
    weight[1, :32] = 0
    codebook = nf_codebook(4)
    codes, block_scale = blockwise_refine(weight, codebook, 32, steps=5, scale_dtype=scale_dtype)
    assert block_scale[1, 0] == 0 and torch.all(codebook[codes[1, :32].long()] == 0)


def test_svd_init_of_half_precision_weights_runs_in_float32():
    weight = structured_weight(16, 128).to(torch.bfloat16)
    for ours, reference in zip(svd_init(weight, 32, 2), svd_init(weight.float(), 32, 2)):
        assert ours.dtype == torch.float32 and torch.equal(ours, reference)


def test_quantize_passes_exact_init_on():
    weight = structured_weight(30, 96)  # 64 does not divide 96: only the exact init (blocks of 20 and 19) accepts it
    factors = lords_quantize(weight, nf_codebook(4), 64, 5, steps=0, exact_init=True, scale_dtype=torch.float64)
    scale_b, scale_a = svd_init(weight, 64, 5, exact=True)
    assert torch.equal(factors.scale_b, scale_b) and torch.equal(factors.scale_a, scale_a)


def test_batched_with_channel_weights_equals_one_by_one():
    weights = torch.stack([structured_weight(24, 128, seed=s).float() for s in range(2)])
    channel_weight = torch.rand(2, 128, generator=torch.Generator().manual_seed(0)) + 0.1
    batched = lords_quantize(weights, nf_codebook(4), 32, 2, steps=10, channel_weight=channel_weight)
    for i in range(2):  # each layer with its own row of channel weights: bit-identical, as without them
        single = lords_quantize(weights[i], nf_codebook(4), 32, 2, steps=10, channel_weight=channel_weight[i])
        for field in ("scale_b", "scale_a", "codes", "error_init", "error"):
            assert torch.equal(getattr(single, field), getattr(batched, field)[i]), field


def test_refinement_runs_in_the_weights_dtype_whatever_the_codebook_and_channel_weights_dtype():
    weight = structured_weight(16, 64, seed=6).float()[None]
    channel_weight = torch.rand(1, 64, dtype=torch.float64) + 0.1
    scale_b, scale_a = svd_init(weight, 32, 2)
    ours = refine_scales(weight, nf_codebook(4).double(), [scale_b, scale_a], LOW_RANK, 5,
                         channel_weight=channel_weight)
    reference = refine_scales(weight, nf_codebook(4), [scale_b, scale_a], LOW_RANK, 5,
                              channel_weight=channel_weight.float())
    for got, expected in zip([*ours[0], *ours[1:]], [*reference[0], *reference[1:]]):
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_errors_are_relative_for_weights_far_below_1():
    """||W||^2 = 2.6e-5 here: the errors are relative to it (the 1e-30 floor only guards an all-zero layer)."""
    weight = structured_weight(16, 64, seed=8) * 1e-4
    codebook = nf_codebook(4).double()
    factors = lords_quantize(weight, codebook, 32, 2, steps=0, scale_dtype=torch.float64)
    scale = factors.scale_b @ factors.scale_a
    expected = relative_error(weight, reconstruct(scale, nearest_codes(weight / scale, codebook), codebook))
    # bit-identical: the same float64 arithmetic
    assert torch.equal(factors.error_init, expected) and torch.equal(factors.error, expected)
