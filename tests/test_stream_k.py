"""Stream-K work sharing and the workspace through which shared output tiles are summed, under TRITON_INTERPRET=1."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lords.codebooks import get_codebook  # noqa: E402
from lords.kernels import decode_matmul, tiled_matmul  # noqa: E402
from lords.kernels.stream_k import tile_slot, tile_steps, work_share, workspace_tensors  # noqa: E402
from lords.packing import pack_codes  # noqa: E402

if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("kernel tests run under TRITON_INTERPRET=1", allow_module_level=True)


@triton.jit
def _record_shares(slots_ptr, done_ptr, tiles, steps):
    """For each tile this program works on: its slot and the steps it runs, at [tile, program]."""
    units = tiles * steps
    start, end = work_share(units)
    pid = tl.program_id(0)
    for tile in range(start // steps, (end - 1) // steps + 1):
        first, last = tile_steps(tile, start, end, steps)
        tl.store(slots_ptr + tile * tl.num_programs(0) + pid, tile_slot(tile, steps, units))
        tl.store(done_ptr + tile * tl.num_programs(0) + pid, last - first)


@pytest.mark.parametrize("tiles,steps,programs", [(2, 3, 3), (3, 7, 5), (1, 10, 4), (7, 2, 5), (5, 5, 5), (4, 1, 3),
                                                  (13, 64, 30)])
def test_shared_tiles_get_distinct_slots_within_the_grid(tiles, steps, programs):
    slots = torch.full((tiles, programs), -1, dtype=torch.int32)
    done = torch.zeros(tiles, programs, dtype=torch.int32)
    _record_shares[(programs,)](slots, done, tiles, steps)
    assert (done.sum(1) == steps).all()  # every step of every tile is run once
    shared = []
    for tile in range(tiles):
        holders = (done[tile] > 0).nonzero().flatten().tolist()
        assert holders == list(range(holders[0], holders[-1] + 1))  # contiguous shares
        assert set(slots[tile, holders].tolist()) == {holders[0]}  # all agree: the holder of the first unit
        if len(holders) > 1:
            shared.append(holders[0])
    assert len(shared) == len(set(shared)) and all(0 <= slot < programs for slot in shared)


@triton.jit
def _record_share_bounds(bounds_ptr, units):
    start, end = work_share(units)
    tl.store(bounds_ptr + 2 * tl.program_id(0), start)
    tl.store(bounds_ptr + 2 * tl.program_id(0) + 1, end)


def test_shares_of_more_units_than_int32_products_hold():
    # A grouped MoE prefill (2048 tokens at top-8 over 128 experts, each expert's run padded to a whole M tile) has
    # millions of units, and program p times units passed 2^31 in int32: negative shares, an illegal memory access
    # on the H200 (2026-12-03). Shares must be p * units // programs in exact integers.
    units, programs = 6_000_000, 528
    bounds = torch.zeros(programs, 2, dtype=torch.int32)
    _record_share_bounds[(programs,)](bounds, units)
    expected = [[p * units // programs, (p + 1) * units // programs] for p in range(programs)]
    assert bounds.tolist() == expected


@pytest.mark.parametrize("kernel,m", [(decode_matmul, 3), (tiled_matmul, 20)], ids=["decode", "tiled"])
def test_shared_tiles_leave_the_workspace_zero(kernel, m):
    # N = 24 and K = 600 under the interpreter's configs (three programs): decode has 2 tiles of 19 steps, shares of
    # 12-13 steps; tiled has 4 tiles of 10 steps, shares of 13-14. Every tile is summed by two programs.
    generator = torch.Generator().manual_seed(m)
    codes = torch.randint(0, 16, (24, 600), generator=generator, dtype=torch.uint8)
    scale_b, scale_a = torch.rand(24, 3, generator=generator), torch.rand(3, 600, generator=generator)
    x, bias = torch.randn(m, 600, generator=generator), torch.randn(24, generator=generator)
    codebook = get_codebook("nf", 4)
    weight = (scale_b.double() @ scale_a.double()) * codebook.double()[codes.long()]
    expected = x.double() @ weight.T + bias.double()
    outs = [kernel(x, pack_codes(codes, 4), codebook, scale_b, scale_a, 4, bias) for _ in range(2)]
    for out in outs:
        assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6  # 9.0e-8 and 1.2e-7 measured
    assert all((tensor == 0).all() for tensor in workspace_tensors())


def test_one_workspace_per_device_sized_for_every_config():
    """Allocated once per device and never again (a later allocation could fall inside a CUDA graph), so it holds a
    slot per program for every config of both stream-K kernels."""
    from lords.kernels import decode, forward
    from lords.kernels.stream_k import workspace

    sums, counts = workspace(torch.device("cpu"))  # the interpreter's grid: one multiprocessor
    assert workspace(torch.device("cpu"))[0] is sums and workspace(torch.device("cpu"))[1] is counts
    decode_configs = decode.CONFIGS + decode.INTERPRET_CONFIGS
    tiled_configs = forward.TILED_CONFIGS + forward.INTERPRET_TILED
    decode_values = max(c.kwargs["PER_SM"] * c.kwargs["BLOCK_N"] * decode.MAX_ROWS for c in decode_configs)
    tiled_values = max(c.kwargs["PER_SM"] * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in tiled_configs)
    assert sums.numel() == max(decode_values, tiled_values)
    assert counts.numel() == max(c.kwargs["PER_SM"] for c in decode_configs + tiled_configs)
