import hashlib
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lords
from conftest import exactly
from lords import integrity
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
    # indented as peft's and transformers' JSON files are, for the people who read them
    assert (folder / "adapter_config.json").read_text() == json.dumps(
        {"format": "lords-adapter", "format_version": 1, "base": "tiny", "codes_sha256": codes_fingerprint(quantized)},
        indent=2)
    layers = [m for m in quantized.modules() if isinstance(m, lords.LoRDSLinear)]
    with torch.no_grad():  # the adapter stores the scales in bf16, as the checkpoint format does
        for module in layers:
            module.scale_b.copy_(module.scale_b.bfloat16())
            module.scale_a.copy_(module.scale_a.bfloat16())
    expected = quantized(ids).logits
    trained = {name: p.detach().clone() for name, p in quantized.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for module in layers:
            module.scale_b.zero_()
            module.scale_a.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file carries its digests: no "not written by lords" warning
        assert load_adapter(quantized, folder) is quantized
    for name, param in quantized.named_parameters():
        if name in trained:
            assert param.dtype == torch.float32 and torch.equal(param, trained[name]), name
    assert torch.equal(quantized(ids).logits, expected)
    with pytest.raises(FileExistsError, match="not empty"):
        save_adapter(quantized, folder)
    with torch.no_grad():
        layers[0].scale_b.mul_(2)
    save_adapter(quantized, folder, base="tiny", overwrite=True)
    assert torch.equal(load_file(str(folder / "adapter.safetensors"))["model.layers.0.self_attn.q_proj.scale_b"],
                       layers[0].scale_b.detach().bfloat16())

    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(**{**tiny_llama.config.to_dict(), "vocab_size": 96})).eval()
    torch.manual_seed(1)
    lords.quantize(other, lords.LoRDSConfig(bits=4, block_size=32, steps=0), progress=False)
    with pytest.raises(ValueError, match=exactly(f"adapter {folder} was trained on other codes (base 'tiny'); it does "
                                                 "not fit this model")):
        load_adapter(other, folder)


def test_adapter_holds_only_the_trained_scales(quantized, tmp_path):
    mark_trainable(quantized, ("scale_a",))
    folder = save_adapter(quantized, tmp_path / "adapter")
    tensors = load_file(str(folder / "adapter.safetensors"))
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, lords.LoRDSLinear)}
    assert sorted(tensors) == sorted(f"{name}.scale_a" for name in layers)
    for name, layer in layers.items():
        assert tensors[f"{name}.scale_a"].dtype == torch.bfloat16
        assert torch.equal(tensors[f"{name}.scale_a"], layer.scale_a.detach().bfloat16())


def test_fingerprint_covers_names_shapes_bits_ranks_and_codes(quantized):
    """The fingerprint is the adapter format's check that it fits a base: sha256 over name:out x in:bits:rank; and
    the packed codes of every layer in order."""
    digest = hashlib.sha256()
    for name, layer in quantized.named_modules():
        if isinstance(layer, lords.LoRDSLinear):
            digest.update(f"{name}:{layer.out_features}x{layer.in_features}:{layer.bits}:{layer.rank};".encode())
            digest.update(layer.codes.numpy().tobytes())
    assert codes_fingerprint(quantized) == digest.hexdigest()
    layer = quantized.model.layers[1].mlp.down_proj
    before = codes_fingerprint(quantized)
    with torch.no_grad():
        layer.codes[-1, -1] ^= 1
    assert codes_fingerprint(quantized) != before


def test_mark_trainable_keeps_the_trained_scales_in_float32(quantized):
    assert quantized.model.layers[0].mlp.up_proj.scale_b.dtype == torch.bfloat16
    mark_trainable(quantized, ("scale_b",))
    layer = quantized.model.layers[0].mlp.up_proj
    assert layer.scale_b.dtype == torch.float32 and layer.scale_b.requires_grad
    assert layer.scale_a.dtype == torch.bfloat16 and not layer.scale_a.requires_grad
    for parts in ((), ("scale_b", "weight")):
        with pytest.raises(ValueError, match=r"parts must be a non-empty subset of \('scale_b', 'scale_a'\)"):
            mark_trainable(quantized, parts)


def rewrite(path, tensors) -> None:
    """Replace an adapter's tensors, with their digests (of non-finite ones too, which lords would never write), so
    that the file gets past its digest check to the checks of load_adapter."""
    digests = {name: integrity.digest(integrity.tensor_bytes(tensor)) for name, tensor in tensors.items()}
    save_file(tensors, str(path), metadata={integrity.DIGESTS_KEY: json.dumps(digests)})


def test_bad_adapters_are_refused(quantized, tmp_path):
    quantized.requires_grad_(False)
    with pytest.raises(ValueError, match=exactly("no trainable scales: call mark_trainable(model) before training and "
                                                 "saving")):
        save_adapter(quantized, tmp_path / "none")
    mark_trainable(quantized)
    folder = save_adapter(quantized, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(ValueError, match="adapter_config.json is not a lords adapter of format version 1"):
        load_adapter(quantized, folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "format": "peft"}))
    with pytest.raises(ValueError, match="is not a lords adapter of format version 1"):
        load_adapter(quantized, folder)
    (folder / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match=f"{folder} is not a readable lords adapter"):
        load_adapter(quantized, folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))

    path = folder / "adapter.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.0.mlp.up_proj.scale_b"
    rewrite(path, {**tensors, key: tensors[key].repeat(1, 2)})
    rank = tensors[key].shape[1]
    with pytest.raises(ValueError, match=exactly(f"adapter tensor {key} is torch.bfloat16 (128, {2 * rank}), the "
                                                 f"model expects a floating (128, {rank})")):
        load_adapter(quantized, folder)
    codes = "model.layers.0.mlp.up_proj.codes"
    rewrite(path, {**tensors, codes: torch.zeros(4, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=exactly(f"adapter tensor {codes} is not a scale (scale_b or scale_a); an "
                                                 "adapter holds only trained scales, never codes or codebooks")):
        load_adapter(quantized, folder)
    stranger = "model.layers.9.mlp.up_proj.scale_b"
    rewrite(path, {**tensors, stranger: tensors[key].clone()})
    with pytest.raises(ValueError, match=exactly(f"adapter tensor {stranger} names layer model.layers.9.mlp.up_proj, "
                                                 "which the model does not have")):
        load_adapter(quantized, folder)
    rewrite(path, {})
    with pytest.raises(ValueError, match=exactly(f"adapter {path} holds no tensors")):
        load_adapter(quantized, folder)
    infinite = tensors[key].clone()
    infinite[3, 0] = float("inf")
    rewrite(path, {**tensors, key: infinite})
    with pytest.raises(ValueError, match=exactly(f"adapter tensor {key} holds NaN or Inf values")):
        load_adapter(quantized, folder, verify=False)  # the check of its own, behind verification's
    with pytest.raises(ValueError, match=exactly(f"cannot read adapter {path}: {path}: tensor {key} holds NaN or Inf "
                                                 "values")):
        load_adapter(quantized, folder)
    with pytest.raises(ValueError, match=exactly("the model has no LoRDSLinear layers; quantize it (or load a lords "
                                                 "checkpoint) first")):
        mark_trainable(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_corrupt_adapter_files_are_refused_unless_unverified(quantized, tmp_path):
    mark_trainable(quantized)
    folder = save_adapter(quantized, tmp_path / "adapter")
    path = folder / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-2] ^= 1  # the lowest mantissa bit of the last bf16 value: still finite, but not what was saved
    path.write_bytes(bytes(data))
    name = max(load_file(str(path)))  # the last tensor of the file (safetensors sorts them by name)
    with pytest.raises(ValueError, match=exactly(f"cannot read adapter {path}: {path}: tensor {name} does not match "
                                                 "its sha256 digest (the file is corrupt)")):
        load_adapter(quantized, folder)
    load_adapter(quantized, folder, verify=False)  # verify=False trusts the file: the changed value loads
    assert torch.equal(dict(quantized.named_parameters())[name], load_file(str(path))[name].float())


def test_finetune_needs_trainable_parameters(quantized):
    for p in quantized.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train: no parameter requires grad"):
        finetune(quantized, torch.arange(500), steps=1, progress=False)
