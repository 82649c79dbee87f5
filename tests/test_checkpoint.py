import json

import pytest
import torch

import lords
from lords.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError


@pytest.fixture
def quantized(tiny_llama):
    lords.quantize(tiny_llama, lords.LoRDSConfig(bits=3, block_size=32, steps=3), progress=False)
    return tiny_llama


def test_round_trip_gives_identical_logits(quantized, tmp_path):
    ids = torch.randint(0, 96, (2, 11))
    expected = quantized(ids).logits
    folder = lords.save(quantized, tmp_path / "ckpt", config=lords.LoRDSConfig(bits=3, block_size=32))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", CONFIG_NAME, WEIGHTS_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    loaded = lords.load(folder)
    assert torch.equal(loaded(ids).logits, expected)
    assert loaded.model.layers[0].mlp.up_proj.bits == 3


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
    with pytest.raises(CheckpointError, match="corrupt, truncated or does not match"):
        lords.load(folder)


def test_corrupt_config_is_reported(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="is corrupt"):
        lords.load(folder)


def test_mismatched_layer_shape_is_reported(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["layers"]["model.layers.0.mlp.up_proj"]["rank"] += 1
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        lords.load(folder)


@pytest.mark.parametrize("version,message", [(99, "format_version 99"), (1, "quantize the model again")])
def test_other_format_versions_are_refused(quantized, tmp_path, version, message):
    folder = lords.save(quantized, tmp_path / "ckpt")
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["format_version"] = version
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        lords.load(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a lords checkpoint"):
        lords.load(tmp_path)


def test_saving_an_unquantized_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="no LoRDSLinear layers"):
        lords.save(tiny_llama, tmp_path / "ckpt")
