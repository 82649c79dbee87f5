import pytest
import torch

from lords.codebooks import NF_OFFSET, LevelGrid, get_codebook, int_codebook, level_grid, nearest_codes, nf_codebook


def test_nf4_equals_bitsandbytes_table():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    table = bnb_functional.get_4bit_type("nf4", device="cpu").float()
    assert torch.allclose(nf_codebook(4), table, atol=1e-6, rtol=0)  # bitsandbytes rounds its table: 1.2e-7 measured


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_levels_shape(bits):
    levels = nf_codebook(bits)
    assert levels.numel() == 2**bits
    assert torch.all(levels[1:] > levels[:-1])
    assert levels.max() == 1 and levels.min() == -1
    assert (levels == 0).sum() == 1
    assert (levels > 0).sum() == 2 ** (bits - 1) and (levels < 0).sum() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int_levels(bits):
    half = 2 ** (bits - 1)
    expected = torch.arange(-half, half, dtype=torch.float64) / (half - 1)
    assert torch.allclose(int_codebook(bits).double(), expected, rtol=2e-7, atol=0)  # float32: 4.5e-8 measured


@pytest.mark.parametrize("kind,bits", [("nf", 2), ("nf", 3), ("nf", 4), ("int", 3), ("int", 4)])
def test_nearest_codes_matches_brute_force(kind, bits):
    codebook = get_codebook(kind, bits).double()
    values = torch.randn(37, 53, dtype=torch.float64) * 0.7
    brute = (values[..., None] - codebook).abs().argmin(dim=-1)
    codes = nearest_codes(values, codebook)
    assert codes.dtype == torch.uint8
    # ties are measure-zero for random inputs; compare the achieved distance to be robust anyway
    assert torch.equal((values - codebook[codes.long()]).abs(), (values - codebook[brute]).abs())


@pytest.mark.parametrize("bad", [1, 5, 8, "4"])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="bits must be one of"):
        nf_codebook(bad)


def test_unknown_codebook():
    with pytest.raises(ValueError, match="codebook must be one of"):
        get_codebook("fp4", 4)


@pytest.mark.parametrize("kind,bits", [("nf", 2), ("nf", 3), ("nf", 4), ("int", 2), ("int", 3), ("int", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_codes_equal_bucketize_on_midpoints_and_their_neighbours(kind, bits, dtype):
    """The grid lookup is exact, ties included: values on a midpoint, one ulp either side, far outside the range."""
    codebook = get_codebook(kind, bits).to(dtype)
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    values = torch.cat([
        torch.randn(20_000, dtype=dtype), midpoints, codebook,
        torch.nextafter(midpoints, midpoints + 1), torch.nextafter(midpoints, midpoints - 1),
        torch.tensor([1e12, -1e12, float("inf"), -float("inf"), 0.0, -0.0], dtype=dtype),
    ])
    assert torch.equal(nearest_codes(values, codebook), torch.bucketize(values, midpoints).to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_levels_equal_a_float64_construction(bits):
    """QLoRA's construction in double precision (Python's inverse normal CDF), rounded once to float32."""
    from statistics import NormalDist

    half, inverse_cdf = 2 ** (bits - 1), NormalDist().inv_cdf
    positive = [inverse_cdf(NF_OFFSET + (0.5 - NF_OFFSET) * i / half) for i in range(half)]
    negative = [-inverse_cdf(NF_OFFSET + (0.5 - NF_OFFSET) * i / (half - 1)) for i in range(half - 1)]
    levels = torch.tensor(sorted(positive + [0.0] + negative), dtype=torch.float64)
    assert torch.equal(nf_codebook(bits), (levels / levels.abs().max()).float())


def _separates(codebook, cells) -> bool:
    """LevelGrid's condition on a cell count: at most one midpoint a cell, none within 1% of a cell of an edge."""
    levels = codebook.double()
    position = ((levels[1:] + levels[:-1]) / 2 - levels[0]) / ((levels[-1] - levels[0]) / cells)
    return bool((position.floor().diff() > 0).all() and ((position - position.round()).abs() > 0.01).all())


@pytest.mark.parametrize("kind,bits", [("nf", 2), ("nf", 3), ("nf", 4), ("int", 2), ("int", 3), ("int", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_level_grid_is_the_coarsest_that_separates_the_midpoints(kind, bits, dtype):
    codebook = get_codebook(kind, bits).to(dtype)
    grid = LevelGrid(codebook)  # not the cached one: built here, so the test covers the construction
    levels = codebook.double()
    assert grid.low == levels[0].item()
    # float64 rounding: 1.6e-16 relative at most measured
    assert grid.inverse_width == pytest.approx(grid.cells / (levels[-1] - levels[0]).item(), rel=1e-15)
    assert _separates(codebook, grid.cells)
    assert not any(_separates(codebook, cells) for cells in range(4 * len(codebook), grid.cells))
    starts = levels[0] + (levels[-1] - levels[0]) / grid.cells * torch.arange(grid.cells, dtype=torch.float64)
    assert torch.equal(grid.first_code, torch.bucketize(starts, (levels[1:] + levels[:-1]) / 2).int())
    assert torch.equal(grid.upper_midpoint[:-1], (codebook[1:] + codebook[:-1]) / 2)
    assert grid.upper_midpoint.shape == codebook.shape and grid.upper_midpoint[-1] == float("inf")


def test_a_codebook_without_a_level_grid_is_refused(monkeypatch):
    import lords.codebooks

    monkeypatch.setattr(lords.codebooks, "MAX_GRID_CELLS", 100)  # the search would fail the same way at 2^16
    with pytest.raises(ValueError, match=r"no level grid separates the midpoints of codebook \[0.0, 0.0, 1.0\]"):
        LevelGrid(torch.tensor([0.0, 0.0, 1.0]))


def test_nearest_codes_of_float64_values_on_a_float32_codebook():
    """The codebook takes the values' dtype: float64 values one ulp either side of a midpoint get their own codes."""
    codebook = nf_codebook(4)
    midpoints = (codebook.double()[1:] + codebook.double()[:-1]) / 2
    values = torch.cat([midpoints, torch.nextafter(midpoints, midpoints + 1),
                        torch.nextafter(midpoints, midpoints - 1)])
    assert torch.equal(nearest_codes(values, codebook), torch.bucketize(values, midpoints).to(torch.uint8))
