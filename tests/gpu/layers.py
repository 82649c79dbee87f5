"""What the GPU suite's test files share: random 4-bit LoRDS layers and a float64 reference, and what the CUDA
kernels' tests need (the folder is on sys.path under pytest, as tests/ is for conftest)."""

import os

import pytest
import torch

HOPPER_ONLY = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    or torch.cuda.get_device_capability() != (9, 0),
    reason="the CUDA kernels need a Hopper GPU (sm_90) and no Triton interpreter")


@pytest.fixture
def cuda_kernels_on(monkeypatch):
    """LORDS_CUDA=0 turns the CUDA kernels off in the library; their tests turn them on whatever the environment
    says."""
    import lords.kernels.cuda

    monkeypatch.setattr(lords.kernels.cuda, "ENABLED", True)


def random_layer(n, k, rank, kind, generator, dtype=torch.bfloat16):
    from lords.codebooks import get_codebook
    from lords.packing import pack_codes

    codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8, generator=generator)
    scale_b = (torch.rand(n, rank, device="cuda", generator=generator) + 0.1).to(dtype)
    scale_a = (torch.rand(rank, k, device="cuda", generator=generator) + 0.1).to(dtype)
    return codes, pack_codes(codes, 4), get_codebook(kind, 4).cuda(), scale_b, scale_a


def reference(x, codes, codebook, scale_b, scale_a, bias):
    weight = (scale_b.double() @ scale_a.double()) * codebook.double()[codes.long()]
    out = x.double() @ weight.T
    return out if bias is None else out + bias.double()


def relative_error(out, expected) -> float:
    return ((out.double() - expected).norm() / expected.norm()).item()


def poison() -> None:
    """Fill free cached blocks with NaN, so that an output element the kernel never writes shows up."""
    poisoned = torch.full((2**26,), float("nan"), device="cuda")
    del poisoned
