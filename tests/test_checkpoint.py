import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lords
from conftest import exactly, word_tokenizer
from lords import integrity
from lords.checkpoint import (
    LEGACY_CONFIG_NAME, WEIGHTS_NAME, CheckpointError, ShardedSafetensors, dense_dtype, is_checkpoint, parse_size,
    quantized_tensor_names, read_header, read_tensor,
)
from lords.linear import LoRDSLinear


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
    with pytest.raises(OSError, match="holds no config.json or adapter_config.json; lords replaces only its own"):
        lords.save(quantized, folder, overwrite=True)  # not a model folder: never deleted, even with overwrite
    assert (folder / "keep.txt").read_text() == "user data"
    lords.save(quantized, folder / "inner")
    lords.save(quantized, folder / "inner", overwrite=True)
    assert (folder / "inner" / WEIGHTS_NAME).is_file() and (folder / "keep.txt").is_file()


def test_truncated_weights_are_reported(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated: tensor .* runs past its end"):
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
    with pytest.raises(CheckpointError, match=exactly(
            f"cannot load {folder}: {folder / LEGACY_CONFIG_NAME} has format_version 1: its codes are packed in a "
            "layout this lords no longer reads; quantize the model again")):
        lords.load(folder)


def test_not_a_checkpoint(tmp_path, model_folder):
    with pytest.raises(CheckpointError, match="not a lords checkpoint"):
        lords.load(tmp_path)
    with pytest.raises(CheckpointError, match="not a lords checkpoint"):
        lords.load(model_folder)  # a dense transformers folder


def test_saving_an_unquantized_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=exactly("the model has no LoRDSLinear layers; quantize it before saving")):
        lords.save(tiny_llama, tmp_path / "ckpt")


def stored_dtypes(folder) -> dict[str, torch.dtype]:
    from safetensors import safe_open

    dtypes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            dtypes.update({name: handle.get_slice(name).get_dtype() for name in handle.keys()})
    return dtypes


@pytest.mark.parametrize("source,named,expected", [
    (torch.float16, None, "F16"),  # a 16-bit source keeps its dtype
    (torch.bfloat16, None, "BF16"),
    (torch.float32, None, "BF16"),  # float32 only when asked for
    (torch.float16, "float32", "F32"),
])
def test_unquantized_tensors_keep_the_source_dtype_or_the_named_one(quantized, tmp_path, source, named, expected):
    quantized.source_dtype = source
    folder = lords.save(quantized, tmp_path / "ckpt", dtype=named)
    dtypes = stored_dtypes(folder)
    assert "lm_head.weight" not in dtypes  # tied to the embedding: stored once
    for name, dtype in dtypes.items():
        if name.endswith((".scale_b", ".scale_a")):
            assert dtype == "BF16", name  # the scales' own dtype (LoRDSConfig.scale_dtype)
        elif name.endswith(".codes"):
            assert dtype == "U8", name
        elif name.endswith(".codebook"):
            assert dtype == "F32", name  # the levels exactly
        else:
            assert dtype == expected, name  # embeddings, norms
    assert json.loads((folder / "config.json").read_text())["dtype"] == {
        "F16": "float16", "BF16": "bfloat16", "F32": "float32"}[expected]
    assert quantized.model.embed_tokens.weight.dtype == torch.float32  # the model in memory is left as it was


def test_large_checkpoints_are_sharded_as_transformers_does(quantized, tmp_path):
    ids = torch.randint(0, 96, (2, 11))
    folder = lords.save(quantized, tmp_path / "ckpt", dtype=torch.float32, max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for n, t in quantized.state_dict().items() if n != "lm_head.weight")
    assert all((folder / shard).stat().st_size <= 40_000 + 4_000 for shard in shards)  # + the header
    assert torch.equal(lords.load(folder)(ids).logits, quantized(ids).logits)


def test_saving_a_large_checkpoint_shows_a_bar_of_its_bytes(quantized, tmp_path, monkeypatch, capsys):
    stored = sum(t.numel() * t.element_size() for n, t in quantized.state_dict().items() if n != "lm_head.weight")
    monkeypatch.setattr(lords.checkpoint, "PROGRESS_BYTES", stored)  # a bar from PROGRESS_BYTES on, that size included
    lords.save(quantized, tmp_path / "ckpt", dtype=torch.float32)
    bar = capsys.readouterr().err.splitlines()[-1]
    assert bar.startswith("saving: 100%") and f"{stored / 1e3:.1f}k/{stored / 1e3:.1f}k " in bar
    assert bar.endswith("B/s]")  # bytes
    lords.save(quantized, tmp_path / "quiet", dtype=torch.float32, progress=False)
    monkeypatch.setattr(lords.checkpoint, "PROGRESS_BYTES", stored + 1)
    lords.save(quantized, tmp_path / "small", dtype=torch.float32)
    assert "saving" not in capsys.readouterr().err


@pytest.mark.parametrize("size,message", [("5 parsecs", "shard size must be bytes or a size like '5GB'"),
                                          (0, "shard size must be positive")])
def test_bad_shard_size_is_named(quantized, tmp_path, size, message):
    with pytest.raises(ValueError, match=message):
        lords.save(quantized, tmp_path / "ckpt", max_shard_size=size)
    assert not (tmp_path / "ckpt").exists()


def test_bad_dtype_is_named(quantized, tmp_path):
    with pytest.raises(ValueError, match="dtype must be a floating dtype .* got torch.int8"):
        lords.save(quantized, tmp_path / "ckpt", dtype=torch.int8)


def test_defaults_load_verified_float32_on_the_cpu_and_record_the_stored_dtype(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt", tokenizer=word_tokenizer())  # bf16: the default storage
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).get_vocab() == word_tokenizer().get_vocab()
    for device in ("cpu", torch.device("cpu")):
        loaded = lords.load(folder, device=device)
        assert loaded.model.embed_tokens.weight.dtype == torch.float32  # lords' CPU convention
        assert loaded.source_dtype == torch.bfloat16  # so that saving it again keeps bf16
    assert lords.load(folder, dtype="auto").model.embed_tokens.weight.dtype == torch.bfloat16
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor: stored bits that are not what was saved
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256 digest"):
        lords.load(folder)


def test_stripped_or_corrupt_configs_are_named(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    (folder / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=exactly(f"{folder / 'config.json'} is corrupt: not a JSON object")):
        lords.load(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=exactly(
            f"{folder} holds tensors written by lords but its config.json has no quantization_config with "
            "quant_method 'lords' (nor a lords_config.json); it would load with random weights: restore the "
            "config.json that lords saved with it")):
        lords.load(folder)
    for part, dtype in (("codes", torch.uint8), ("scale_b", torch.bfloat16)):
        other = tmp_path / part  # an older lords wrote no digests: its tensors' names give it away
        other.mkdir()
        (other / "config.json").write_text("{}")
        (other / "broken.safetensors").write_bytes(b"not a safetensors file")  # read first, skipped
        save_file({f"model.layers.0.mlp.up_proj.{part}": torch.zeros(4, dtype=dtype)}, str(other / WEIGHTS_NAME))
        with pytest.raises(CheckpointError, match=f"^{other} holds tensors written by lords"):
            lords.load(other)


@pytest.mark.parametrize("change,message", [
    (lambda meta: [1], "is corrupt: not a JSON object"),
    (lambda meta: {**meta, "format": "other"}, "is not a lords config this lords reads (format='other', "
                                               "format_version=2)"),
    (lambda meta: {**meta, "layers": {"model.layers.0.mlp.up_proj": 5}},
     "'layers' must map layer names to their fields, got {'model.layers.0.mlp.up_proj': 5}"),
    (lambda meta: {**meta, "layers": {}}, "'layers' must map layer names to their fields, got {}"),
    (lambda meta: {**meta, "quantization": "abc"}, "quantization_config: quantization must be a dict or null, got "
                                                   "'abc'"),
])
def test_bad_format_2_configs_are_named(quantized, tmp_path, change, message):
    folder = lords.save(quantized, tmp_path / "ckpt")
    _as_format_2(folder)
    path = folder / LEGACY_CONFIG_NAME
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    separator = " " if message.startswith("is ") else ": "
    with pytest.raises(CheckpointError, match=exactly(f"cannot load {folder}: {path}{separator}{message}")):
        lords.load(folder)


def test_corrupt_format_2_config_is_named(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    _as_format_2(folder)
    path = folder / LEGACY_CONFIG_NAME
    path.write_text("{not json")
    with pytest.raises(json.JSONDecodeError) as error:
        json.loads(path.read_text())
    with pytest.raises(CheckpointError, match=exactly(f"cannot load {folder}: {path} is corrupt: {error.value}")):
        lords.load(folder)


def test_format_2_keeps_its_quantization_settings(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt", config=lords.LoRDSConfig(bits=3, block_size=32))
    quantization = json.loads((folder / "config.json").read_text())["quantization_config"]["quantization"]
    _as_format_2(folder)
    assert lords.load(folder).config.quantization_config.quantization == quantization


def test_bad_storage_dtype_names_are_named(quantized, tmp_path):
    with pytest.raises(ValueError, match=exactly("dtype must be a floating dtype such as bfloat16, float16 or "
                                                 "float32, got 'float77'")):
        lords.save(quantized, tmp_path / "ckpt", dtype="float77")


def test_shard_sizes_are_parsed_as_transformers_does():
    assert [parse_size(size) for size in (1, "1", "2KB", " 1.5 mb ", "5GB", "2GiB", "3KiB", "1TB")] == [
        1, 1, 2000, 1_500_000, 5 * 10**9, 2 * 2**30, 3 * 1024, 10**12]


def test_quantized_tensor_names_are_the_layers_codes_codebooks_and_scales(quantized):
    names = quantized_tensor_names(quantized)
    assert len(names) == 4 * 14 and {f"model.layers.1.mlp.down_proj.{part}" for part in (
        "codes", "codebook", "scale_b", "scale_a")} <= names


@pytest.mark.filterwarnings("error")  # e.g. Python's warning for a binary file opened line-buffered
def test_sharded_writer_fills_shards_up_to_the_limit_and_writes_safetensors(tmp_path):
    tensors = {f"t{i}": torch.arange(2, dtype=torch.float32) + i for i in range(4)}  # 8 bytes each
    tensors["codes"] = torch.arange(3, dtype=torch.uint8)
    writer = ShardedSafetensors(tmp_path, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, 16)
    assert writer.files == {"model-00001-of-00003.safetensors": ["t0", "t1"],  # 8 + 8 bytes fill 16 exactly
                            "model-00002-of-00003.safetensors": ["t2", "t3"],
                            "model-00003-of-00003.safetensors": ["codes"]}
    for name in ("codes", "t3", "t0", "t2"):  # any order
        writer.write(name, tensors[name])
    with pytest.raises(RuntimeError, match=exactly("1 tensors were never written, e.g. ['t1']")):
        writer.close()
    with pytest.raises(ValueError, match=exactly("t1: expected torch.float32 (2,), got torch.float64 (2,)")):
        writer.write("t1", tensors["t1"].double())
    writer.write("t1", tensors["t1"])
    writer.close()
    index = {"metadata": {"total_size": 35}, "weight_map": {n: f for f, ns in writer.files.items() for n in ns}}
    assert (tmp_path / "model.safetensors.index.json").read_text() == json.dumps(index, indent=2)
    for file, names in writer.files.items():
        path = tmp_path / file
        loaded = load_file(str(path))
        assert loaded.keys() == set(names) and all(torch.equal(loaded[n], tensors[n]) for n in names)
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        assert metadata.keys() == {"format", integrity.DIGESTS_KEY} and metadata["format"] == "pt"  # as transformers
        assert json.loads(metadata[integrity.DIGESTS_KEY]) == {
            n: integrity.digest(integrity.tensor_bytes(tensors[n])) for n in names}
        start, header = read_header(path)
        assert start % 8 == 0  # safetensors aligns the data to 8 bytes
        for name in names:
            value = read_tensor(path, start, header[name])
            assert value.dtype == tensors[name].dtype and torch.equal(value, tensors[name])
        assert path.stat().st_size == start + sum(tensors[n].numel() * tensors[n].element_size() for n in names)


def test_more_than_three_unwritten_tensors_are_named_by_the_first_three(tmp_path):
    writer = ShardedSafetensors(tmp_path, {f"t{i}": ((1,), torch.float32) for i in range(5)}, "1GB")
    with pytest.raises(RuntimeError, match=exactly("5 tensors were never written, e.g. ['t0', 't1', 't2']")):
        writer.close()


def test_load_hands_the_device_map_dtype_and_other_arguments_to_transformers(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")  # bf16
    for device in ("auto", {"": "cpu"}):  # a device map, not one device: the stored dtype
        assert lords.load(folder, device=device).model.embed_tokens.weight.dtype == torch.bfloat16
    on_meta = lords.load(folder, device="meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    assert lords.load(folder).config._attn_implementation == "sdpa"  # transformers' default, so the next check counts
    assert lords.load(folder, attn_implementation="eager").config._attn_implementation == "eager"


def test_missing_weights_are_named(quantized, tmp_path):
    folder = lords.save(quantized, tmp_path / "ckpt")
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=re.escape(
            f"cannot load {folder}: a weights file is corrupt, truncated or missing: ") + ".*no file named"):
        lords.load(folder)


@pytest.mark.parametrize("change,expected", [
    (lambda config: config.update(torch_dtype=config.pop("dtype")), torch.bfloat16),  # as older transformers wrote it
    (lambda config: config.pop("dtype"), None),
    (lambda config: config.update(dtype="float77"), None),
])
def test_the_source_dtype_is_read_from_either_config_key(quantized, tmp_path, change, expected):
    folder = lords.save(quantized, tmp_path / "ckpt")
    edit_json(folder / "config.json", change)
    assert lords.load(folder).source_dtype == expected


def test_read_header_and_read_tensor_name_a_broken_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=exactly(
            f"{path} is not a safetensors file (truncated, or its header length is wrong)")):
        read_header(path)
    path = tmp_path / WEIGHTS_NAME
    save_file({"weight": torch.ones(4)}, str(path))
    start, header = read_header(path)
    with open(path, "r+b") as handle:  # shortened after its header was read, as by a copy still under way
        handle.truncate(start + 8)
    with pytest.raises(CheckpointError, match=exactly(f"{path} is truncated: {header['weight']} runs past its end")):
        read_tensor(path, start, header["weight"])


def test_dense_dtype_is_the_first_floating_tensor_outside_the_lords_layers():
    lords_first = torch.nn.Sequential(LoRDSLinear(64, 8, bits=4, rank=1), torch.nn.LayerNorm(8, dtype=torch.float16))
    assert list(lords_first.state_dict())[:4] == ["0.scale_b", "0.scale_a", "0.codes", "0.codebook"]  # bf16 first
    assert dense_dtype(lords_first) == torch.float16
    assert dense_dtype(torch.nn.Sequential(LoRDSLinear(64, 8, bits=4, rank=1))) == torch.bfloat16  # nothing dense


def test_a_model_without_a_generation_config_is_saved_without_one(quantized, tmp_path):
    del quantized.generation_config  # as a model that is not a transformers generator
    folder = lords.save(quantized, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", WEIGHTS_NAME]
