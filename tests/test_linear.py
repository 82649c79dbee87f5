from types import SimpleNamespace

import pytest
import torch

from lords.codebooks import get_codebook
from lords.factorize import lords_quantize, parity_rank
from lords.linear import LoRDSLinear


@pytest.mark.parametrize("bits,kind", [(4, "nf"), (3, "nf"), (2, "int")])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_float64_reference(bits, kind, bias):
    weight = torch.randn(24, 96)
    codebook = get_codebook(kind, bits)
    factors = lords_quantize(weight, codebook, 32, parity_rank(24, 96, 32), steps=3)
    bias_tensor = torch.randn(24) if bias else None
    layer = LoRDSLinear.from_factors(factors, bits, kind, bias_tensor)
    x = torch.randn(5, 7, 96)
    dense = (factors.scale_b.double() @ factors.scale_a.double()) * codebook.double()[factors.codes.long()]
    reference = x.double() @ dense.T + (bias_tensor.double() if bias else 0)
    out = layer(x)
    assert out.shape == (5, 7, 24) and out.dtype == torch.float32
    # float32 rounding: 1.2e-7 to 1.8e-7 measured (2.0e-7 at most over 40 seeds)
    assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-6
    assert torch.equal(layer.unpacked_codes(), factors.codes)


def test_bits_per_weight_counts_bf16_scales():
    layer = LoRDSLinear(128, 64, bits=3, rank=2)
    assert layer.bits_per_weight == 3 + 16 * 2 * (128 + 64) / (128 * 64)  # 3.75: exact in binary
    assert layer.codes.numel() == 128 * 64 * 3 // 8 and layer.codes.shape == (64, 128 * 3 // 8)


def test_unknown_backend_is_an_error():
    layer = LoRDSLinear(64, 8, bits=4, rank=1)
    layer.backend = "cuda-magic"
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        layer(torch.randn(2, 64))


def test_dense_weights_give_the_same_outputs_without_dequantizing_per_call(monkeypatch):
    """Inside dense_weights a layer's forward uses the weight dequantized on entry (outputs bit-identical to the
    per-call path, no dequantization per call), a training forward still goes through the scales, and the copy is
    released on exit."""
    import lords.linear

    factors = lords_quantize(torch.randn(24, 96), get_codebook("nf", 4), 32, 2, steps=2)
    model = torch.nn.Sequential(LoRDSLinear.from_factors(factors, 4, "nf", torch.randn(24)))
    x = torch.randn(3, 96)
    expected = model(x)
    with lords.linear.dense_weights(model):
        calls = []
        original = lords.linear.reference_weight
        monkeypatch.setattr(lords.linear, "reference_weight", lambda *a: calls.append(1) or original(*a))
        with torch.no_grad():
            assert torch.equal(model(x), expected)
        assert calls == []
        model[0].scale_b.requires_grad_(True)
        model(x).sum().backward()
        assert calls and model[0].scale_b.grad is not None
    assert model[0].dense_weight is None


@pytest.mark.parametrize("bias", [False, True])
def test_backward_matches_autograd_through_the_dense_weight(bias):
    """The torch path's hand-written backward (dX = dY W, dB = (G * C) A^T, dA = B^T (G * C), dbias) against autograd
    through (B A) * C[codes] in float64: equal to float32 rounding (measured 4e-8 to 1.2e-7 relative; bound 1e-6)."""
    factors = lords_quantize(torch.randn(24, 96), get_codebook("nf", 3), 32, 3, steps=2)
    layer = LoRDSLinear.from_factors(factors, 3, "nf", torch.randn(24) if bias else None)
    layer.scale_b.data, layer.scale_a.data = layer.scale_b.data.float(), layer.scale_a.data.float()
    layer.backend = "torch"
    x = torch.randn(2, 5, 96, requires_grad=True)
    grad_out = torch.randn(2, 5, 24)
    layer(x).backward(grad_out)

    scale_b, scale_a = (p.detach().double().requires_grad_(True) for p in (layer.scale_b, layer.scale_a))
    x64 = x.detach().double().requires_grad_(True)
    bias64 = layer.bias.detach().double().requires_grad_(True) if bias else None
    weight = (scale_b @ scale_a) * get_codebook("nf", 3).double()[factors.codes.long()]
    torch.nn.functional.linear(x64, weight, bias64).backward(grad_out.double())
    pairs = [(x.grad, x64.grad), (layer.scale_b.grad, scale_b.grad), (layer.scale_a.grad, scale_a.grad)]
    if bias:
        pairs.append((layer.bias.grad, bias64.grad))
    for ours, reference in pairs:
        assert ours.dtype == torch.float32 and ours.shape == reference.shape
        assert ((ours.double() - reference).norm() / reference.norm()).item() < 1e-6


def test_gradients_flow_only_where_asked():
    layer = LoRDSLinear.from_factors(lords_quantize(torch.randn(8, 64), get_codebook("nf", 4), 32, 1, steps=0), 4)
    layer.scale_a.requires_grad_(False)
    x = torch.randn(3, 64)
    layer(x).sum().backward()
    assert layer.scale_b.grad is not None and layer.scale_b.grad.dtype == torch.bfloat16
    assert layer.scale_a.grad is None and x.grad is None


def test_from_factors_keeps_shapes_dtypes_and_bias():
    factors = lords_quantize(torch.randn(24, 96), get_codebook("int", 2), 32, 3, steps=1, scale_dtype=torch.float16)
    bias = torch.randn(24)
    assert LoRDSLinear.from_factors(factors, 2, "int").bias is None
    layer = LoRDSLinear.from_factors(factors, 2, "int", bias)
    assert (layer.in_features, layer.out_features, layer.bits, layer.rank) == (96, 24, 2, 3)
    assert layer.scale_b.dtype == layer.scale_a.dtype == torch.float16 and layer.backend == "auto"
    assert torch.equal(layer.scale_b, factors.scale_b) and torch.equal(layer.scale_a, factors.scale_a)
    assert torch.equal(layer.codebook, get_codebook("int", 2)) and torch.equal(layer.bias, bias)
    assert layer.bias is not bias  # a copy: training the layer leaves the caller's tensor alone
    assert repr(layer) == "LoRDSLinear(in_features=96, out_features=24, bits=2, rank=3, codebook=int, bias=True)"
    empty = LoRDSLinear(96, 24, bits=3, rank=2)
    assert empty.bias is None and empty.scale_b.shape == (24, 2) and empty.scale_a.shape == (2, 96)
    assert empty.scale_b.dtype == torch.bfloat16 and empty.codes.dtype == torch.uint8
    assert empty.dense_weight is None
    with_bias = LoRDSLinear(96, 24, bits=3, rank=2, bias=True)
    assert with_bias.bias.shape == (24,) and with_bias.bias.dtype == torch.float32 and not with_bias.bias.any()


def test_dense_weights_use_the_models_dtype_unless_told():
    import lords.linear

    factors = lords_quantize(torch.randn(24, 96), get_codebook("nf", 4), 32, 2, steps=1)
    model = torch.nn.Sequential(LoRDSLinear.from_factors(factors, 4))
    x = torch.randn(3, 96)
    expected = model(x)
    with lords.linear.dense_weights(model) as inside:
        assert inside is model and model[0].dense_weight.dtype == torch.float32
        assert torch.equal(model[0].dense_weight, model[0].dequantize(torch.float32))
    with lords.linear.dense_weights(model, torch.float16):
        assert model[0].dense_weight.dtype == torch.float16
        assert torch.equal(model(x), expected)  # float32 inputs keep the per-call path: the copy is float16
    assert model[0].dense_weight is None


def test_integer_inputs_are_refused():
    layer = LoRDSLinear(64, 8, bits=4, rank=1)
    with pytest.raises(TypeError, match=r"^LoRDSLinear takes floating inputs, got torch.int64$"):
        layer(torch.ones(2, 64, dtype=torch.long))


@pytest.mark.parametrize("backend", ["triton", "fused"])
@pytest.mark.parametrize("bias", [False, True])
def test_triton_backends_call_the_kernel_ops(monkeypatch, backend, bias):
    """The "triton" and "fused" backends go through lords.kernels.ops, forward and backward (replaced here by the
    torch reference, as the kernels need a GPU): the fused flag, the autograd node only when a gradient is needed
    (its forward runs with grad mode off), and gradients equal to the torch backend's."""
    import lords.linear
    from lords.kernels import ops

    calls = []

    def matmul(x, codes, codebook, scale_b, scale_a, bits, bias, fused):
        calls.append(("matmul", fused, torch.is_grad_enabled()))
        return lords.linear.lords_linear(x, codes, codebook, scale_b, scale_a, bits, bias, "torch")

    def dequantize(codes, codebook, scale_b, scale_a, bits, dtype):
        calls.append(("dequantize", dtype))
        return lords.linear.reference_weight(codes, codebook, scale_b, scale_a, bits, dtype)

    def scale_grads(*args):
        calls.append(("scale_grads",))
        return lords.linear._scale_grads_torch(*args)

    for name, function in (("matmul", matmul), ("dequantize", dequantize), ("scale_grads", scale_grads)):
        monkeypatch.setattr(ops, name, function)
    factors = lords_quantize(torch.randn(24, 96), get_codebook("nf", 3), 32, 3, steps=1)
    layer = LoRDSLinear.from_factors(factors, 3, "nf", torch.randn(24) if bias else None)
    x = torch.randn(2, 5, 96, requires_grad=True)
    grad_out = torch.randn(2, 5, 24)
    torch_out = layer(x)
    torch_out.backward(grad_out)
    assert calls == []  # "auto" on CPU inputs is the torch path
    expected = [p.grad.clone() for p in (x, layer.scale_b, layer.scale_a)]
    expected_bias = layer.bias.grad.clone() if bias else None
    for p in (x, *layer.parameters()):
        p.grad = None

    layer.backend = backend
    out = layer(x)
    out.backward(grad_out)
    fused = backend == "fused"
    assert calls == [("matmul", fused, False), ("dequantize", torch.float32), ("scale_grads",)]
    assert torch.equal(out, torch_out)  # the bias included
    for ours, reference in zip((x.grad, layer.scale_b.grad, layer.scale_a.grad), expected):
        assert ours.dtype == reference.dtype and torch.equal(ours, reference)
    if bias:
        assert torch.equal(layer.bias.grad, expected_bias)

    calls.clear()
    with torch.no_grad():
        assert torch.equal(layer(x), out)
    assert calls == [("matmul", fused, False)]
    calls.clear()
    layer.requires_grad_(False)
    layer(x.detach()).sum()
    assert calls == [("matmul", fused, True)]  # nothing needs a gradient: no autograd node
    calls.clear()
    layer(x).backward(grad_out)  # only the input: dX = dY W, no scale gradients
    assert calls == [("matmul", fused, False), ("dequantize", torch.float32)] and torch.equal(x.grad, 2 * expected[0])
    calls.clear()
    layer.scale_b.requires_grad_(True)
    layer(x.detach()).backward(grad_out)  # only B: the autograd node, with the scale gradients' kernel alone
    assert calls == [("matmul", fused, False), ("scale_grads",)] and torch.equal(layer.scale_b.grad, 2 * expected[1])
    layer.scale_b.requires_grad_(False)
    if bias:  # only the bias: the autograd node, with neither kernel in its backward
        calls.clear()
        layer.bias.requires_grad_(True)
        layer(x.detach()).backward(grad_out)
        assert calls == [("matmul", fused, False)] and torch.equal(layer.bias.grad, 2 * expected_bias)


def test_half_precision_inputs_meet_the_weight_in_their_dtype():
    """On the torch path the dequantized weight is cast to the input's dtype, forward and backward (a float32 weight
    could not multiply bfloat16 inputs): the same as F.linear with the layer's weight dequantized in bfloat16."""
    factors = lords_quantize(torch.randn(24, 96), get_codebook("nf", 4), 32, 2, steps=1)
    layer = LoRDSLinear.from_factors(factors, 4, "nf", torch.randn(24))
    layer.backend = "torch"
    weight = layer.dequantize(torch.bfloat16)
    x = torch.randn(5, 96, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():  # inference: no autograd node
        expected = torch.nn.functional.linear(x, weight, layer.bias.to(torch.bfloat16))
        assert torch.equal(layer(x), expected)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    grad_out = torch.randn(5, 24, dtype=torch.bfloat16)
    out.backward(grad_out)
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, grad_out @ weight)


@pytest.mark.parametrize("is_cuda,triton,expected", [(True, True, "triton"), (True, False, "torch"),
                                                     (False, True, "torch")])
def test_auto_is_triton_for_cuda_inputs_when_triton_is_installed(monkeypatch, is_cuda, triton, expected):
    import lords.linear

    monkeypatch.setattr(lords.linear, "_TRITON", triton)
    x = SimpleNamespace(is_cuda=is_cuda)  # a CUDA tensor's stand-in: the CPU suite has none
    assert lords.linear.kernel_path("auto", x) == expected
    assert [lords.linear.kernel_path(backend, x) for backend in ("torch", "triton", "fused")] == [
        "torch", "triton", "fused"]  # a named backend is taken as it is
