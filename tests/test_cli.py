import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from transformers import AutoTokenizer

from lords.assets import heldout_tokens
from lords.checkpoint import is_checkpoint, load
from lords.cli import main
from lords.eval.perplexity import perplexity


def test_quantize_then_eval_and_generate(model_folder, tmp_path, capsys):
    out = tmp_path / "q"
    main(["quantize", str(model_folder), "--bits", "3", "--block-size", "32", "--steps", "2",
          "--calib-samples", "2", "--calib-len", "16", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "activation-aware" in printed and f"saved to {out}" in printed
    report = json.loads((out / "quantize_report.json").read_text())
    summary = dict(line.split(":", 1) for line in printed.splitlines() if line.startswith(("bits per weight", "layer")))
    assert summary["bits per weight"].split()[0] == f"{report['bits_per_weight']:.3f}"
    assert summary["layer error"].split()[:4] == ["mean", f"{report['mean_error']:.4f},", "worst",
                                                  f"{report['worst_error']:.4f}"]
    assert report["layers"] == len(report["per_layer"]) == 14 and report["calibration_tokens"] == 32
    assert set(report["seconds"]) == {"reading and calibration", "refinement", "writing"}
    assert report["worst_error"] == max(layer["error"] for layer in report["per_layer"])
    assert "model.layers.1.mlp.down_proj" not in printed  # the per-layer table only with --verbose
    assert "| model.layers.1.mlp.down_proj | 64x128 | 3 |" in (out / "quantize_report.md").read_text()
    assert is_checkpoint(out) and (out / "tokenizer.json").is_file()
    main(["eval", str(out), "--seq-len", "16", "--max-tokens", "256", "--device", "cpu"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    model, tokenizer = load(out), AutoTokenizer.from_pretrained(out)
    expected = perplexity(model, heldout_tokens(tokenizer, 256), seq_len=16, progress=False)
    assert line == f"held-out perplexity (256 tokens, windows of 16): {expected:.3f}"
    main(["generate", str(out), "the news", "--max-new-tokens", "3", "--device", "cpu"])
    printed = capsys.readouterr().out
    prompt = tokenizer("the news", return_tensors="pt").input_ids
    greedy = model.generate(prompt, max_new_tokens=3, do_sample=False)[0, prompt.shape[1]:]
    text = tokenizer.decode(greedy, skip_special_tokens=True)
    assert printed.startswith(f"the news{text}\n\n({len(greedy)} tokens in ")  # the streamer ends its line
    assert re.search(r"\n\([1-3] tokens in [\d.]+ s, [\d.]+ tokens/s\)", printed)


def test_refuses_non_empty_output(model_folder, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "precious.bin").write_bytes(b"x")
    with pytest.raises(SystemExit, match="not empty; pass overwrite=True \\(--overwrite\\) to replace it"):
        main(["quantize", str(model_folder), "--out", str(out), "--calibration", "none"])
    assert (out / "precious.bin").read_bytes() == b"x"


def test_bad_block_size_is_a_clear_error(model_folder, tmp_path):
    with pytest.raises(SystemExit, match="in_features=64 is not divisible by block_size=48"):
        main(["quantize", str(model_folder), "--block-size", "48", "--steps", "0", "--calibration", "none",
              "--out", str(tmp_path / "q"), "--device", "cpu"])
    assert not (tmp_path / "q").exists()


def test_quantize_with_gptq_codes_reports_output_errors_below_nearest_codes(model_folder, tmp_path, capsys):
    out = tmp_path / "q"
    main(["quantize", str(model_folder), "--bits", "3", "--block-size", "32", "--steps", "2", "--codes", "gptq",
          "--refit-rounds", "1", "--calib-samples", "2", "--calib-len", "16", "--out", str(out), "--device", "cpu"])
    assert "activation-aware, error-feedback codes) on cpu" in capsys.readouterr().out
    report = json.loads((out / "quantize_report.json").read_text())
    assert (report["config"]["codes"], report["config"]["refit_rounds"]) == ("gptq", 1)
    assert all(layer["error"] < layer["error_init"] for layer in report["per_layer"])
    with pytest.raises(SystemExit, match="--codes gptq needs calibration data"):
        main(["quantize", str(model_folder), "--codes", "gptq", "--calibration", "none", "--out", str(tmp_path / "n")])
    assert not (tmp_path / "n").exists()


def test_bits_out_of_range_rejected_by_parser(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--bits", "5", "--out", "x"])
    assert "invalid choice: 5" in capsys.readouterr().err


def test_missing_model_folder(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["eval", str(tmp_path / "missing")])


def test_finetune_saves_an_adapter_that_eval_applies(model_folder, tmp_path, capsys):
    out = tmp_path / "q"
    main(["quantize", str(model_folder), "--bits", "4", "--block-size", "32", "--steps", "1",
          "--calibration", "none", "--out", str(out), "--device", "cpu"])
    adapter = tmp_path / "adapter"
    main(["finetune", str(out), "--steps", "3", "--lr", "1e-3", "--seq-len", "16", "--out", str(adapter),
          "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "training loss: first 10 steps" in printed and f"saved adapter to {adapter}" in printed
    main(["eval", str(out), "--adapter", str(adapter), "--seq-len", "16", "--max-tokens", "128", "--device", "cpu"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # the figure is the adapted model's: the checkpoint with the adapter loaded, whose scales training moved
    from lords.peft import load_adapter

    base, tokenizer = load(out), AutoTokenizer.from_pretrained(out)
    adapted = load(out)
    load_adapter(adapted, adapter)
    layer = "model.layers.1.mlp.down_proj"
    assert not torch.equal(adapted.get_submodule(layer).scale_b, base.get_submodule(layer).scale_b)
    expected = perplexity(adapted, heldout_tokens(tokenizer, 128), seq_len=16, progress=False)
    assert line == f"held-out perplexity (128 tokens, windows of 16): {expected:.3f}"
    with pytest.raises(SystemExit, match="not a readable lords adapter"):
        main(["eval", str(out), "--adapter", str(tmp_path), "--seq-len", "16", "--max-tokens", "128",
              "--device", "cpu"])


def test_finetune_a_dense_model_quantizes_first_and_saves_the_whole_model(model_folder, tmp_path, capsys):
    from lords.checkpoint import load
    from lords.linear import LoRDSLinear

    adapter, whole = tmp_path / "adapter", tmp_path / "whole"
    main(["finetune", str(model_folder), "--bits", "3", "--quantize-steps", "1", "--steps", "2", "--seq-len", "16",
          "--gradient-checkpointing", "--out", str(adapter), "--save-model", str(whole), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "is not quantized: LoRDS 3-bit" in printed and f"saved the whole adapted model to {whole}" in printed
    model = load(whole)
    layers = [m for m in model.modules() if isinstance(m, LoRDSLinear)]
    assert layers and all(layer.bits == 3 for layer in layers)


def test_qat_exports_a_lords_checkpoint(model_folder, tmp_path, capsys):
    from lords.checkpoint import load
    from lords.linear import LoRDSLinear

    out = tmp_path / "qat"
    main(["qat", str(model_folder), "--bits", "4", "--block-size", "32", "--ptq-steps", "1", "--scale-steps", "2",
          "--steps", "2", "--seq-len", "16", "--calib-samples", "2", "--calib-len", "16", "--out", str(out),
          "--device", "cpu", "--eval", "--max-tokens", "128"])
    printed = capsys.readouterr().out
    assert f"saved the exported LoRDS checkpoint to {out}" in printed
    model = load(out)
    assert any(isinstance(m, LoRDSLinear) for m in model.modules())
    # --eval scores the checkpoint as saved: the figure `lords eval` prints for it
    main(["eval", str(out), "--seq-len", "16", "--max-tokens", "128", "--device", "cpu"])
    assert printed.strip().splitlines()[-1] == capsys.readouterr().out.strip().splitlines()[-1]


def test_fsdp_is_refused_for_hd_pissa(model_folder, tmp_path):
    with pytest.raises(SystemExit, match="--fsdp applies to the lords method"):
        main(["finetune", str(model_folder), "--method", "hd-pissa", "--fsdp", "--out", str(tmp_path / "hd")])
    assert not (tmp_path / "hd").exists()


def test_finetune_hd_pissa_saves_a_dense_model(model_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hd"
    main(["finetune", str(model_folder), "--method", "hd-pissa", "--rank", "2", "--slices", "2", "--steps", "2",
          "--lr", "1e-2", "--seq-len", "16", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "HD-PiSSA over 2 slices of rank 2" in printed and f"saved the dense fine-tuned model to {out}" in printed
    tuned = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(model_folder)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(tuned.state_dict()[name], original.state_dict()[name])
    assert all(type(m).__name__ != "HDPiSSALinear" for m in tuned.modules())


def test_skill_extract_apply_and_sweep(model_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = AutoModelForCausalLM.from_pretrained(model_folder)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(model_folder).save_pretrained(tmp_path / "tuned")
    skill = tmp_path / "skill.safetensors"
    main(["skill", "extract", "--base", str(model_folder), "--tuned", str(tmp_path / "tuned"), "--out", str(skill)])
    main(["skill", "apply", str(model_folder), str(skill), "--scale", "1", "--out", str(tmp_path / "applied"),
          "--device", "cpu"])
    printed = capsys.readouterr().out
    assert f"saved to {tmp_path / 'applied'}" in printed
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "applied")
    # bit-identical: base + (tuned - base) rounds back to tuned here
    assert torch.equal(applied.model.layers[1].mlp.down_proj.weight, tuned.model.layers[1].mlp.down_proj.weight)
    main(["skill", "sweep", str(model_folder), str(skill), "--scales", "0", "1", "--seq-len", "16", "--max-tokens",
          "64", "--device", "cpu"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    # scale 0 is the base model, scale 1 the tuned one: their perplexities, as the library computes them
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    heldout = heldout_tokens(tokenizer, 64)
    expected = [perplexity(model, heldout, seq_len=16, progress=False)
                for model in (AutoModelForCausalLM.from_pretrained(model_folder), tuned)]
    assert rows == [f"| 0 | {expected[0]:.3f} |", f"| 1 | {expected[1]:.3f} |"]
    with pytest.raises(SystemExit, match="exists"):
        main(["skill", "extract", "--base", str(model_folder), "--tuned", str(tmp_path / "tuned"), "--out", str(skill)])


def test_skill_apply_to_a_lords_target_reports_the_refit(model_folder, tmp_path, capsys):
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = AutoModelForCausalLM.from_pretrained(model_folder)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.add_(1e-4)  # far below the 4-bit error: the re-fit keeps little
    tuned.save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(model_folder).save_pretrained(tmp_path / "tuned")
    skill = tmp_path / "skill.safetensors"
    main(["skill", "extract", "--base", str(model_folder), "--tuned", str(tmp_path / "tuned"), "--out", str(skill)])
    main(["quantize", str(model_folder), "--bits", "4", "--block-size", "32", "--steps", "2", "--calibration", "none",
          "--out", str(tmp_path / "q"), "--device", "cpu"])
    capsys.readouterr()
    main(["skill", "apply", str(tmp_path / "q"), str(skill), "--refit-steps", "5", "--out", str(tmp_path / "applied"),
          "--device", "cpu"])
    printed = capsys.readouterr().out
    found = re.search(r"error ([\d.]+) with the old scales, ([\d.]+) after 5 steps", printed)
    before, after = map(float, found.groups())
    assert after > 0.5 * before and "apply the skill to it and quantize afterwards" in printed
    assert is_checkpoint(tmp_path / "applied")


def test_finetune_and_eval_on_a_task(model_folder, tmp_path, monkeypatch, capsys):
    """--task trains on the task's train split and --eval scores its test split; the saved model scores the same."""
    from transformers import AutoTokenizer

    from lords.tasks import load_task, training_tokens
    from test_tasks import write_requests

    docs = [{"query": f"Question: w{i} w{i + 1}?\nAnswer:", "choices": ["the", f"w{i + 2}", "news said"], "gold": i % 3}
            for i in range(10)]
    write_requests(tmp_path / "tasks", "toy", "train", docs)
    write_requests(tmp_path / "tasks", "toy", "test", docs[:6])
    monkeypatch.setenv("LORDS_TASK_DIR", str(tmp_path / "tasks"))
    whole = tmp_path / "whole"
    main(["finetune", str(model_folder), "--task", "toy", "--quantize-steps", "1", "--steps", "2", "--lr", "1e-2",
          "--seq-len", "16", "--max-tokens", "128", "--eval", "--out", str(tmp_path / "adapter"),
          "--save-model", str(whole), "--device", "cpu"])
    printed = capsys.readouterr().out.splitlines()
    tokens = training_tokens(AutoTokenizer.from_pretrained(model_folder), load_task("toy", "train")).numel()
    assert any(line.endswith(f"on {tokens} tokens of toy (train split)") for line in printed)
    scores = [line for line in printed if line.startswith("toy test (6 questions): acc ")]
    assert len(scores) == 2  # before and after training
    main(["eval", str(whole), "--task", "toy", "--seq-len", "16",
          "--max-tokens", "128", "--device", "cpu"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == scores[-1]


def test_help_imports_neither_torch_nor_transformers():
    """`lords --help` as the console script runs it (argv[0] ending in lords): parsing is all that is imported."""
    code = ("import sys; sys.argv[0] = '/venv/bin/lords'; from lords.cli import build_parser; "
            "build_parser().format_help(); print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


def test_every_option_has_help_and_shows_its_default(capsys):
    from lords.cli import build_parser

    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.dest} has no help text"
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "refinement steps (0: SVD init only)" in text and "(default: 500)" in text
    assert "tokens per calibration sequence (default: 512)" in text and "(default: None)" not in text


def test_generate_applies_the_chat_template_unless_told_not_to(model_folder, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    tokenizer.chat_template = "{% for m in messages %}news {{ m['content'] }}{% endfor %} said"
    tokenizer.save_pretrained(model_folder)
    main(["generate", str(model_folder), "the", "--max-new-tokens", "2", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("(the checkpoint's chat template wraps the prompt")
    main(["generate", str(model_folder), "the", "--max-new-tokens", "2", "--device", "cpu", "--no-chat-template"])
    assert capsys.readouterr().out.startswith("the")


def test_cpu_hint_states_the_expected_time_from_the_model_size(model_folder):
    """The tiny model's 14 layers hold 2 x 4 x 64 x 64 + 2 x 2 x 64 x 32 + 2 x 3 x 64 x 128 weights."""
    from lords import LoRDSConfig
    from lords.cli import REFINE_SECONDS_PER_WEIGHT_STEP, _cpu_time_hint
    from lords.stream import open_source

    source, _ = open_source(model_folder)
    weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    hint = _cpu_time_hint(source, LoRDSConfig(steps=5 * 10**6), None)
    minutes = REFINE_SECONDS_PER_WEIGHT_STEP * weights * 5 * 10**6 * 2 / torch.get_num_threads() / 60
    assert hint.startswith(f"expected on this CPU ({torch.get_num_threads()} threads")
    assert f"about {minutes:.0f} min of refinement (5000000 steps x 0M weights" in hint
    assert "0 s of calibration (0 tokens" in hint
    # error-feedback codes: refinement in smaller stacks plus the code assignment, and two forwards a block
    from lords.cli import FEEDBACK_CALIBRATION_FACTOR, FEEDBACK_REFINE_FACTOR, FORWARD_SECONDS_PER_TOKEN_PARAMETER
    from lords.stream import empty_model

    parameters = sum(p.numel() for p in empty_model(source.config, torch.float32).parameters())
    tokens = 10**8
    calibration_ids = torch.zeros(1, 1, dtype=torch.int64).expand(10**5, 10**3)  # only its size is read
    hint = _cpu_time_hint(source, LoRDSConfig(steps=5 * 10**6, codes="gptq"), calibration_ids)
    calibration = FORWARD_SECONDS_PER_TOKEN_PARAMETER * tokens * parameters * 2 / torch.get_num_threads() / 60
    assert f"about {minutes * FEEDBACK_REFINE_FACTOR:.0f} min of refinement" in hint
    assert f"{calibration * FEEDBACK_CALIBRATION_FACTOR:.0f} min of calibration ({tokens} tokens" in hint


def test_compare_writes_the_command_that_made_the_table(model_folder, tmp_path, capsys):
    """The results file names the command as it was given (main's argv), not the process's sys.argv."""
    out = tmp_path / "results" / "quality.md"
    argv = ["compare", str(model_folder), "--bits", "4", "--block-size", "32", "--methods", "nf-rtn", "--seq-len",
            "16", "--max-tokens", "128", "--calib-samples", "2", "--calib-len", "16", "--out", str(out),
            "--device", "cpu"]
    main(argv)
    table = "\n".join(line for line in capsys.readouterr().out.splitlines() if line.startswith("|"))
    text = out.read_text()
    assert f"\n    lords {' '.join(argv)}\n" in text
    assert text.endswith(table + "\n") and (tmp_path / "results" / "quality.png").is_file()
    # every figure but the seconds is the library's for the same model, data and settings
    from functools import partial

    from lords.assets import calibration_tokens
    from lords.cli import _load, build_parser
    from lords.eval.compare import format_rows, run_comparison

    args = build_parser().parse_args(argv)
    model, tokenizer, _ = _load(args.model, torch.device("cpu"))
    score = partial(perplexity, token_ids=heldout_tokens(tokenizer, args.max_tokens), seq_len=args.seq_len,
                    progress=False)
    rows = run_comparison(model, score, calibration_tokens(tokenizer, args.calib_samples, args.calib_len),
                          tuple(args.bits), args.block_size, args.steps, args.lr, tuple(args.methods),
                          torch.device("cpu"), codebooks=tuple(args.codebooks), refit_rounds=args.refit_rounds)

    def without_seconds(lines: str) -> list[str]:
        return [line.rsplit("|", 2)[0] for line in lines.splitlines()]

    assert len(table.splitlines()) == 4  # header, rule, the model itself, nf-rtn at 4 bits
    assert without_seconds(table) == without_seconds(format_rows(rows))
