"""Nothing wrong loads or runs silently (issue 23): each case asserts the exact failure (message, exit code) or the
exact recovery, on tiny random models. The checkpoint and folders are made once per module; a test that damages
one works on its own copy."""

import copy
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import word_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lords
from lords import atomic, integrity
from lords.assets import load_pretrained
from lords.checkpoint import WEIGHTS_NAME, CheckpointError
from lords.cli import main
from lords.model import LayerReport, warn_outliers
from lords.peft import ADAPTER_WEIGHTS, load_adapter, mark_trainable, save_adapter
from lords.skills import apply_skill, extract, load_skill, save_skill
from lords.stream import open_source

QUANTIZE = lords.LoRDSConfig(bits=4, block_size=32, steps=2)


def tiny(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A dense folder, a lords checkpoint of it (with tokenizer), an adapter of the checkpoint, and a skill file."""
    root = tmp_path_factory.mktemp("robust")
    dense = tiny()
    dense.save_pretrained(root / "dense")
    word_tokenizer().save_pretrained(root / "dense")
    quantized = copy.deepcopy(dense)
    lords.quantize(quantized, QUANTIZE, progress=False)
    lords.save(quantized, root / "ckpt", tokenizer=word_tokenizer())
    mark_trainable(quantized)
    save_adapter(quantized, root / "adapter")
    tuned = copy.deepcopy(dense)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(1e-3)
    save_skill(extract(dense, tuned), root / "skill.safetensors", {"base": "dense"})
    return root


@pytest.fixture
def ckpt(made, tmp_path):
    """A copy of the checkpoint to damage."""
    return Path(shutil.copytree(made / "ckpt", tmp_path / "ckpt"))


def run(argv, capsys) -> tuple[int, str]:
    """(exit code, last line of stderr or the SystemExit message) of the CLI; no other exception may escape."""
    try:
        main([str(arg) for arg in argv])
    except SystemExit as exit_:
        err = capsys.readouterr().err.strip().splitlines()
        if isinstance(exit_.code, str):
            return 1, exit_.code
        return exit_.code, err[-1] if err else ""
    return 0, ""


def tensor_place(path: Path, name: str) -> int:
    start, header, _ = integrity.read_header(path)
    return start + header[name]["data_offsets"][0]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


# --- integrity ---------------------------------------------------------------------------------------------------

def test_every_tensor_has_a_digest_that_matches_its_bytes(made):
    path = made / "ckpt" / WEIGHTS_NAME
    _, header, metadata = integrity.read_header(path)
    digests = json.loads(metadata[integrity.DIGESTS_KEY])
    tensors = load_file(str(path))
    assert set(digests) == set(header) == set(tensors)
    assert all(digests[name] == integrity.digest(integrity.tensor_bytes(t)) for name, t in tensors.items())


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.codes", "model.layers.0.self_attn.q_proj.scale_b",
                                  "model.layers.1.mlp.up_proj.codebook", "model.embed_tokens.weight"])
def test_a_flipped_byte_is_refused_naming_the_tensor(ckpt, name):
    path = ckpt / WEIGHTS_NAME
    flip_byte(path, tensor_place(path, name) + 1)
    with pytest.raises(CheckpointError) as error:
        lords.load(ckpt)
    assert str(error.value) == (f"cannot load {ckpt}: {path}: tensor {name} does not match its sha256 digest "
                                "(the file is corrupt)")


def test_plain_from_pretrained_verifies_too_and_verify_false_skips(made, ckpt):
    path = ckpt / WEIGHTS_NAME
    name = "model.layers.1.mlp.down_proj.codes"
    flip_byte(path, tensor_place(path, name))
    with pytest.raises(integrity.IntegrityError, match=f"tensor {name} does not match its sha256 digest"):
        AutoModelForCausalLM.from_pretrained(ckpt)
    damaged = lords.load(ckpt, verify=False).model.layers[1].mlp.down_proj.codes  # trusted files: loads what is there
    intact = lords.load(made / "ckpt").model.layers[1].mlp.down_proj.codes
    assert (damaged != intact).sum().item() == 1


def test_a_nan_in_a_file_without_digests_is_refused(ckpt):
    path = ckpt / WEIGHTS_NAME
    tensors = load_file(str(path))
    tensors["model.embed_tokens.weight"][3, 5] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})  # as a writer that records no digests
    with pytest.raises(CheckpointError) as error:
        lords.load(ckpt)
    assert str(error.value) == f"cannot load {ckpt}: {path}: tensor model.embed_tokens.weight holds NaN or Inf values"


def test_scales_that_overflow_are_caught_on_the_first_forward(made, tmp_path):
    """Finite stored scales whose product overflows pass the load check; the first forward names the layer."""
    model = lords.load(made / "ckpt")
    layer = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.scale_b.mul_(1e25)
        layer.scale_a.mul_(1e25)
    lords.save(model, tmp_path / "overflow")
    tokens = torch.tensor([[1, 2, 3]])
    loaded = lords.load(tmp_path / "overflow")
    with pytest.raises(integrity.IntegrityError) as error:
        loaded(tokens)
    assert str(error.value) == (
        "model.layers.1.mlp.up_proj gives NaN or Inf outputs for finite inputs on the model's first forward: its "
        "scales or codebook overflow torch.float32 (the checkpoint is damaged or was written from a diverged model)")
    assert not bool(torch.isfinite(lords.load(tmp_path / "overflow", verify=False)(tokens).logits).all())
    healthy = lords.load(made / "ckpt")
    assert all(len(m._forward_hooks) == 1 for m in healthy.modules() if isinstance(m, lords.LoRDSLinear))
    healthy(tokens)
    assert all(len(m._forward_hooks) == 0 for m in healthy.modules() if isinstance(m, lords.LoRDSLinear))


def test_a_model_with_nan_is_not_saved(made, tmp_path):
    model = lords.load(made / "ckpt")
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    with pytest.raises(integrity.IntegrityError) as error:
        lords.save(model, tmp_path / "out")
    assert str(error.value) == "tensor model.norm.weight holds NaN or Inf values; refusing to save it"
    assert list(tmp_path.iterdir()) == []  # no staging folder left


@pytest.mark.parametrize("damage, message", [
    (lambda data: (2**40).to_bytes(8, "little") + data[8:],
     "is not a safetensors file (truncated, or its header length is wrong)"),
    (lambda data: data[:8] + b"[" + data[9:], "is not a safetensors file (its header is not JSON)"),
    (lambda data: data.replace(b'"dtype":"BF16"', b'"dtype":"F32" ', 1), "do not fit its shape and dtype"),
    (lambda data: data[: len(data) - 100], "is truncated: tensor"),
])
def test_crafted_or_truncated_files_fail_cleanly(ckpt, damage, message):
    path = ckpt / WEIGHTS_NAME
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message.replace("(", "\\(").replace(")", "\\)")):
        lords.load(ckpt)


def test_digest_metadata_must_list_the_files_tensors(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.zeros(2)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata=integrity.digest_metadata({"a": tensors["a"]}))
    with pytest.raises(integrity.IntegrityError) as error:
        integrity.verify_file(tmp_path / "x.safetensors")
    assert str(error.value) == f"{tmp_path / 'x.safetensors'}: the lords_sha256 metadata does not list exactly the " \
                               "file's tensors"


# --- one loader decides ------------------------------------------------------------------------------------------

def edit_json(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def stripped_message(folder: Path) -> str:
    return (f"{folder} holds tensors written by lords but its config.json has no quantization_config with "
            "quant_method 'lords' (nor a lords_config.json); it would load with random weights: restore the "
            "config.json that lords saved with it")


@pytest.mark.parametrize("strip", [lambda c: c.pop("quantization_config"),
                                   lambda c: c["quantization_config"].update(quant_method="bitsandbytes")])
def test_a_folder_of_lords_tensors_without_its_lords_config_is_refused(ckpt, strip, capsys):
    edit_json(ckpt / "config.json", strip)
    for load in (lords.load, load_pretrained, open_source):
        with pytest.raises(ValueError) as error:
            load(ckpt)
        expected = f"{ckpt} is a lords checkpoint already; quantize the dense model it came from" \
            if load is open_source else stripped_message(ckpt)
        assert str(error.value) == expected
    assert run(["generate", ckpt, "hello"], capsys) == (1, f"error: {stripped_message(ckpt)}")


def test_a_layer_missing_from_quantization_config_is_refused(ckpt):
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"]["layers"].pop("model.layers.1.mlp.down_proj"))
    with pytest.raises(CheckpointError) as error:
        lords.load(ckpt)
    assert str(error.value) == (f"cannot load {ckpt}: the checkpoint stores LoRDS layers its quantization_config does "
                                "not name (1, e.g. ['model.layers.1.mlp.down_proj']); config.json does not match the "
                                "weights")


LAYER = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("field, value, message", [
    ("bits", 5, "bits must be one of (2, 3, 4), got 5"),
    ("bits", "4", "bits must be an integer, got '4'"),
    ("rank", 0, "rank must be a positive integer, got 0"),
    ("rank", True, "rank must be a positive integer, got True"),
    ("rank", 2.5, "rank must be a positive integer, got 2.5"),
    ("codebook", "fp", "codebook must be one of ('nf', 'int'), got 'fp'"),
    ("scale_dtype", "int8", "scale_dtype must be one of ('bfloat16', 'float16', 'float32'), got 'int8'"),
])
def test_malformed_layer_fields_are_named(ckpt, field, value, message):
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"]["layers"][LAYER].update({field: value}))
    with pytest.raises(CheckpointError) as error:
        lords.load(ckpt)
    assert str(error.value) == f"cannot load {ckpt}: quantization_config layer {LAYER}: {message}"


@pytest.mark.parametrize("change, message", [
    (lambda q: q.update(layers=[]), "quantization_config: layers must map layer names to their fields, got []"),
    (lambda q: q.update(quantization="x"), "quantization_config: quantization must be a dict or null, got 'x'"),
    (lambda q: q["layers"][LAYER].pop("rank"), f"quantization_config layer {LAYER}: expected the fields ['bits', "
     "'rank', 'codebook', 'scale_dtype'] (and 'experts' for a stack of experts), got {'bits': 4, 'codebook': 'nf', "
     "'scale_dtype': 'bfloat16'}"),
    (lambda q: q.update(format_version=9), "this lords checkpoint has format_version 9"),
])
def test_malformed_quantization_config_is_named(ckpt, change, message):
    edit_json(ckpt / "config.json", lambda c: change(c["quantization_config"]))
    with pytest.raises(CheckpointError) as error:
        lords.load(ckpt)
    assert str(error.value).startswith(f"cannot load {ckpt}: {message}")


def as_format_2(folder: Path) -> Path:
    """The layout before the transformers integration: lords_config.json beside config.json."""
    config = json.loads((folder / "config.json").read_text())
    quantization = config.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(config))
    meta = {"format": "lords", "format_version": 2, "quantization": quantization["quantization"],
            "layers": quantization["layers"]}
    (folder / "lords_config.json").write_text(json.dumps(meta))
    return folder / "lords_config.json"


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("layers"), "'layers' must map layer names to their fields, got None"),
    (lambda m: m.update(layers={LAYER: 4}), "'layers' must map layer names to their fields, got {'" + LAYER + "': 4}"),
    (lambda m: m["layers"][LAYER].pop("codebook"), f"quantization_config layer {LAYER}: codebook must be one of "
     "('nf', 'int'), got None"),
    (lambda m: m["layers"][LAYER].update(rank=-1), f"quantization_config layer {LAYER}: rank must be a positive "
     "integer, got -1"),
    (lambda m: m.update(quantization={"bits": 4, "block_size": 0}), "block_size must be a positive integer, got 0"),
])
def test_malformed_lords_config_json_is_named(ckpt, change, message):
    path = as_format_2(ckpt)
    edit_json(path, change)
    with pytest.raises(CheckpointError) as error:
        lords.load(ckpt)
    assert str(error.value) == f"cannot load {ckpt}: {path}: {message}"
    path.unlink()
    with pytest.raises(CheckpointError) as error:  # and without it, the lords tensors are not loaded as dense
        lords.load(ckpt)
    assert str(error.value) == stripped_message(ckpt)


# --- adapters and skills: validated before anything moves --------------------------------------------------------

@pytest.fixture
def adapter(made, tmp_path):
    return Path(shutil.copytree(made / "adapter", tmp_path / "adapter"))


def scales(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(("scale_b", "scale_a"))}


def rewrite_adapter(folder: Path, change) -> None:
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata=integrity.digest_metadata(tensors))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({f"{LAYER}.codes": torch.zeros(128, 32, dtype=torch.uint8)}),
     f"adapter tensor {LAYER}.codes is not a scale (scale_b or scale_a); an adapter holds only trained scales, never "
     "codes or codebooks"),
    (lambda t: t.update({f"{LAYER}.codebook": torch.zeros(16)}),
     f"adapter tensor {LAYER}.codebook is not a scale (scale_b or scale_a); an adapter holds only trained scales, "
     "never codes or codebooks"),
    (lambda t: t.update({"model.layers.9.mlp.up_proj.scale_b": torch.zeros(128, 1)}),
     "adapter tensor model.layers.9.mlp.up_proj.scale_b names layer model.layers.9.mlp.up_proj, which the model does "
     "not have"),
    (lambda t: t.update({"model.layers.1.self_attn.v_proj.scale_a": torch.zeros(3, 64, dtype=torch.bfloat16)}),
     "adapter tensor model.layers.1.self_attn.v_proj.scale_a is torch.bfloat16 (3, 64), the model expects a floating "
     "(1, 64)"),
    (lambda t: t.update({f"{LAYER}.scale_b": t[f"{LAYER}.scale_b"].to(torch.int16)}),
     f"adapter tensor {LAYER}.scale_b is torch.int16 (128, 1), the model expects a floating (128, 1)"),
])
def test_a_bad_adapter_tensor_changes_nothing(made, adapter, change, message):
    rewrite_adapter(adapter, change)
    model = lords.load(made / "ckpt")
    before = scales(model)
    with pytest.raises(ValueError) as error:
        load_adapter(model, adapter)
    assert str(error.value) == message
    assert all(torch.equal(before[name], value) for name, value in scales(model).items())


def test_damaged_adapter_files_are_refused(made, adapter):
    model = lords.load(made / "ckpt")
    path = adapter / ADAPTER_WEIGHTS
    flip_byte(path, tensor_place(path, f"{LAYER}.scale_a") + 3)
    with pytest.raises(ValueError) as error:
        load_adapter(model, adapter)
    assert str(error.value) == (f"cannot read adapter {path}: {path}: tensor {LAYER}.scale_a does not match its sha256 "
                                "digest (the file is corrupt)")
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError, match=f"cannot read adapter {path}: {path} is truncated: tensor "):
        load_adapter(model, adapter)
    edit_json(adapter / "adapter_config.json", lambda c: c.update(codes_sha256=7))
    with pytest.raises(ValueError, match="adapter_config.json is not a lords adapter of format version 1"):
        load_adapter(model, adapter)


def test_a_skill_of_another_layer_count_is_refused_unless_a_subset_is_asked(made):
    deltas, _ = load_skill(made / "skill.safetensors")
    target = tiny(3)
    before = {name: p.detach().clone() for name, p in target.named_parameters()}
    with pytest.raises(ValueError) as error:
        apply_skill(target, deltas)
    assert str(error.value) == (
        "the skill does not cover 9 of the model's 29 parameters (e.g. ['model.layers.2.input_layernorm.weight', "
        "'model.layers.2.mlp.down_proj.weight', 'model.layers.2.mlp.gate_proj.weight']): it was extracted from another "
        "architecture; pass subset=True (--allow-subset) to apply it to the parameters it has")
    assert all(torch.equal(before[name], p) for name, p in target.named_parameters())
    apply_skill(target, deltas, subset=True)
    moved = {name for name, p in target.named_parameters() if not torch.equal(before[name], p)}
    assert moved == set(deltas)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update({"model.norm.weight": torch.full((64,), float("nan"))}),
     "skill tensor model.norm.weight is not a finite floating tensor"),
    (lambda d: d.update({"model.norm.weight": torch.zeros(65)}), "skill tensor model.norm.weight is (65,), the model's "
     "is (64,)"),
])
def test_a_bad_skill_tensor_changes_nothing(made, change, message):
    deltas, _ = load_skill(made / "skill.safetensors")
    change(deltas)
    target = tiny()
    before = {name: p.detach().clone() for name, p in target.named_parameters()}
    with pytest.raises(ValueError) as error:
        apply_skill(target, deltas)
    assert str(error.value) == message
    assert all(torch.equal(before[name], p) for name, p in target.named_parameters())


def test_skill_files_are_verified_and_only_skill_files_are_replaced(made, tmp_path):
    path = Path(shutil.copy(made / "skill.safetensors", tmp_path / "skill.safetensors"))
    flip_byte(path, tensor_place(path, "model.norm.weight") + 2)
    with pytest.raises(ValueError) as error:
        load_skill(path)
    assert str(error.value) == (f"cannot read skill file {path}: {path}: tensor model.norm.weight does not match its "
                                "sha256 digest (the file is corrupt)")
    user_file = tmp_path / "notes.safetensors"
    user_file.write_text("mine")
    with pytest.raises(OSError) as error:
        save_skill({"x": torch.ones(2)}, user_file, {}, overwrite=True)
    assert str(error.value) == (f"{user_file} is not a file lords wrote; lords replaces only its own outputs, so "
                                "remove it yourself or choose another path")
    assert user_file.read_text() == "mine"
    save_skill({"x": torch.ones(2)}, path, {}, overwrite=True)  # a skill file is replaced
    assert load_skill(path)[0].keys() == {"x"}


# --- layers and quantization ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_lords_linear_refuses_non_floating_inputs(made, dtype):
    layer = lords.load(made / "ckpt").model.layers[0].mlp.up_proj
    with pytest.raises(TypeError) as error:
        layer(torch.ones(2, 64, dtype=dtype))
    assert str(error.value) == f"LoRDSLinear takes floating inputs, got {dtype}"


def test_a_nan_in_a_late_layer_leaves_the_model_untouched():
    model = tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[5, 7] = float("nan")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError) as error:
        lords.quantize(model, QUANTIZE, progress=False)
    assert str(error.value) == "model.layers.1.mlp.down_proj contains NaN or Inf values; refusing to quantize it"
    assert not any(isinstance(m, lords.LoRDSLinear) for m in model.modules())
    assert all(torch.equal(before[n].nan_to_num(), p.nan_to_num()) for n, p in model.named_parameters())


def test_a_layer_far_worse_than_its_peers_is_named():
    reports = [LayerReport(f"layer{i}", (4, 4), 4, 1, 4.5, error, error, error, 0.0)
               for i, error in enumerate([0.1, 0.11, 0.09, 0.1, 0.35])]
    with pytest.warns(UserWarning) as caught:
        warn_outliers(reports)
    assert [str(w.message) for w in caught] == [
        "layer4: relative weight error 0.3500 is 3.5x the median of the other layers (0.1000)"]


def test_finite_weights_that_quantize_to_inf_raise_and_leave_the_model_untouched():
    model = tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(5e13)
    with pytest.raises(ValueError) as error:
        lords.quantize(model, lords.LoRDSConfig(bits=4, block_size=32, steps=2, scale_dtype="float16"), progress=False)
    largest = model.model.layers[1].mlp.down_proj.weight.abs().max().item()
    assert str(error.value) == (f"quantizing model.layers.1.mlp.down_proj gave NaN or Inf values (its largest weight "
                                f"is {largest:.3g}; scale_dtype float16 cannot hold its scales)")
    assert not any(isinstance(m, lords.LoRDSLinear) for m in model.modules())


# --- crash-safe writes ---------------------------------------------------------------------------------------------

def write_generation(generation: int, files: int = 4, size: int = 1 << 16):
    def write(staging: Path) -> None:
        for index in range(files):
            (staging / f"part{index}.bin").write_bytes(bytes([generation % 256]) * size)
        (staging / "config.json").write_text(json.dumps({"generation": generation}))
    return write


def folder_state(folder: Path, files: int = 4, size: int = 1 << 16):
    """None when absent, else the generation every file of the folder holds (asserting they agree and are whole)."""
    if not folder.exists():
        return None
    generation = json.loads((folder / "config.json").read_text())["generation"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"] + [f"part{i}.bin" for i in range(files)]
    assert all((folder / f"part{i}.bin").read_bytes() == bytes([generation % 256]) * size for i in range(files))
    return generation


@pytest.mark.parametrize("kind", ["file", "symlink", "user folder"])
def test_a_destination_that_is_not_a_lords_output_is_never_replaced(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("mine")
        message = f"{target} is a file, not a folder; choose another output path"
    elif kind == "symlink":
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
        message = f"{target} is a symbolic link; give the real path (lords does not replace links)"
    else:
        target.mkdir()
        (target / "thesis.tex").write_text("mine")
        message = (f"{target} holds no config.json or adapter_config.json; lords replaces only its own outputs, so "
                   "remove it yourself or choose another path")
    listing = sorted(tmp_path.rglob("*"))
    with pytest.raises(atomic.DestinationError) as error:
        atomic.write_folder(target, True, write_generation(1))
    assert str(error.value) == message
    assert sorted(tmp_path.rglob("*")) == listing


def test_a_failed_write_keeps_the_old_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    atomic.write_folder(target, False, write_generation(1))

    def full_disk(staging: Path) -> None:
        write_generation(2)(staging)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        atomic.write_folder(target, True, full_disk)
    assert folder_state(target) == 1 and os.listdir(tmp_path) == ["out"]


def test_files_get_the_permissions_the_umask_gives(made, tmp_path):
    previous = os.umask(0o027)
    try:
        lords.save(lords.load(made / "ckpt"), tmp_path / "out", tokenizer=word_tokenizer())
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o640} and WEIGHTS_NAME in modes
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


def test_what_a_killed_writer_left_is_recovered(tmp_path):
    target = tmp_path / "out"
    atomic.write_folder(target, False, write_generation(1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target.rename(tmp_path / f".out.{atomic.RETIRED}-{pid}-0000abcd")  # killed between the fallback's renames
    (tmp_path / f".out.{atomic.STAGING}-{pid}-0000abce").mkdir()
    (tmp_path / f".out.{atomic.STAGING}-{pid}-0000abce" / "part0.bin").write_bytes(b"half")
    atomic.recover(target)
    assert folder_state(target) == 1 and os.listdir(tmp_path) == ["out"]


KILLED_WRITER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
if sys.argv[3] == "fallback":
    atomic._exchange = lambda first, second: False
generation = 0
while True:
    generation += 1
    def write(staging, generation=generation):
        for index in range(4):
            (staging / f"part{index}.bin").write_bytes(bytes([generation % 256]) * (1 << 16))
        (staging / "config.json").write_text(json.dumps({"generation": generation}))
    atomic.write_folder(sys.argv[2], True, write)
    print(generation, flush=True)
"""


def test_saves_killed_at_random_points_leave_old_or_new_and_nothing_else(tmp_path):
    """30 writers, each killed (SIGKILL or SIGTERM, exchange or fallback swap) at a random instant of a loop of
    saves once its first save is done: the destination then holds a whole generation, no older than the last one
    reported done, and nothing else is left once recover() ran (as the next save or load does); after a SIGTERM
    nothing is left at all."""
    import random
    import signal
    import time

    generator = random.Random(0)
    target = tmp_path / "out"
    for trial in range(30):
        kill = signal.SIGKILL if trial % 2 else signal.SIGTERM
        swap = "fallback" if trial % 4 >= 2 else "exchange"
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, atomic.__file__, str(target), swap],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "1"
        time.sleep(generator.uniform(0.0, 0.3))
        writer.send_signal(kill)
        completed = int(([1] + writer.communicate()[0].split())[-1])
        if kill == signal.SIGTERM:
            assert os.listdir(tmp_path) == ["out"]
        atomic.recover(target)
        assert os.listdir(tmp_path) == ["out"]
        assert folder_state(target) in (completed, completed + 1)  # a save may finish between its print and the kill


# --- the command line: one line and a non-zero exit code, never a traceback ---------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["quantize", "--out", "o", "--steps", "-1"],
     "lords quantize: error: argument --steps: must be at least 0, got '-1'"),
    (["quantize", "--out", "o", "--lr", "nan"], "lords quantize: error: argument --lr: must be above 0, got 'nan'"),
    (["quantize", "--out", "o", "--lr", "0"], "lords quantize: error: argument --lr: must be above 0, got '0'"),
    (["quantize", "--out", "o", "--block-size", "0"],
     "lords quantize: error: argument --block-size: must be at least 1, got '0'"),
    (["quantize", "--out", "o", "--block-size", "1.5"],
     "lords quantize: error: argument --block-size: expected an integer, got '1.5'"),
    (["quantize", "--out", "o", "--rank", "-4"],
     "lords quantize: error: argument --rank: must be at least 1, got '-4'"),
    (["quantize", "--out", "o", "--calib-samples", "0"],
     "lords quantize: error: argument --calib-samples: must be at least 1, got '0'"),
    (["quantize", "--out", "o", "--calib-len", "-1"],
     "lords quantize: error: argument --calib-len: must be at least 1, got '-1'"),
    (["eval", "--seq-len", "0"], "lords eval: error: argument --seq-len: must be at least 1, got '0'"),
    (["eval", "--max-tokens", "0"], "lords eval: error: argument --max-tokens: must be at least 1, got '0'"),
    (["finetune", "--out", "o", "--steps", "0"],
     "lords finetune: error: argument --steps: must be at least 1, got '0'"),
    (["finetune", "--out", "o", "--batch-size", "-2"],
     "lords finetune: error: argument --batch-size: must be at least 1, got '-2'"),
    (["finetune", "--out", "o", "--lr", "inf"], "lords finetune: error: argument --lr: must be above 0, got 'inf'"),
    (["finetune", "--out", "o", "--slices", "0"],
     "lords finetune: error: argument --slices: must be at least 1, got '0'"),
    (["qat", "--out", "o", "--scale-lr-multiplier", "-1"],
     "lords qat: error: argument --scale-lr-multiplier: must be above 0, got '-1'"),
    (["qat", "--out", "o", "--ptq-steps", "-3"],
     "lords qat: error: argument --ptq-steps: must be at least 0, got '-3'"),
    (["generate", "m", "hi", "--max-new-tokens", "0"],
     "lords generate: error: argument --max-new-tokens: must be at least 1, got '0'"),
    (["skill", "apply", "m", "s", "--out", "o", "--scale", "inf"],
     "lords skill apply: error: argument --scale: must be finite, got 'inf'"),
    (["skill", "apply", "m", "s", "--out", "o", "--refit-steps", "-1"],
     "lords skill apply: error: argument --refit-steps: must be at least 0, got '-1'"),
    (["skill", "sweep", "m", "s", "--scales", "1", "nan"],
     "lords skill sweep: error: argument --scales: must be finite, got 'nan'"),
    (["compare", "--bits", "5"], "lords compare: error: argument --bits: invalid choice: 5 (choose from 2, 3, 4)"),
    (["compare", "--steps", "x"], "lords compare: error: argument --steps: expected an integer, got 'x'"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    assert run(argv, capsys) == (2, message)


def test_bad_values_and_files_are_one_line_errors(made, tmp_path, capsys):
    dense, ckpt = made / "dense", made / "ckpt"
    out = tmp_path / "out"
    cases = [
        (["quantize", dense, "--out", out, "--max-shard-size", "lots"],
         "shard size must be bytes or a size like '5GB', got 'lots'"),
        (["quantize", dense, "--out", out, "--device", "tpu"],
         "--device: 'tpu' is not a device (cpu, cuda, cuda:1, ...)"),
        (["quantize", tmp_path / "missing", "--out", out],
         f"model folder {tmp_path / 'missing'} does not exist (nothing is downloaded; give a local folder)"),
        (["quantize", ckpt, "--out", out],
         f"{ckpt} is a lords checkpoint already; quantize the dense model it came from"),
        (["quantize", dense, "--out", ckpt / WEIGHTS_NAME],
         f"{ckpt / WEIGHTS_NAME} is a file, not a folder; choose another output path"),
        (["quantize", dense, "--out", ckpt], f"{ckpt} exists and is not empty; pass overwrite=True (--overwrite) to "
         "replace it"),
        (["quantize", dense, "--out", made, "--overwrite"], f"{made} holds no config.json or adapter_config.json; "
         "lords replaces only its own outputs, so remove it yourself or choose another path"),
        (["quantize", dense, "--out", out, "--calibration", tmp_path / "missing.txt", "--steps", "0"],
         f"[Errno 2] No such file or directory: '{tmp_path / 'missing.txt'}'"),
        (["generate", ckpt, "  "], "the prompt is empty"),
        (["eval", ckpt, "--adapter", tmp_path / "none"], f"{tmp_path / 'none'} is not a readable lords adapter: "
         f"[Errno 2] No such file or directory: '{tmp_path / 'none' / 'adapter_config.json'}'"),
        (["skill", "apply", ckpt, tmp_path / "none.safetensors", "--out", out],
         f"cannot read skill file {tmp_path / 'none.safetensors'}: No such file or directory: "
         f"{tmp_path / 'none.safetensors'}"),
        (["finetune", ckpt, "--out", out, "--save-model", ckpt / WEIGHTS_NAME],
         f"{ckpt / WEIGHTS_NAME} is a file, not a folder; choose another output path"),
    ]
    for argv, message in cases:
        assert run(argv, capsys) == (1, f"error: {message}")
    assert not out.exists()


@pytest.mark.parametrize("field, value", [("hidden_size", -64), ("num_hidden_layers", "x"), ("model_type", "nonsense")])
@pytest.mark.parametrize("kind", ["dense", "ckpt"])
def test_malformed_config_fields_are_one_line_errors(made, tmp_path, capsys, kind, field, value):
    """transformers words the reason (its text differs between versions); lords says which folder cannot load."""
    folder = Path(shutil.copytree(made / kind, tmp_path / kind))
    edit_json(folder / "config.json", lambda config: config.update({field: value}))
    code, message = run(["eval", folder], capsys)
    assert code == 1 and message.startswith(f"error: cannot load {folder}: ") and str(value) in message
    if kind == "dense":
        code, message = run(["quantize", folder, "--out", tmp_path / "out"], capsys)
        assert code == 1 and message.startswith(f"error: cannot read {folder}: ") and str(value) in message


def test_a_skill_for_another_layer_count_is_refused_by_the_cli_unless_asked(made, tmp_path, capsys):
    target = tmp_path / "deeper"
    tiny(3).save_pretrained(target)
    word_tokenizer().save_pretrained(target)
    argv = ["skill", "apply", target, made / "skill.safetensors", "--out", tmp_path / "out"]
    code, message = run(argv, capsys)
    assert (code, message.split(" (e.g.")[0]) == (1, "error: the skill does not cover 9 of the model's 29 parameters")
    assert not (tmp_path / "out").exists()
    assert run(argv + ["--allow-subset"], capsys) == (0, "")
    printed = capsys.readouterr().out
    assert "--allow-subset: the skill covers 20 parameters; 9 were left as they were: model.layers.2." in printed
    assert (tmp_path / "out" / "config.json").is_file()


def test_os_errors_are_one_line_and_found_before_the_work(made, tmp_path, capsys, monkeypatch):
    dense = made / "dense"
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    code, message = run(["quantize", dense, "--out", tmp_path / "out", "--steps", "0"], capsys)
    prefix = f"error: {tmp_path} has 1.0 kB free; the output needs about "
    assert code == 1 and message.startswith(prefix) and message.endswith(" kB")
    needed = float(message.removeprefix(prefix).removesuffix(" kB")) * 1e3
    saved = (made / "ckpt" / WEIGHTS_NAME).stat().st_size
    assert 0.6 * saved < needed < saved  # the estimate leaves out the header (digests) and the codebooks
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()

    def read_only(path, mode=0o777):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(atomic.os, "mkdir", read_only)
    assert run(["finetune", made / "ckpt", "--out", tmp_path / "adapter"], capsys) == (
        1, f"error: cannot write to {tmp_path}: Read-only file system")
    monkeypatch.undo()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lords.checkpoint.ShardedSafetensors, "write", full_disk)
    assert run(["quantize", dense, "--out", tmp_path / "out", "--steps", "0", "--calibration", "none"], capsys) == (
        1, "error: [Errno 28] No space left on device")
    assert os.listdir(tmp_path) == []  # the staging folder went with the error


def test_debug_shows_the_traceback_and_the_real_command_exits_cleanly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--debug", "eval", str(tmp_path / "missing")])
    result = subprocess.run([sys.executable, "-m", "lords.cli", "eval", str(tmp_path / "missing")],
                            capture_output=True, text=True, cwd=Path(lords.__file__).parent.parent)
    assert (result.returncode, result.stderr) == (
        1, f"error: model folder {tmp_path / 'missing'} does not exist (nothing is downloaded; give a local folder)\n")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_matches_isfinite_at_the_edges(dtype):
    values = torch.tensor([0.0, -0.0, 1.0, torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny],
                          dtype=dtype)
    assert integrity.all_finite(values)
    for bad in (float("nan"), float("inf"), -float("inf")):
        damaged = values.clone()
        damaged[3] = bad
        assert integrity.all_finite(damaged) == bool(torch.isfinite(damaged).all()) is False
