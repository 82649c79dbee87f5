"""PaST skill vectors on tiny Llamas: extraction, the file format, application to dense and LoRDS targets,
analysis, and the errors for mismatched or foreign inputs."""

import copy
import datetime
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lords
from conftest import exactly
from lords import integrity
from lords.cli import main
from lords.skills import apply_skill, check_skill_fits, extract, layer_cosines, load_skill, save_skill


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
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)  # bit-identical
    half = copy.deepcopy(tiny_llama)
    apply_skill(half, deltas, scale=0.5)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(dict(half.named_parameters())[name] - dict(tiny_llama.named_parameters())[name],
                               0.5 * deltas[name], rtol=0, atol=2e-8)  # the rounding of the sum: 3.7e-9 measured


def test_file_round_trip_keeps_provenance_and_refuses_foreign_files(tiny_llama, tmp_path):
    deltas = extract(tiny_llama, perturbed(tiny_llama, 2))
    start = datetime.datetime.now().replace(second=0, microsecond=0)
    path = save_skill(deltas, tmp_path / "skill.safetensors", {"base": "sft", "tuned": "rl"})
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    created = datetime.datetime.strptime(metadata["created"], "%Y-%m-%d %H:%M")  # to the minute, local time
    assert start <= created <= datetime.datetime.now()
    assert {key: metadata[key] for key in ("format", "format_version", "provenance")} == {
        "format": "lords-skill", "format_version": "1", "provenance": json.dumps({"base": "sft", "tuned": "rl"})}
    loaded, provenance = load_skill(path)
    assert provenance == {"base": "sft", "tuned": "rl"} and loaded.keys() == deltas.keys()
    assert all(torch.equal(loaded[n], deltas[n]) for n in deltas)
    with pytest.raises(FileExistsError, match="exists"):
        save_skill(deltas, path, {})
    half = {name: delta / 2 for name, delta in deltas.items()}
    save_skill(half, path, {"tuned": "rl2"}, overwrite=True)  # a skill file is replaced when asked
    loaded, provenance = load_skill(path)
    assert provenance == {"tuned": "rl2"} and all(torch.equal(loaded[n], half[n]) for n in deltas)
    for name, write in (("model.safetensors", lambda p: save_file({"x": torch.zeros(2)}, str(p))),
                        ("notes.txt", lambda p: p.write_text("user notes"))):
        other = tmp_path / name
        write(other)
        before = other.read_bytes()
        with pytest.raises(OSError, match=exactly(f"{other} is not a file lords wrote; lords replaces only its own "
                                                  "outputs, so remove it yourself or choose another path")):
            save_skill(deltas, other, {}, overwrite=True)
        assert other.read_bytes() == before

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a lords skill file"):
        load_skill(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read skill file"):
        load_skill(tmp_path / "broken.safetensors")
    name = "model.norm.weight"
    foreign = tmp_path / "foreign.safetensors"
    for metadata in ({"format": "lords-skill", "format_version": "2"}, {"format": "lora", "format_version": "1"}):
        save_file({name: deltas[name]}, str(foreign), metadata=metadata)
        with pytest.raises(ValueError, match=exactly(f"{foreign} is not a lords skill file of format version 1")):
            load_skill(foreign)


def test_skill_files_are_verified_and_provenance_is_optional(tiny_llama, tmp_path):
    name = "model.norm.weight"
    delta = extract(tiny_llama, perturbed(tiny_llama, 2))[name]
    path = tmp_path / "skill.safetensors"
    metadata = {"format": "lords-skill", "format_version": "1", **integrity.digest_metadata({name: delta})}
    save_file({name: delta}, str(path), metadata=metadata)  # no provenance: an empty one
    loaded, provenance = load_skill(path)
    assert provenance == {} and torch.equal(loaded[name], delta)
    data = bytearray(path.read_bytes())
    data[-4] ^= 1  # the lowest mantissa bit of the last float32: finite, but not what was saved
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=exactly(f"cannot read skill file {path}: {path}: tensor {name} does not "
                                                 "match its sha256 digest (the file is corrupt)")):
        load_skill(path)
    loaded, _ = load_skill(path, verify=False)  # trusted: the changed value loads
    assert torch.equal(loaded[name], load_file(str(path))[name]) and not torch.equal(loaded[name], delta)


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
    with pytest.raises(ValueError, match=exactly("the two models share no parameter names: they are not the same "
                                                 "architecture")):
        extract(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    linears = [torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(count))) for count in (1, 3)]
    with pytest.raises(ValueError, match=exactly("the models' parameters differ (4 names, e.g. ['1.bias', '1.weight', "
                                                 "'2.bias']); a skill vector needs one architecture")):
        extract(*linears)


def test_a_skill_must_fit_the_target_exactly_unless_a_subset_is_allowed(tiny_llama):
    deltas = {name: torch.zeros(p.shape) for name, p in tiny_llama.named_parameters()}
    layers = [f"model.layers.{i}.mlp.up_proj.weight" for i in (5, 6, 7, 8)]
    with pytest.raises(ValueError, match=exactly(f"the skill holds 4 parameters the model lacks (e.g. {layers[:3]}): "
                                                 "it was extracted from another architecture")):
        check_skill_fits(tiny_llama, {**deltas, **{name: torch.zeros(128, 64) for name in layers}})
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=exactly(f"skill tensor {name} is (64, 128), the model's is (128, 64)")):
        check_skill_fits(tiny_llama, {**deltas, name: torch.zeros(64, 128)})
    for bad in (torch.zeros(128, 64, dtype=torch.int32), torch.full((128, 64), float("nan"))):
        with pytest.raises(ValueError, match=exactly(f"skill tensor {name} is not a finite floating tensor")):
            check_skill_fits(tiny_llama, {**deltas, name: bad})
    partial = {key: value for key, value in deltas.items() if ".mlp." not in key}
    untouched = sorted(deltas.keys() - partial.keys())
    assert check_skill_fits(tiny_llama, partial, subset=True) == untouched
    assert check_skill_fits(tiny_llama, deltas) == []
    before = {key: p.detach().clone() for key, p in tiny_llama.named_parameters()}
    message = exactly(f"the skill does not cover 6 of the model's {len(deltas)} parameters (e.g. {untouched[:3]}): "
                      "it was extracted from another architecture; pass subset=True (--allow-subset) to apply it to "
                      "the parameters it has")
    with pytest.raises(ValueError, match=message):
        check_skill_fits(tiny_llama, partial)
    with pytest.raises(ValueError, match=message):
        apply_skill(tiny_llama, {key: value + 1 for key, value in partial.items()})
    assert all(torch.equal(p, before[key]) for key, p in tiny_llama.named_parameters())  # nothing moved


def test_extract_from_lords_models_uses_their_dequantized_weights(tiny_llama):
    lords.quantize(tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=0), progress=False)
    tuned = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.scale_b.mul_(2)  # exact in bf16, and so is (2 B) A C - B A C = B A C
        tuned.model.norm.weight.add_(0.25)
    deltas = extract(tiny_llama, tuned)
    layers = {name: m for name, m in tiny_llama.named_modules() if isinstance(m, lords.LoRDSLinear)}
    dense = {name for name, _ in tiny_llama.named_parameters() if not name.endswith((".scale_b", ".scale_a"))}
    assert deltas.keys() == dense | {f"{name}.weight" for name in layers}
    for name, delta in deltas.items():
        assert delta.dtype == torch.float32, name
        if name == "model.layers.1.mlp.down_proj.weight":
            assert torch.equal(delta, layers[name.removesuffix(".weight")].dequantize(torch.float32))
        elif name == "model.norm.weight":
            assert torch.equal(delta, torch.full_like(delta, 0.25))
        else:
            assert not delta.any(), name


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
    # float64 rounding: 6.0e-15 at most measured
    assert all(value == pytest.approx(1.0, abs=2e-14) for value in layer_cosines(first, first).values())
    names = sorted(first)
    cosines = layer_cosines({name: first[name] for name in names[:5]}, {name: -first[name] for name in names[3:]})
    assert cosines == pytest.approx({name: -1.0 for name in names[3:5]}, abs=2e-14)  # only the names both hold
    with pytest.raises(ValueError, match=exactly("the two skill files share no parameter names")):
        layer_cosines({names[0]: first[names[0]]}, {names[1]: first[names[1]]})
    second = extract(tiny_llama, perturbed(tiny_llama, 5))
    assert abs(sum(layer_cosines(first, second).values()) / len(first)) < 0.01  # independent noise: 1.8e-3 measured
    save_skill(first, tmp_path / "a.safetensors", {})
    save_skill(second, tmp_path / "b.safetensors", {})
    main(["skill", "analyze", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--control",
          str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "cos.md")])
    printed = capsys.readouterr().out
    assert "| block | cosine, pair | cosine, control |" in printed and "| 0 | " in printed
    assert (tmp_path / "cos.png").is_file()
    control_rows = [line for line in printed.splitlines() if line.startswith("| 0 |")]
    assert control_rows[0].rstrip(" |").endswith("1.0000")
