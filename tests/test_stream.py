"""The streaming quantizer gives what the in-memory path gives, holding one block at a time."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lords
from lords.checkpoint import WEIGHTS_NAME
from lords.stream import (
    ModelSource, SafetensorsSource, SyntheticSource, empty_model, open_source, quantize_to_folder, walk_blocks,
)

CONFIG = lords.LoRDSConfig(bits=3, block_size=32, steps=4, overrides={"*.down_proj": {"bits": 4}})
CALIBRATION = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_checkpoints(streamed, in_memory) -> None:
    expected, actual = checkpoint_tensors(in_memory), checkpoint_tensors(streamed)
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    configs = [json.loads((folder / "config.json").read_text()) for folder in (streamed, in_memory)]
    assert configs[0]["quantization_config"] == configs[1]["quantization_config"]


@pytest.mark.parametrize("calibration", [CALIBRATION, None], ids=["activation-aware", "data-free"])
def test_streaming_a_sharded_folder_matches_the_in_memory_path_bit_for_bit(tiny_llama, tmp_path, calibration):
    tiny_llama.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    assert (tmp_path / "dense" / "model.safetensors.index.json").is_file()
    reports = quantize_to_folder(SafetensorsSource(tmp_path / "dense"), tmp_path / "streamed", CONFIG, calibration,
                                 device="cpu", dtype=torch.float32, max_shard_size="30KB", progress=False)
    expected = lords.quantize(tiny_llama, CONFIG, calibration=calibration, device="cpu", progress=False)
    lords.save(tiny_llama, tmp_path / "in_memory", config=CONFIG, dtype=torch.float32)
    assert_same_checkpoints(tmp_path / "streamed", tmp_path / "in_memory")
    assert [(r.name, r.bits, r.rank, r.error) for r in reports] == [(r.name, r.bits, r.rank, r.error) for r in expected]
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) > 1
    ids = CALIBRATION[:2]
    assert torch.equal(lords.load(tmp_path / "streamed")(ids).logits, tiny_llama(ids).logits)


def test_streaming_with_gptq_codes_matches_the_in_memory_path_bit_for_bit(tiny_llama, tmp_path):
    """Error-feedback codes: each block is quantized on the outputs of the quantized blocks before it, both ways."""
    config = lords.LoRDSConfig(bits=3, block_size=32, steps=4, codes="gptq", refit_rounds=1)
    tiny_llama.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    reports = quantize_to_folder(SafetensorsSource(tmp_path / "dense"), tmp_path / "streamed", config, CALIBRATION,
                                 device="cpu", dtype=torch.float32, progress=False)
    expected = lords.quantize(tiny_llama, config, calibration=CALIBRATION, device="cpu", progress=False)
    lords.save(tiny_llama, tmp_path / "in_memory", config=config, dtype=torch.float32)
    assert_same_checkpoints(tmp_path / "streamed", tmp_path / "in_memory")
    assert [(r.name, r.error) for r in reports] == [(r.name, r.error) for r in expected]
    with pytest.raises(ValueError, match="codes='gptq' needs calibration data"):
        quantize_to_folder(SafetensorsSource(tmp_path / "dense"), tmp_path / "none", config, None, progress=False)
    assert not (tmp_path / "none").exists()


def test_a_synthetic_source_streams_like_a_folder(tiny_llama, tmp_path):
    source = SyntheticSource(tiny_llama.config, seed=3)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(source.tensor(name, "cpu"), SyntheticSource(tiny_llama.config, seed=3).tensor(name, "cpu"))
    assert not torch.equal(source.tensor(name, "cpu"), SyntheticSource(tiny_llama.config, seed=4).tensor(name, "cpu"))
    assert source.tensor(name, "cpu").std().item() == pytest.approx(0.02, rel=5e-3)  # 9.8e-4 off measured
    quantize_to_folder(source, tmp_path / "streamed", CONFIG, CALIBRATION, device="cpu", progress=False)
    # the same weights in a model in memory, quantized there
    missing, _ = tiny_llama.load_state_dict({key: source.tensor(key, "cpu") for key in source.names()}, strict=False)
    assert missing == ["lm_head.weight"]  # tied to the embedding
    lords.quantize(tiny_llama, CONFIG, calibration=CALIBRATION, device="cpu", progress=False)
    lords.save(tiny_llama, tmp_path / "in_memory", config=CONFIG)
    assert_same_checkpoints(tmp_path / "streamed", tmp_path / "in_memory")


def test_a_model_in_memory_streams_too(tiny_llama, tmp_path):
    """How a GGUF file (which transformers reads only whole) is quantized: the same result as in memory."""
    quantize_to_folder(ModelSource(tiny_llama, "tiny"), tmp_path / "streamed", CONFIG, CALIBRATION, device="cpu",
                       dtype="float32", progress=False)
    lords.quantize(tiny_llama, CONFIG, calibration=CALIBRATION, device="cpu", progress=False)
    lords.save(tiny_llama, tmp_path / "in_memory", config=CONFIG, dtype="float32")
    assert_same_checkpoints(tmp_path / "streamed", tmp_path / "in_memory")


def test_the_walk_holds_one_block_and_feeds_it_the_previous_blocks_outputs(tiny_llama):
    source = ModelSource(tiny_llama, "tiny")
    model = empty_model(tiny_llama.config, torch.float32, "cpu")
    seen = []
    for block in walk_blocks(model, source, CALIBRATION, "cpu", torch.float32, batch_size=2):
        outside = [name for name, p in model.named_parameters() if not name.startswith(block.name + ".")]
        assert all(model.get_parameter(name).is_meta for name in outside)  # nothing else materialised
        assert not any(p.is_meta for p in block.module.parameters())
        seen.append(torch.cat([args[0] for args, _ in block.inputs]))
    hidden = tiny_llama(CALIBRATION, output_hidden_states=True).hidden_states
    for index, inputs in enumerate(seen):
        torch.testing.assert_close(inputs, hidden[index], rtol=0, atol=0)


def test_feedback_takes_the_next_inputs_from_the_block_as_the_consumer_left_it(tiny_llama):
    """With the attention and MLP outputs zeroed, a block passes its input through (the residual stream): the next
    block sees the same inputs only when the walk runs the block after the consumer (feedback=True)."""
    source = ModelSource(tiny_llama, "tiny")
    for feedback in (False, True):
        model = empty_model(tiny_llama.config, torch.float32, "cpu")
        inputs = []
        for block in walk_blocks(model, source, CALIBRATION, "cpu", torch.float32, feedback=feedback):
            inputs.append(torch.cat([args[0] for args, _ in block.inputs]))
            with torch.no_grad():
                block.module.self_attn.o_proj.weight.zero_()
                block.module.mlp.down_proj.weight.zero_()
        assert torch.equal(inputs[0], inputs[1]) == feedback


def test_a_source_missing_a_tensor_is_named(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "dense")
    tensors = load_file(tmp_path / "dense" / WEIGHTS_NAME)
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "dense" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"lacks 1 tensors of the model, e.g. \['model.layers.1.post_attention"):
        quantize_to_folder(SafetensorsSource(tmp_path / "dense"), tmp_path / "out", CONFIG, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_lords_checkpoint_is_not_a_source(tiny_llama, tmp_path):
    lords.quantize(tiny_llama, lords.LoRDSConfig(steps=0, block_size=32), progress=False)
    folder = lords.save(tiny_llama, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="is a lords checkpoint already"):
        open_source(folder)


def test_streaming_gptq_codes_on_moe_experts_match_the_in_memory_path_bit_for_bit(tmp_path):
    """Error-feedback codes for stacked experts too: each expert's E[x x^T] from its routed tokens, each block on the
    quantized blocks before it, both ways."""
    from test_experts import tiny_qwen3_moe

    model = tiny_qwen3_moe()
    config = lords.LoRDSConfig(bits=3, block_size=32, steps=3, codes="gptq")
    reports = quantize_to_folder(ModelSource(tiny_qwen3_moe(), "tiny MoE"), tmp_path / "streamed", config,
                                 CALIBRATION, device="cpu", dtype=torch.float32, progress=False)
    expected = lords.quantize(model, config, calibration=CALIBRATION, device="cpu", progress=False)
    lords.save(model, tmp_path / "in_memory", config=config, dtype=torch.float32)
    assert_same_checkpoints(tmp_path / "streamed", tmp_path / "in_memory")
    assert [(r.name, r.error) for r in reports] == [(r.name, r.error) for r in expected]
    assert sum(".experts." in r.name for r in reports) == 32  # 2 blocks x 8 experts x 2 projections
