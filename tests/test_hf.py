"""A lords checkpoint through transformers' own entry points: from_pretrained, save_pretrained, device_map."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM

import lords
from lords.checkpoint import WEIGHTS_NAME
from lords.hf import LoRDSQuantizationConfig
from lords.linear import LoRDSLinear

IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def quantized(tiny_llama):
    lords.quantize(tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=False)
    return tiny_llama


@pytest.fixture
def folder(quantized, tmp_path):
    return lords.save(quantized, tmp_path / "ckpt", dtype=torch.float32)


def test_from_pretrained_gives_the_logits_of_lords_load(quantized, folder):
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "lords" and len(quantization["layers"]) == 14
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(model.model.layers[1].self_attn.k_proj, LoRDSLinear)
    assert isinstance(model.config.quantization_config, LoRDSQuantizationConfig)
    expected = quantized(IDS).logits
    assert torch.equal(model(IDS).logits, expected)
    assert torch.equal(lords.load(folder)(IDS).logits, expected)


def test_save_pretrained_writes_a_folder_that_loads_back(quantized, folder, tmp_path):
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    assert torch.equal(again(IDS).logits, quantized(IDS).logits)
    # a model quantized in memory is marked too: save_pretrained alone writes a loadable folder
    quantized.save_pretrained(tmp_path / "direct")
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "direct", dtype=torch.float32)
    assert torch.equal(direct(IDS).logits, quantized(IDS).logits)


def test_device_map_auto_splits_over_cpu_and_disk(quantized, folder, tmp_path):
    """Without a GPU, a max_memory below the model's size makes device_map="auto" place part of it on the CPU and
    offload the rest to disk: the same dispatch (accelerate hooks) that spreads a model over several GPUs."""
    size = sum(t.numel() * t.element_size() for t in lords.load(folder).state_dict().values())
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": size // 2},
                                                 offload_folder=tmp_path / "offload", dtype=torch.float32)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert torch.equal(model(IDS).logits, quantized(IDS).logits)


def test_a_missing_tensor_is_an_error_not_a_random_init(folder):
    tensors = load_file(folder / WEIGHTS_NAME)
    del tensors["model.layers.1.self_attn.q_proj.codes"]
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.codes is missing from the checkpoint"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_layer_the_model_lacks_is_named(folder):
    config = json.loads((folder / "config.json").read_text())
    layers = config["quantization_config"]["layers"]
    layers["model.layers.7.mlp.up_proj"] = layers.pop("model.layers.1.mlp.up_proj")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names layer model\.layers\.7\.mlp\.up_proj, which the model does not have"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("entry,message", [
    ({"bits": 5, "rank": 1, "codebook": "nf", "scale_dtype": "bfloat16"}, "bits must be one of"),
    ({"bits": 4, "rank": 0, "codebook": "nf", "scale_dtype": "bfloat16"}, "rank must be a positive integer, got 0"),
    ({"bits": 4, "rank": 1, "codebook": "nf"}, "expected the fields"),
])
def test_bad_layer_entries_are_named(entry, message):
    with pytest.raises(ValueError, match=message):
        LoRDSQuantizationConfig({"model.layers.0.mlp.up_proj": entry})


def test_a_dense_model_is_not_quantized_on_load(model_folder):
    config = LoRDSQuantizationConfig({"model.layers.0.mlp.up_proj": {"bits": 4, "rank": 1, "codebook": "nf",
                                                                     "scale_dtype": "bfloat16"}})
    with pytest.raises(ValueError, match="does require the model to be pre-quantized"):
        AutoModelForCausalLM.from_pretrained(model_folder, quantization_config=config)


class FloatAllocations(TorchDispatchMode):
    """Records every floating tensor an operator produces off the meta device whose shape is one of `shapes`."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.seen = set(shapes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.device.type != "meta"
                    and tuple(tensor.shape) in self.shapes):
                self.seen.append((str(func), tuple(tensor.shape)))
        return out


def test_loading_never_allocates_a_dense_weight_of_a_quantized_linear(quantized, folder, monkeypatch):
    """from_pretrained builds the model on the meta device and swaps in meta LoRDSLinear layers before reading any
    tensor: no (out, in) float tensor of a quantized linear is ever made (codes are uint8, scales (out, r) and
    (r, in)). The watcher itself is checked on what lords.load did before: build the dense model, then replace."""
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # every tensor read in this thread, which the watcher sees
    shapes = {(m.out_features, m.in_features) for m in quantized.modules() if isinstance(m, LoRDSLinear)}
    with FloatAllocations(shapes) as watcher:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert watcher.seen == []
    assert torch.equal(model(IDS).logits, quantized(IDS).logits)
    with FloatAllocations(shapes) as watcher:
        AutoModelForCausalLM.from_config(quantized.config)
    assert len(watcher.seen) >= 14  # the old path allocated (and initialised) every dense weight
