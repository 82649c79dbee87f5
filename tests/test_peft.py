import pytest
import torch

import lords
from lords.peft import codes_fingerprint, load_adapter, mark_trainable, save_adapter
from lords.train import finetune


@pytest.fixture
def quantized(tiny_llama):
    lords.quantize(tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=False)
    return tiny_llama


def test_only_scales_train_and_count_matches(quantized):
    count = mark_trainable(quantized)
    trainable = {name for name, p in quantized.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("scale_b", "scale_a")) for name in trainable)
    layers = [m for m in quantized.modules() if isinstance(m, lords.LoRDSLinear)]
    assert count == sum(m.rank * (m.in_features + m.out_features) for m in layers)
    assert mark_trainable(quantized, ("scale_b",)) == sum(m.rank * m.out_features for m in layers)
    with pytest.raises(ValueError, match="parts must be a non-empty subset"):
        mark_trainable(quantized, ("weight",))


def test_finetune_lowers_loss_and_keeps_codes_frozen(quantized):
    codes_before = codes_fingerprint(quantized)
    mark_trainable(quantized)
    tokens = torch.arange(96).repeat(20)  # a learnable repeating pattern
    losses = finetune(quantized, tokens, steps=40, lr=5e-2, batch_size=4, seq_len=32, progress=False)
    assert sum(losses[-5:]) / 5 < 0.93 * sum(losses[:5]) / 5
    assert codes_fingerprint(quantized) == codes_before
    # the update is multiplicative and high-rank, applied by the same LoRDSLinear modules (nothing to merge)
    assert all(isinstance(quantized.model.layers[i].mlp.up_proj, lords.LoRDSLinear) for i in range(2))


def test_adapter_round_trip_and_mismatch(quantized, tmp_path, tiny_llama):
    mark_trainable(quantized)
    finetune(quantized, torch.arange(96).repeat(10), steps=3, lr=1e-2, seq_len=16, progress=False)
    ids = torch.randint(0, 96, (2, 9))
    folder = save_adapter(quantized, tmp_path / "adapter", base="tiny")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    expected = quantized(ids).logits
    with torch.no_grad():
        for module in quantized.modules():
            if isinstance(module, lords.LoRDSLinear):
                module.scale_b.zero_()
    load_adapter(quantized, folder)
    # the adapter stores bf16 scales, as the checkpoint format does
    assert torch.allclose(quantized(ids).logits, expected, atol=5e-2, rtol=5e-2)
    with pytest.raises(FileExistsError, match="not empty"):
        save_adapter(quantized, folder)

    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(**{**tiny_llama.config.to_dict(), "vocab_size": 96})).eval()
    torch.manual_seed(1)
    lords.quantize(other, lords.LoRDSConfig(bits=4, block_size=32, steps=0), progress=False)
    with pytest.raises(ValueError, match="trained on other codes"):
        load_adapter(other, folder)


def test_finetune_needs_trainable_parameters(quantized):
    for p in quantized.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train: no parameter requires grad"):
        finetune(quantized, torch.arange(500), steps=1, progress=False)
