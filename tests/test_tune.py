import json

import pytest
import torch
from triton.runtime.autotuner import Autotuner

import lords.kernels as kernels
from lords import LoRDSConfig, quantize, save
from lords.cli import main
from lords.factorize import parity_rank
from lords.kernels import autotune
from lords.kernels.forward import TILED_CONFIGS, _tiled_kernel
from lords.tune import LayerShape, export_tuning, layer_shapes, meta_model

GPU = "Fake GPU 9000"
CHOICE_KEY = (16, 128, 64, 4, torch.bfloat16, False)  # lords_matmul's: row bucket, N, K, bits, dtype, integer levels
TUNING_KEY = (16, 128, 64, 8, 4, True, "torch.bfloat16", "torch.uint8")  # the tiled kernel's Triton tuning key


def test_shapes_of_a_dense_model_folder_are_what_quantize_would_make(model_folder):
    model = meta_model(model_folder, LoRDSConfig(bits=3, block_size=32))
    assert all(tensor.device.type == "meta" for tensor in [*model.parameters(), *model.buffers()])
    blocks = ("model.layers.0", "model.layers.1")
    expected = {(64, 64): ["self_attn.q_proj", "self_attn.o_proj"], (32, 64): ["self_attn.k_proj", "self_attn.v_proj"],
                (128, 64): ["mlp.gate_proj", "mlp.up_proj"], (64, 128): ["mlp.down_proj"]}
    assert layer_shapes(model) == {
        LayerShape(n, k, 3, parity_rank(n, k, 32), "nf", torch.bfloat16, False): [f"{block}.{name}" for block in blocks
                                                                                   for name in names]
        for (n, k), names in expected.items()}


def test_shapes_of_a_checkpoint_folder_are_those_of_the_loaded_model(tiny_llama, tmp_path):
    config = LoRDSConfig(bits=2, rank=3, codebook="int", steps=0, skip=["*.down_proj"])
    quantize(tiny_llama, config, device="cpu", progress=False)
    save(tiny_llama, tmp_path / "ckpt", config)
    shapes = layer_shapes(meta_model(tmp_path / "ckpt"))
    assert shapes == layer_shapes(tiny_llama)
    assert {(shape.out_features, shape.in_features, shape.bits, shape.rank, shape.codebook) for shape in shapes} == {
        (64, 64, 2, 3, "int"), (32, 64, 2, 3, "int"), (128, 64, 2, 3, "int")}


def test_shapes_of_a_moe_model_folder_count_each_stack_of_experts_once(tmp_path):
    from test_experts import tiny_qwen3_moe

    model = tiny_qwen3_moe()
    model.save_pretrained(tmp_path / "moe")
    config = LoRDSConfig(block_size=16, steps=0)
    shapes = layer_shapes(meta_model(tmp_path / "moe", config))
    quantize(model, config, device="cpu", progress=False)
    assert shapes == layer_shapes(model)
    assert sorted(name for names in shapes.values() for name in names if "experts" in name) == [
        f"model.layers.{block}.mlp.experts.{part}" for block in (0, 1) for part in ("down_proj", "gate_up_proj")]


def test_tune_lists_shapes_anywhere_and_refuses_to_tune_without_a_gpu(model_folder, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main(["tune", str(model_folder), "--list"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[4].split() == ["64x128", "4", str(parity_rank(64, 128, 64)), "nf", "bfloat16",
                                                    "no", "2"]
    with pytest.raises(SystemExit) as exit_:
        main(["tune", str(model_folder)])
    assert exit_.value.code == ("error: tuning needs a CUDA GPU and none is available here (--list shows the layer "
                                "shapes anywhere)")
    assert capsys.readouterr().out == ""  # nothing printed before the one-line error
    with pytest.raises(SystemExit) as exit_:
        main(["tune", str(model_folder), "--list", "--export", "t.json"])
    assert exit_.value.code == "error: --export writes what a tuning run measured; --list tunes nothing: drop one"


@pytest.fixture
def shipped(monkeypatch, tmp_path):
    """A shipped tuning file for GPU (the tiled kernel wins CHOICE_KEY with TILED_CONFIGS[1]), a user cache of its
    own, and the tuning cache on."""
    monkeypatch.setattr(autotune, "TUNED_DIR", tmp_path / "tuned")
    monkeypatch.setattr(autotune, "TUNING_CACHE", True)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    autotune.TUNED_DIR.mkdir()
    tuning = {"format": autotune.TUNING_FORMAT, "gpu": GPU, "choices": {repr(CHOICE_KEY): "tiled"},
              "configs": {"_tiled_kernel": {repr(TUNING_KEY): autotune.config_entry(TILED_CONFIGS[1])}}}
    autotune.tuned_file(GPU).write_text(json.dumps(tuning))
    return tuning


def test_shipped_choice_is_used_when_the_user_cache_has_none_and_the_user_cache_wins(shipped):
    assert autotune.tuned_file(GPU).name == "Fake_GPU_9000.json"
    assert autotune.load_choice(CHOICE_KEY, GPU) == "tiled"
    assert autotune.load_choice((1, *CHOICE_KEY[1:]), GPU) is None  # another row bucket: timed
    autotune.save_choice(CHOICE_KEY, GPU, "dequant", {"tiled": 2.0, "dequant": 1.0})
    assert autotune.load_choice(CHOICE_KEY, GPU) == "dequant"


def test_shipped_tuning_for_another_gpu_is_ignored(shipped, monkeypatch):
    other = "Fake GPU-9000"  # the same file name, but the file says it is GPU's
    assert autotune.tuned_file(other) == autotune.tuned_file(GPU)
    assert autotune.load_choice(CHOICE_KEY, other) is None
    assert autotune.shipped_config("_tiled_kernel", TUNING_KEY, TILED_CONFIGS, other) is None
    assert autotune.load_choice(CHOICE_KEY, "Fake GPU 9001") is None  # no file
    monkeypatch.setattr(autotune, "SHIPPED_TUNING", False)  # as `lords tune` runs
    assert autotune.load_choice(CHOICE_KEY, GPU) is None


def test_shipped_config_is_taken_after_the_user_cache_and_before_timing(shipped, monkeypatch):
    user_cache = {}

    def triton_disk_cache(self, tuning_key, configs, bench_fn):  # Triton's, with the disk as a dict
        if tuning_key in user_cache:
            self.cache[tuning_key] = user_cache[tuning_key]
            return True
        bench_fn()
        return False

    timed = []
    monkeypatch.setattr(Autotuner, "check_disk_cache", triton_disk_cache)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU)
    tuner = autotune.ShippedAutotuner(_tiled_kernel, _tiled_kernel.arg_names, TILED_CONFIGS, ["M_BUCKET"], None, None)
    assert tuner.check_disk_cache(TUNING_KEY, TILED_CONFIGS, lambda: timed.append(1))
    assert tuner.cache[TUNING_KEY] is TILED_CONFIGS[1] and not timed
    user_cache[TUNING_KEY] = TILED_CONFIGS[2]
    assert tuner.check_disk_cache(TUNING_KEY, TILED_CONFIGS, lambda: timed.append(1))
    assert tuner.cache[TUNING_KEY] is TILED_CONFIGS[2] and not timed
    # a key with no shipped config, and a shipped config the kernel does not have (any more): the configs are timed
    del user_cache[TUNING_KEY]
    assert not tuner.check_disk_cache(TUNING_KEY[:1], TILED_CONFIGS, lambda: timed.append(1))
    assert not tuner.check_disk_cache(TUNING_KEY, TILED_CONFIGS[2:], lambda: timed.append(1)) and len(timed) == 2


def test_export_round_trips_through_the_shipped_lookup(shipped, monkeypatch, tmp_path):
    tuner = autotune.ShippedAutotuner(_tiled_kernel, _tiled_kernel.arg_names, TILED_CONFIGS, ["M_BUCKET"], None, None)
    tuner.cache = {TUNING_KEY: TILED_CONFIGS[3]}
    monkeypatch.setattr(autotune, "LAUNCHERS", [autotune.Launcher(tuner)])
    other_key = (1, *CHOICE_KEY[1:])
    monkeypatch.setattr(kernels, "_choices", {other_key: "decode"})
    path = autotune.tuned_file(GPU)
    exported = export_tuning(path, GPU)  # added to the file there: CHOICE_KEY's choice stays
    assert json.loads(path.read_text()) == exported
    assert autotune.read_tuning(path)["choices"] == {repr(CHOICE_KEY): "tiled", repr(other_key): "decode"}
    autotune._read_shipped.cache_clear()
    assert autotune.load_choice(other_key, GPU) == "decode" and autotune.load_choice(CHOICE_KEY, GPU) == "tiled"
    assert autotune.shipped_config("_tiled_kernel", TUNING_KEY, TILED_CONFIGS, GPU) is TILED_CONFIGS[3]


def test_export_refuses_a_file_that_is_not_this_gpus_tuning(shipped, tmp_path, monkeypatch):
    path = autotune.tuned_file(GPU)
    before = path.read_text()
    with pytest.raises(ValueError, match=r"holds tuning for 'Fake GPU 9000', not this GPU \('Other GPU'\); export"):
        export_tuning(path, "Other GPU")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="notes.json is not a lords tuning file of format 1"):
        export_tuning(notes, GPU)
    assert path.read_text() == before and notes.read_text() == '{"mine": 1}'
