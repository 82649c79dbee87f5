"""The Gluon gemv kernel (lords/kernels/gluon/gemv.py) against float64, on a Hopper GPU; skipped elsewhere.

    TRITON_INTERPRET=0 python -m pytest tests/gpu -q      # python -m benchmarks.gpu_tests writes the summary

Fresh random inputs per case, the output poisoned before each call, 20 calls per case (the programs that share a row
tile meet in the stream-K workspace: a missed partial sum shows in some call), the workspace checked zero after, and
CUDA-graph replays.
"""

import os

import pytest
import torch
from layers import poison, random_layer, reference, relative_error

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    or torch.cuda.get_device_capability() != (9, 0),
    reason="the Gluon kernels need a Hopper GPU (sm_90) and no Triton interpreter")

CALLS = 20


@pytest.fixture(autouse=True)
def gluon_on(monkeypatch):
    """The Gluon kernels are opt-in (LORDS_GLUON=1); these tests turn them on."""
    import lords.kernels.gluon

    monkeypatch.setattr(lords.kernels.gluon, "ENABLED", True)
# bf16 operands round the levels times x and A to 8 significant bits; the float32 accumulation adds little: the
# H200 run measured 1.7e-3 to 2.4e-3 (results/gpu_tests.md), the Triton kernels up to 2.4e-3
# (results/kernel_configs.md).
TOLERANCE = {torch.bfloat16: 6e-3}
# (N, K, rank): Llama-3-8B and 70B layer shapes at the b = 64 parity rank, then edges: N not a multiple of the
# 128-row tile, fewer rows than one tile, the smallest K (two K steps), rank 1 and the largest rank, ranks at and
# just over a power of two
SHAPES = [(14336, 4096, 49), (4096, 14336, 49), (4096, 4096, 32), (1024, 4096, 12), (8192, 8192, 64),
          (4100, 2048, 33), (64, 1024, 17), (384, 128, 5), (1000, 512, 1), (2048, 1024, 128), (640, 3072, 65)]


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
@pytest.mark.parametrize("kind", ["nf", "int"])
@pytest.mark.parametrize("n,k,rank", SHAPES, ids=[f"{n}x{k}-r{rank}" for n, k, rank in SHAPES])
def test_gemv_matches_float64(n, k, rank, kind, dtype, record_property):
    from lords.kernels import gemv_matmul, gemv_ready
    from lords.kernels.stream_k import workspace_tensors

    generator = torch.Generator("cuda").manual_seed(n + k + rank)
    codes, packed, codebook, scale_b, scale_a = random_layer(n, k, rank, kind, generator, dtype)
    bias = torch.randn(n, device="cuda", generator=generator).to(dtype) if rank % 2 else None
    worst = 0.0
    for call in range(CALLS):
        x = torch.randn(1, k, device="cuda", generator=generator).to(dtype)
        assert gemv_ready(x, 4, scale_b, scale_a)
        poison()
        out = gemv_matmul(x, packed, codebook, scale_b, scale_a, 4, bias)
        assert out.shape == (1, n) and out.dtype == dtype and bool(torch.isfinite(out).all())
        worst = max(worst, relative_error(out, reference(x, codes, codebook, scale_b, scale_a, bias)))
        assert all(bool((tensor == 0).all()) for tensor in workspace_tensors())
    record_property("rel_error", worst)
    assert worst < TOLERANCE[dtype]


@pytest.mark.parametrize("n,k,rank", [(14336, 4096, 49), (4100, 2048, 33)])
def test_gemv_replays_in_a_cuda_graph(n, k, rank, record_property):
    from lords.kernels import gemv_matmul

    generator = torch.Generator("cuda").manual_seed(1)
    codes, packed, codebook, scale_b, scale_a = random_layer(n, k, rank, "nf", generator)
    x = torch.randn(1, k, device="cuda", generator=generator).bfloat16()
    gemv_matmul(x, packed, codebook, scale_b, scale_a, 4)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv_matmul(x, packed, codebook, scale_b, scale_a, 4)
    worst = 0.0
    for _ in range(5):
        x.copy_(torch.randn(1, k, device="cuda", generator=generator))
        out.fill_(float("nan"))
        graph.replay()
        worst = max(worst, relative_error(out, reference(x, codes, codebook, scale_b, scale_a, None)))
    record_property("rel_error", worst)
    assert worst < TOLERANCE[torch.bfloat16]


def test_gemv_is_what_lords_matmul_offers_for_one_row(monkeypatch):
    import lords.kernels.gluon
    from lords.kernels import candidates, gemv_ready

    generator = torch.Generator("cuda").manual_seed(2)
    _, _, _, scale_b, scale_a = random_layer(4096, 4096, 32, "nf", generator)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert gemv_ready(x, 4, scale_b, scale_a)
    with monkeypatch.context() as off:
        off.setattr(lords.kernels.gluon, "ENABLED", False)
        assert not gemv_ready(x, 4, scale_b, scale_a)  # off unless LORDS_GLUON=1
    assert not gemv_ready(x, 3, scale_b, scale_a)  # 4 bits only
    assert not gemv_ready(torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16), 4, scale_b, scale_a)
    assert not gemv_ready(x.float(), 4, scale_b, scale_a)  # bf16 activations and scales only: float16 gave wrong
    assert not gemv_ready(x.half(), 4, scale_b.half(), scale_a.half())  # outputs in 2 of 22 cases on the H200
    offset = torch.empty(32 * 4096 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(32, 4096)
    assert not gemv_ready(x, 4, scale_b, offset)  # A is read by TMA, which needs 16-byte alignment
    assert "gluon-gemv" not in candidates(1, 32)  # offered by lords_matmul itself, where gemv_ready says so
    # 28672 x 8192 at rank 99: no split of the work keeps a program within MAX_PIECES row tiles
    _, _, _, scale_b, scale_a = random_layer(28672, 8192, 99, "nf", generator)
    assert not gemv_ready(torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16), 4, scale_b, scale_a)
