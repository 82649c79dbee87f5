"""PaST skill vectors on tiny Llamas: extraction, the file format, application to dense and LoRDS targets,
analysis, and the errors for mismatched or foreign inputs."""

import copy

import pytest
import torch

import lords
from lords.cli import main
from lords.skills import apply_skill, extract, layer_cosines, load_skill, save_skill


def perturbed(model, seed: int, size: float = 1e-2):
    generator = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(size * torch.randn(param.shape, generator=generator))
    return tuned


def test_extract_then_apply_reproduces_the_tuned_model(tiny_llama):
    tuned = perturbed(tiny_llama, 1)
    deltas = extract(tiny_llama, tuned)
    assert len(deltas) == len(dict(tiny_llama.named_parameters()))
    target = copy.deepcopy(tiny_llama)
    assert apply_skill(target, deltas, scale=1.0) == {}
    for (name, value), expected in zip(target.named_parameters(), tuned.parameters()):
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
    half = copy.deepcopy(tiny_llama)
    apply_skill(half, deltas, scale=0.5)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(dict(half.named_parameters())[name] - dict(tiny_llama.named_parameters())[name],
                               0.5 * deltas[name], rtol=1e-4, atol=1e-7)


def test_file_round_trip_keeps_provenance_and_refuses_foreign_files(tiny_llama, tmp_path):
    deltas = extract(tiny_llama, perturbed(tiny_llama, 2))
    path = save_skill(deltas, tmp_path / "skill.safetensors", {"base": "sft", "tuned": "rl"})
    loaded, provenance = load_skill(path)
    assert provenance == {"base": "sft", "tuned": "rl"} and loaded.keys() == deltas.keys()
    assert all(torch.equal(loaded[n], deltas[n]) for n in deltas)
    with pytest.raises(FileExistsError, match="exists"):
        save_skill(deltas, path, {})
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a lords skill file"):
        load_skill(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read skill file"):
        load_skill(tmp_path / "broken.safetensors")


def test_mismatched_architectures_are_named(tiny_llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="is \\(96, 64\\) in the base but \\(96, 32\\)"):
        extract(tiny_llama, other)
    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="parameters differ"):
        extract(tiny_llama, deeper)
    with pytest.raises(ValueError, match="another architecture"):
        apply_skill(tiny_llama, {"model.layers.7.mlp.up_proj.weight": torch.zeros(128, 64)})


def test_lords_target_is_refitted_and_moves_toward_the_shifted_weight(tiny_llama):
    tuned = perturbed(tiny_llama, 3, size=2e-2)
    deltas = extract(tiny_llama, tuned)
    target = copy.deepcopy(tiny_llama)
    lords.quantize(target, lords.LoRDSConfig(bits=4, block_size=32, steps=5), progress=False)
    layer = target.model.layers[0].mlp.up_proj
    before = layer.dequantize(torch.float32).clone()
    errors = apply_skill(target, deltas, scale=1.0, refit_steps=20)
    assert set(errors) == {n for n, m in target.named_modules() if isinstance(m, lords.LoRDSLinear)}
    assert all(after <= start + 1e-7 for start, after in errors.values())
    shifted = before + deltas["model.layers.0.mlp.up_proj.weight"]
    assert (layer.dequantize(torch.float32) - shifted).norm() < (before - shifted).norm()


def test_cosines_and_the_cli(tiny_llama, tmp_path, capsys):
    first = extract(tiny_llama, perturbed(tiny_llama, 4))
    assert all(value == pytest.approx(1.0) for value in layer_cosines(first, first).values())
    second = extract(tiny_llama, perturbed(tiny_llama, 5))
    assert abs(sum(layer_cosines(first, second).values()) / len(first)) < 0.1  # independent noise: near 0
    save_skill(first, tmp_path / "a.safetensors", {})
    save_skill(second, tmp_path / "b.safetensors", {})
    main(["skill", "analyze", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--control",
          str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "cos.md")])
    printed = capsys.readouterr().out
    assert "| block | cosine, pair | cosine, control |" in printed and "| 0 | " in printed
    assert (tmp_path / "cos.png").is_file()
    control_rows = [line for line in printed.splitlines() if line.startswith("| 0 |")]
    assert control_rows[0].rstrip(" |").endswith("1.0000")
