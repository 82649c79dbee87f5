"""Scale gradients: the Triton kernel (interpreter) and LoRDSLinear's backward against autograd in float64."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lords.codebooks import get_codebook  # noqa: E402
from lords.kernels import scale_grads  # noqa: E402
from lords.linear import LoRDSLinear  # noqa: E402
from lords.packing import pack_codes  # noqa: E402

if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("kernel tests run under TRITON_INTERPRET=1", allow_module_level=True)


def autograd_reference(x, grad_out, codes, codebook, scale_b, scale_a, bias=None):
    """Gradients of sum(grad_out * Y) by autograd through the dense float64 weight."""
    x = x.double().requires_grad_(True)
    scale_b = scale_b.double().requires_grad_(True)
    scale_a = scale_a.double().requires_grad_(True)
    weight = (scale_b @ scale_a) * codebook.double()[codes.long()]
    out = x @ weight.T
    (out * grad_out.double()).sum().backward()
    return x.grad, scale_b.grad, scale_a.grad


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("bits,kind", [(4, "nf"), (3, "int"), (2, "nf")])
@pytest.mark.parametrize("m,n,k,rank", [(1, 24, 40, 1), (37, 33, 72, 17), (20, 10, 37, 3)])
def test_scale_grads_kernel_matches_autograd(bits, kind, m, n, k, rank):
    generator = torch.Generator().manual_seed(m + n + bits)
    codes = torch.randint(0, 2**bits, (n, k), generator=generator, dtype=torch.uint8)
    codebook = get_codebook(kind, bits)
    scale_b, scale_a = torch.rand(n, rank, generator=generator), torch.rand(rank, k, generator=generator)
    x, grad_out = torch.randn(m, k, generator=generator), torch.randn(m, n, generator=generator)
    grad_b, grad_a = scale_grads(grad_out, x, pack_codes(codes, bits), codebook, scale_b, scale_a, bits)
    _, expected_b, expected_a = autograd_reference(x, grad_out, codes, codebook, scale_b, scale_a)
    assert grad_b.shape == (n, rank) and grad_a.shape == (rank, k)
    assert relative_error(grad_b, expected_b) < 1e-6  # float32 against float64: 1.7e-7 at most measured
    assert relative_error(grad_a, expected_a) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_backward_matches_autograd(backend):
    generator = torch.Generator().manual_seed(3)
    n, k, rank, bits = 20, 48, 5, 3
    layer = LoRDSLinear(k, n, bits, rank, bias=True, scale_dtype=torch.float32)
    codes = torch.randint(0, 2**bits, (n, k), generator=generator, dtype=torch.uint8)
    with torch.no_grad():
        layer.codes.copy_(pack_codes(codes, bits))
        layer.scale_b.copy_(torch.rand(n, rank, generator=generator))
        layer.scale_a.copy_(torch.rand(rank, k, generator=generator))
        layer.bias.copy_(torch.randn(n, generator=generator))
    layer.backend = backend
    x = torch.randn(2, 7, k, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 7, n, generator=generator)
    (layer(x) * grad_out).sum().backward()
    expected_x, expected_b, expected_a = autograd_reference(
        x.detach().reshape(-1, k), grad_out.reshape(-1, n), codes, layer.codebook, layer.scale_b.detach(),
        layer.scale_a.detach(),
    )
    assert relative_error(x.grad.reshape(-1, k), expected_x) < 5e-7  # float32 against float64: 1.1e-7 at most measured
    assert relative_error(layer.scale_b.grad, expected_b) < 5e-7
    assert relative_error(layer.scale_a.grad, expected_a) < 5e-7
    assert torch.equal(layer.bias.grad, grad_out.sum((0, 1)))  # bit-identical
