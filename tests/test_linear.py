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
    assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-6
    assert torch.equal(layer.unpacked_codes(), factors.codes)


def test_bits_per_weight_counts_bf16_scales():
    layer = LoRDSLinear(128, 64, bits=3, rank=2)
    assert layer.bits_per_weight == pytest.approx(3 + 16 * 2 * (128 + 64) / (128 * 64))
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
