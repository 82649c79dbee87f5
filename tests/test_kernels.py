"""The fused Triton forward against a float64 reference, run by Triton's interpreter on the CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lords.codebooks import get_codebook  # noqa: E402
from lords.kernels.forward import lords_matmul  # noqa: E402
from lords.linear import LoRDSLinear  # noqa: E402
from lords.packing import pack_codes  # noqa: E402

if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("kernel tests run under TRITON_INTERPRET=1", allow_module_level=True)


def reference(x, codes, codebook, scale_b, scale_a, bias):
    weight = (scale_b.double() @ scale_a.double()) * codebook.double()[codes.long()]
    out = x.double() @ weight.T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("bits,kind", [(4, "nf"), (3, "nf"), (2, "nf"), (4, "int"), (3, "int"), (2, "int")])
@pytest.mark.parametrize("m,n,k,rank", [(1, 24, 40, 1), (5, 33, 72, 17), (19, 16, 64, 3), (3, 10, 37, 2)])
def test_forward_matches_float64(bits, kind, m, n, k, rank):
    generator = torch.Generator().manual_seed(bits * 100 + m)
    codes = torch.randint(0, 2**bits, (n, k), generator=generator, dtype=torch.uint8)
    codebook = get_codebook(kind, bits)
    scale_b = torch.rand(n, rank, generator=generator) + 0.1
    scale_a = torch.rand(rank, k, generator=generator) + 0.1
    bias = torch.randn(n, generator=generator) if m % 2 else None
    x = torch.randn(m, k, generator=generator)
    out = lords_matmul(x, pack_codes(codes, bits), codebook, scale_b, scale_a, bits, bias)
    expected = reference(x, codes, codebook, scale_b, scale_a, bias)
    assert out.shape == (m, n) and torch.isfinite(out).all()
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_layer_dispatch_triton_equals_torch_reference():
    layer = LoRDSLinear(48, 20, bits=3, rank=5, bias=True, scale_dtype=torch.float32)
    with torch.no_grad():
        layer.codes.copy_(pack_codes(torch.randint(0, 8, (20, 48), dtype=torch.uint8), 3))
        layer.scale_b.copy_(torch.rand(20, 5))
        layer.scale_a.copy_(torch.rand(5, 48))
        layer.bias.copy_(torch.randn(20))
    x = torch.randn(2, 3, 48)
    layer.backend = "torch"
    expected = layer(x)
    layer.backend = "triton"
    out = layer(x)
    assert out.shape == (2, 3, 20)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_wrong_input_width_is_named():
    with pytest.raises(ValueError, match="input has 10 features, the layer expects 16"):
        lords_matmul(torch.randn(2, 10), torch.zeros(32, dtype=torch.uint8), get_codebook("nf", 4),
                     torch.ones(4, 1), torch.ones(1, 16), 4)
