"""The CUDA gemm4 kernel (lords/kernels/cuda/gemm4.cu, 2 to 128 rows) against float64, on a Hopper GPU with nvcc;
skipped elsewhere.

    TRITON_INTERPRET=0 python -m pytest tests/gpu -q      # python -m benchmarks.gpu_tests writes the summary

Fresh random inputs per call, the output poisoned before each, several calls per case (the blocks that share a row
block meet in the workspace), every M tile size and two M tiles, the workspace checked zero after, other splits than
the default, and CUDA-graph replays.
"""

import pytest
import torch
from layers import HOPPER_ONLY, cuda_kernels_on, poison, random_layer, reference, relative_error  # noqa: F401

pytestmark = [HOPPER_ONLY, pytest.mark.usefixtures("cuda_kernels_on")]

CALLS = 5

# bf16 operands, and the weight rounded twice (the scale tile to bf16, then its product with the level): measured
# 2.7e-3 to 3.0e-3 over every case on the H200 (results/gpu_tests.md of 2026-12-03)
TOLERANCE = 8e-3
# (N, K, rank, rows): Llama-3-8B shapes at the b = 64 parity rank at the row counts a model meets (M tiles of 8,
# 16, 32, 64 and two of 64), then edges: rank 1, 16 (one group) and 128 (the largest), one step of K, N not a
# multiple of the 128-row block, rows not a multiple of 8, a 70B-sized layer
CASES = [(14336, 4096, 49, rows) for rows in (2, 16, 32, 64, 128)] + [
    (4096, 14336, 49, 16), (4096, 4096, 32, 7), (1024, 4096, 12, 33), (384, 128, 1, 5), (2048, 1024, 128, 24),
    (4112, 2048, 16, 100), (640, 3072, 65, 9), (28672, 8192, 99, 16)]


@pytest.mark.parametrize("kind", ["nf", "int"])
@pytest.mark.parametrize("n,k,rank,rows", CASES, ids=[f"{n}x{k}-r{rank}-m{rows}" for n, k, rank, rows in CASES])
def test_gemm4_matches_float64(n, k, rank, rows, kind, record_property):
    from lords.kernels.autotune import processors
    from lords.kernels.cuda import gemm4_config, gemm4_matmul, gemm4_ready
    from lords.kernels.stream_k import workspace, workspace_tensors

    generator = torch.Generator("cuda").manual_seed(n + k + rank + rows)
    codes, packed, codebook, scale_b, scale_a = random_layer(n, k, rank, kind, generator)
    bias = torch.randn(n, device="cuda", generator=generator).bfloat16() if rows % 2 else None
    default = gemm4_config(rows, n, k, rank, processors(torch.device("cuda")))["splits"]
    other = min(k // 128, default + 1)
    fits = other * rows * n <= workspace(torch.device("cuda"))[0].numel()
    worst = 0.0
    for shape in ({}, {"splits": other}) if fits and other != default else ({},):
        for call in range(CALLS):
            x = torch.randn(rows, k, device="cuda", generator=generator).bfloat16()
            assert gemm4_ready(x, 4, packed, scale_b, scale_a)
            poison()
            out = gemm4_matmul(x, packed, codebook, scale_b, scale_a, 4, bias, **shape)
            assert out.shape == (rows, n) and out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
            error = relative_error(out, reference(x, codes, codebook, scale_b, scale_a, bias))
            assert error < TOLERANCE, f"launch {shape}, call {call}: relative error {error:.2e}"
            worst = max(worst, error)
        assert all(bool((tensor == 0).all()) for tensor in workspace_tensors())
    record_property("rel_error", worst)


def test_gemm4_replays_in_a_cuda_graph_and_gives_the_same_bits(record_property):
    from lords.kernels.cuda import gemm4_matmul

    generator = torch.Generator("cuda").manual_seed(1)
    codes, packed, codebook, scale_b, scale_a = random_layer(14336, 4096, 49, "nf", generator)
    x = torch.randn(16, 4096, device="cuda", generator=generator).bfloat16()
    first = gemm4_matmul(x, packed, codebook, scale_b, scale_a, 4)  # compiles outside the capture
    assert all(torch.equal(first, gemm4_matmul(x, packed, codebook, scale_b, scale_a, 4)) for _ in range(20))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm4_matmul(x, packed, codebook, scale_b, scale_a, 4)
    worst = 0.0
    for _ in range(5):
        x.copy_(torch.randn(16, 4096, device="cuda", generator=generator))
        out.fill_(float("nan"))
        graph.replay()
        worst = max(worst, relative_error(out, reference(x, codes, codebook, scale_b, scale_a, None)))
    record_property("rel_error", worst)
    assert worst < TOLERANCE


def test_gemm4_takes_only_what_it_was_built_for():
    from lords.kernels.cuda import gemm4_ready

    generator = torch.Generator("cuda").manual_seed(2)
    _, packed, _, scale_b, scale_a = random_layer(4096, 4096, 32, "nf", generator)

    def rows(m, dtype=torch.bfloat16):
        return torch.randn(m, 4096, device="cuda", dtype=dtype)

    assert gemm4_ready(rows(2), 4, packed, scale_b, scale_a) and gemm4_ready(rows(128), 4, packed, scale_b, scale_a)
    assert not gemm4_ready(rows(1), 4, packed, scale_b, scale_a)  # one row is gemv4's
    assert not gemm4_ready(rows(129), 4, packed, scale_b, scale_a)
    assert not gemm4_ready(rows(16), 3, packed, scale_b, scale_a)  # 4 bits only
    assert not gemm4_ready(rows(16, torch.float16), 4, packed, scale_b.half(), scale_a.half())  # bfloat16 only
    assert not gemm4_ready(rows(16).t().contiguous().t(), 4, packed, scale_b, scale_a)  # contiguous rows only
