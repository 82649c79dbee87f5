import json

import pytest
import torch

import lords
from lords.checkpoint import LEGACY_CONFIG_NAME, WEIGHTS_NAME, CheckpointError, is_checkpoint


@pytest.fixture
def quantized(tiny_llama):
    lords.quantize(tiny_llama, lords.LoRDSConfig(bits=3, block_size=32, steps=3), progress=False)
    return tiny_llama


def edit_json(path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def test_round_trip_gives_identical_logits(quantized, tmp_path):
    ids = torch.randint(0, 96, (2, 11))
    expected = quantized(ids).logits
    folder = lords.save(quantized, tmp_path / "ckpt", config=lords.LoRDSConfig(bits=3, block_size=32),
                        dtype=torch.float32)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", WEIGHTS_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    assert is_checkpoint(folder)
    loaded = lords.load(folder)
    assert torch.equal(loaded(ids).logits, expected)
    assert loaded.model.layers[0].mlp.up_proj.bits == 3
    assert loaded.config.quantization_config.quantization["block_size"] == 32


def test_refuses_to_overwrite_non_empty_folder(quantized, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        lords.save(quantized, folder)
    assert (folder / "keep.txt").read_text() == "user data"
    lords.save(quantized, folder, overwrite=True)
    assert not (folder / "keep.txt").exists() and (folder / WEIGHTS_NAME).is_file()


def test_truncated_weights_are_reported(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated or missing"):
        lords.load(folder)


def test_corrupt_config_is_reported(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        lords.load(folder)


def test_mismatched_layer_shape_is_reported(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    edit_json(folder / "config.json",
              lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(rank=2))
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes"):  # transformers' report names the tensors
        lords.load(folder)


def test_other_format_versions_are_refused(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    edit_json(folder / "config.json", lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99 .* reads version 3"):
        lords.load(folder)


def _as_format_2(folder, version=2) -> None:
    """The layout lords wrote before the transformers integration: lords_config.json, float32 dense tensors."""
    config = json.loads((folder / "config.json").read_text())
    quantization = config.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(config))
    layers = {name: {**entry, "in_features": 0, "out_features": 0, "bias": False}
              for name, entry in quantization["layers"].items()}
    meta = {"format": "lords", "format_version": version, "lords_version": "0.1.0", "dense_dtype": config["dtype"],
            "quantization": quantization["quantization"], "layers": layers}
    (folder / LEGACY_CONFIG_NAME).write_text(json.dumps(meta))


def test_format_2_checkpoints_still_load(quantized, tmp_path):
    ids = torch.randint(0, 96, (2, 11))
    folder = lords.save(quantized, tmp_path / "ckpt", dtype=torch.float32)
    _as_format_2(folder)
    assert torch.equal(lords.load(folder)(ids).logits, quantized(ids).logits)


def test_format_1_checkpoints_say_what_to_do(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    _as_format_2(folder, version=1)
    with pytest.raises(CheckpointError, match="format_version 1: .* quantize the model again"):
        lords.load(folder)


def test_not_a_checkpoint(tmp_path, model_folder):
    with pytest.raises(CheckpointError, match="not a lords checkpoint"):
        lords.load(tmp_path)
    with pytest.raises(CheckpointError, match="not a lords checkpoint"):
        lords.load(model_folder)  # a dense transformers folder


def test_saving_an_unquantized_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="no LoRDSLinear layers"):
        lords.save(tiny_llama, tmp_path / "ckpt")
