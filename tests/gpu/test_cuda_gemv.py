"""The CUDA gemv4 kernel (lords/kernels/cuda/gemv4.cu) against float64, on a Hopper GPU with nvcc; skipped elsewhere.

    TRITON_INTERPRET=0 python -m pytest tests/gpu -q      # python -m benchmarks.gpu_tests writes the summary

Fresh random inputs per case, the output poisoned before each call, 20 calls per case (the blocks that share a row
block meet in the workspace: a missed partial sum shows in some call), the workspace checked zero after, every
launch shape the benchmarks time, and CUDA-graph replays.
"""

import pytest
import torch
from layers import HOPPER_ONLY, cuda_kernels_on, poison, random_layer, reference, relative_error  # noqa: F401

pytestmark = [HOPPER_ONLY, pytest.mark.usefixtures("cuda_kernels_on")]

CALLS = 20

# bf16 operands round the levels (NF), x * A and the output to 8 significant bits, float32 accumulation; the Triton
# kernels measured up to 2.4e-3 on the same cases (results/gpu_tests.md).
TOLERANCE = 6e-3
# (N, K, rank): Llama-3-8B and 70B layer shapes at the b = 64 parity rank, then edges: one 16-row tile, the smallest
# K (one step), rank 1, rank 128 (the largest), ranks at and just over a multiple of 8, N not a multiple of a block
SHAPES = [(14336, 4096, 49), (4096, 14336, 49), (4096, 4096, 32), (1024, 4096, 12), (28672, 8192, 99),
          (16, 1024, 17), (384, 128, 5), (1008, 512, 1), (2048, 1024, 128), (640, 3072, 65), (4112, 2048, 33),
          (8192, 8192, 64)]


def launch_shapes(n, k, rank):
    """The default launch and the others benchmarks.cuda_gemv may time: 4 warps a block, splits halved and
    doubled."""
    from lords.kernels.autotune import processors
    from lords.kernels.cuda import config

    default = config(n, k, rank, processors(torch.device("cuda")))
    shapes = [{}, {"warps": 4}]
    for splits in (default["splits"] // 2, default["splits"] * 2):
        if 1 <= splits <= k // 128 and splits != default["splits"]:
            shapes.append({"splits": splits})
    return shapes


@pytest.mark.parametrize("kind", ["nf", "int"])
@pytest.mark.parametrize("n,k,rank", SHAPES, ids=[f"{n}x{k}-r{rank}" for n, k, rank in SHAPES])
def test_gemv4_matches_float64(n, k, rank, kind, record_property):
    from lords.kernels.cuda import gemv4_matmul, gemv4_ready
    from lords.kernels.stream_k import workspace_tensors

    generator = torch.Generator("cuda").manual_seed(n + k + rank)
    codes, packed, codebook, scale_b, scale_a = random_layer(n, k, rank, kind, generator)
    bias = torch.randn(n, device="cuda", generator=generator).bfloat16() if rank % 2 else None
    worst = 0.0
    for shape in launch_shapes(n, k, rank):
        for call in range(CALLS):
            x = torch.randn(1, k, device="cuda", generator=generator).bfloat16()
            assert gemv4_ready(x, 4, packed, scale_b, scale_a)
            poison()
            out = gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4, bias, **shape)
            assert out.shape == (1, n) and out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
            error = relative_error(out, reference(x, codes, codebook, scale_b, scale_a, bias))
            assert error < TOLERANCE, f"launch {shape}, call {call}: relative error {error:.2e}"
            worst = max(worst, error)
        assert all(bool((tensor == 0).all()) for tensor in workspace_tensors())
    record_property("rel_error", worst)


@pytest.mark.parametrize("n,k,rank", [(14336, 4096, 49), (4112, 2048, 33)])
def test_gemv4_replays_in_a_cuda_graph(n, k, rank, record_property):
    from lords.kernels.cuda import gemv4_matmul

    generator = torch.Generator("cuda").manual_seed(1)
    codes, packed, codebook, scale_b, scale_a = random_layer(n, k, rank, "nf", generator)
    x = torch.randn(1, k, device="cuda", generator=generator).bfloat16()
    gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4)
    worst = 0.0
    for _ in range(5):
        x.copy_(torch.randn(1, k, device="cuda", generator=generator))
        out.fill_(float("nan"))
        graph.replay()
        worst = max(worst, relative_error(out, reference(x, codes, codebook, scale_b, scale_a, None)))
    record_property("rel_error", worst)
    assert worst < TOLERANCE


def test_gemv4_gives_the_same_bits_every_call():
    """The splits' partial sums are added in split order by whichever block arrives last: no call-to-call noise."""
    from lords.kernels.cuda import gemv4_matmul

    generator = torch.Generator("cuda").manual_seed(3)
    _, packed, codebook, scale_b, scale_a = random_layer(4096, 14336, 49, "int", generator)
    x = torch.randn(1, 14336, device="cuda", generator=generator).bfloat16()
    first = gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4)
    assert all(torch.equal(first, gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4)) for _ in range(50))


def test_gemv4_takes_only_what_it_was_built_for(monkeypatch):
    import lords.kernels.cuda
    from lords.kernels.cuda import gemv4_matmul, gemv4_ready

    generator = torch.Generator("cuda").manual_seed(2)
    _, packed, codebook, scale_b, scale_a = random_layer(4096, 4096, 32, "nf", generator)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert gemv4_ready(x, 4, packed, scale_b, scale_a)
    with pytest.raises(ValueError, match="^the CUDA gemv4 kernel is built for blocks of 4 or 8 warps, not 6$"):
        gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4, warps=6)
    with monkeypatch.context() as off:
        off.setattr(lords.kernels.cuda, "ENABLED", False)
        assert not gemv4_ready(x, 4, packed, scale_b, scale_a)  # LORDS_CUDA=0
    assert not gemv4_ready(x, 3, packed, scale_b, scale_a)  # 4 bits only
    assert not gemv4_ready(torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16), 4, packed, scale_b, scale_a)
    assert not gemv4_ready(x.half(), 4, packed, scale_b.half(), scale_a.half())  # bfloat16 only
    assert not gemv4_ready(x, 4, packed, scale_b.float(), scale_a)
    _, packed, _, scale_b, scale_a = random_layer(4096, 4096 + 64, 32, "nf", generator)  # K not a multiple of 128
    assert not gemv4_ready(torch.randn(1, 4096 + 64, device="cuda", dtype=torch.bfloat16), 4, packed, scale_b, scale_a)
    _, packed, _, scale_b, scale_a = random_layer(256, 256, 129, "nf", generator)  # rank over 128
    assert not gemv4_ready(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), 4, packed, scale_b, scale_a)
