import pytest
import torch

import lords
from lords.codebooks import nf_codebook
from lords.qat import QATLinear, export_qat, fake_quantize, prepare_qat, qat_parameter_groups
from lords.train import finetune


def test_fake_quantize_value_and_straight_through_gradients():
    generator = torch.Generator().manual_seed(0)
    codebook = nf_codebook(3).double()
    weight = torch.randn(6, 40, generator=generator, dtype=torch.float64).requires_grad_(True)
    scale = (torch.rand(6, 40, generator=generator, dtype=torch.float64) + 0.3).requires_grad_(True)
    upstream = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    out = fake_quantize(weight, scale, codebook)
    ratio = (weight / scale).detach()
    levels = codebook[(ratio[..., None] - codebook).abs().argmin(-1)]
    assert torch.equal(out, scale.detach() * levels)  # bit-identical
    (out * upstream).sum().backward()
    inside = (ratio >= codebook.min()) & (ratio <= codebook.max())
    assert inside.any() and (~inside).any()
    assert torch.allclose(weight.grad, upstream * inside, atol=1e-15, rtol=0)  # measured 2.2e-16
    expected_scale_grad = upstream * torch.where(inside, levels - ratio, levels)
    assert torch.allclose(scale.grad, expected_scale_grad, atol=1e-15, rtol=0)  # measured 1.7e-16


def test_prepare_train_export(tiny_llama):
    ids = torch.randint(0, 96, (2, 12))
    config = lords.LoRDSConfig(bits=3, block_size=32, steps=3)
    names = [report.name for report in prepare_qat(tiny_llama, config, progress=False)]
    assert len(names) == 14 and all(isinstance(tiny_llama.get_submodule(n), QATLinear) for n in names)
    groups = qat_parameter_groups(tiny_llama, lr=1e-3)
    assert groups[1]["lr"] == 4e-3 and len(groups[1]["params"]) == 2 * len(groups[0]["params"])
    for param in tiny_llama.parameters():
        param.requires_grad_(False)
    for group in groups:
        for param in group["params"]:
            param.requires_grad_(True)
    tokens = torch.arange(96).repeat(10)
    # the paper's schedule: scales alone first, then weights too
    for param in groups[0]["params"]:
        param.requires_grad_(False)
    first = finetune(tiny_llama, tokens, steps=10, seq_len=24, progress=False, param_groups=groups)
    for param in groups[0]["params"]:
        param.requires_grad_(True)
    second = finetune(tiny_llama, tokens, steps=20, seq_len=24, progress=False, param_groups=groups)
    assert sum(second[-5:]) < sum(first[:5])
    with torch.no_grad():
        trained = tiny_llama(ids).logits
    export_qat(tiny_llama, scale_dtype=torch.float32)
    assert all(isinstance(tiny_llama.get_submodule(n), lords.LoRDSLinear) for n in names)
    with torch.no_grad():
        exported = tiny_llama(ids).logits
    assert torch.equal(exported, trained)  # bit-identical


def test_parameter_groups_need_qat_layers(tiny_llama):
    with pytest.raises(ValueError, match="no QATLinear layers"):
        qat_parameter_groups(tiny_llama, lr=1e-3)
