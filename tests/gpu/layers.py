"""What the GPU suite's test files share: random 4-bit LoRDS layers and a float64 reference (the folder is on
sys.path under pytest, as tests/ is for conftest)."""

import torch


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
