"""The main command's phases on the CPU, each against what bounds it, as a markdown table.

    python -m benchmarks.first_run --calib-samples 16 --steps 5 --max-tokens 4096 --out results/first_run.md

- calibration: the streaming walk that records E[x^2] (lords.stream.walk_blocks with watched linears) against a plain
  dense forward of the same tokens (target: <= 1.3x);
- refinement: seconds and page faults per step over the default model's stacks (per-step cost, from `--steps` steps
  minus a 0-step run), so the README command's total can be read off for any number of steps;
- evaluation: perplexity of a 4-bit model (SVD init only: the speed does not depend on the steps) against the dense
  model over the same tokens (target: <= 1.3x), and one forward with the per-call dequantization it replaced.
The machine's load average is printed with the table: other jobs sharing the cores stretch every row alike.
"""

import argparse
import os
import platform
import resource
import time

import torch

from benchmarks.tables import finish_report, produced_by


def timed(function):
    """(wall seconds, CPU seconds of this process, minor page faults, result): on a loaded machine the CPU seconds
    move less than the wall time."""
    start, cpu = time.perf_counter(), time.process_time()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    result = function()
    return (time.perf_counter() - start, time.process_time() - cpu,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration sequences of --calib-len tokens")
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="refinement steps timed per stack")
    parser.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens for the evaluation rows")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import transformers

    import lords
    from lords.assets import calibration_tokens, default_model_path, heldout_tokens, load_pretrained
    from lords.codebooks import get_codebook
    from lords.eval.perplexity import perplexity
    from lords.factorize import lords_quantize
    from lords.model import block_targets, layer_rank, model_targets
    from lords.stream import ModelSource, empty_model, walk_blocks

    load_seconds, load_cpu, _, (model, tokenizer) = timed(lambda: load_pretrained(default_model_path()))
    calibration = calibration_tokens(tokenizer, args.calib_samples, args.calib_len)
    config = lords.LoRDSConfig(bits=4)
    rows = [("load the default model (GGUF dequantized by transformers)", f"{load_seconds:.1f} s", f"{load_cpu:.1f} s",
             "")]

    def dense_forward():
        with torch.no_grad():
            for batch in calibration.split(8):
                model(batch, use_cache=False)

    dense_seconds, dense_cpu, _, _ = timed(dense_forward)
    source = ModelSource(model, "default model")
    meta = empty_model(model.config, torch.float32, "cpu")
    stats = {}

    def calibrate():
        def watch(module, name):
            return [layer for _, layer in block_targets(module, name, config)]

        for block in walk_blocks(meta, source, calibration, "cpu", torch.float32, watch=watch):
            names = {layer: name for name, layer in block_targets(block.module, block.name, config)}
            stats.update({names[layer]: value for layer, value in block.moments.items()})

    calib_seconds, calib_cpu, _, _ = timed(calibrate)
    tokens = calibration.numel()
    rows.append((f"dense forward over the {tokens} calibration tokens", f"{dense_seconds:.1f} s", f"{dense_cpu:.1f} s",
                 ""))
    rows.append(("calibration statistics (streaming walk, one forward a block)", f"{calib_seconds:.1f} s",
                 f"{calib_cpu:.1f} s", f"{calib_cpu / dense_cpu:.2f}x the dense forward's CPU time"))

    groups: dict[tuple, list] = {}
    for name, layer in model_targets(model, config):
        groups.setdefault(tuple(layer.weight.shape), []).append((name, layer))
    codebook = get_codebook("nf", 4)
    total_step, total_cpu, total_faults = 0.0, 0.0, 0
    for shape, members in groups.items():
        weight = torch.stack([layer.weight.detach().float() for _, layer in members])
        channels = torch.stack([stats[name] for name, _ in members])
        rank = layer_rank(config, *shape)

        def refine(steps):
            return lords_quantize(weight, codebook, config.block_size, rank, steps, channel_weight=channels)

        base_seconds, base_cpu, base_faults, _ = timed(lambda: refine(0))
        seconds, cpu, faults, _ = timed(lambda: refine(args.steps))
        step, step_cpu = (seconds - base_seconds) / args.steps, (cpu - base_cpu) / args.steps
        step_faults = (faults - base_faults) / args.steps
        total_step, total_cpu, total_faults = total_step + step, total_cpu + step_cpu, total_faults + step_faults
        rows.append((f"refinement step, {len(members)} layers {shape[0]}x{shape[1]}", f"{step:.2f} s",
                     f"{step_cpu:.2f} s", f"{step_faults:,.0f} page faults a step"))
    rows.append(("refinement step, whole model", f"{total_step:.2f} s", f"{total_cpu:.2f} s",
                 f"{total_faults:,.0f} page faults a step; 100 steps: {100 * total_step:.0f} s"))

    heldout = heldout_tokens(tokenizer, args.max_tokens)
    dense_eval, dense_eval_cpu, _, dense_ppl = timed(lambda: perplexity(model, heldout, progress=False))
    lords.quantize(model, lords.LoRDSConfig(bits=4, steps=0), progress=False)
    lords_eval, lords_eval_cpu, _, lords_ppl = timed(lambda: perplexity(model, heldout, progress=False))
    window = heldout[: 4 * 512].view(4, 512)
    with torch.no_grad():
        per_call, per_call_cpu, _, _ = timed(lambda: model(window, use_cache=False))
        with lords.dense_weights(model):
            once, once_cpu, _, _ = timed(lambda: model(window, use_cache=False))
    rows.append((f"perplexity, dense model, {heldout.numel()} tokens", f"{dense_eval:.1f} s", f"{dense_eval_cpu:.1f} s",
                 f"ppl {dense_ppl:.3f}"))
    rows.append((f"perplexity, LoRDS 4-bit (SVD init), {heldout.numel()} tokens", f"{lords_eval:.1f} s",
                 f"{lords_eval_cpu:.1f} s", f"{lords_eval_cpu / dense_eval_cpu:.2f}x the dense model's CPU time "
                 f"(ppl {lords_ppl:.3f})"))
    rows.append(("one forward of 4 x 512 tokens: dequantizing per call / dense_weights", f"{per_call:.2f} s / "
                 f"{once:.2f} s", f"{per_call_cpu:.2f} s / {once_cpu:.2f} s", f"{per_call_cpu / once_cpu:.1f}x"))

    lines = produced_by("# The main command's phases on the CPU", "benchmarks.first_run")
    lines += [f"- date: {time.strftime('%Y-%m-%d %H:%M')}; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"transformers {transformers.__version__}; load average at the end {os.getloadavg()[0]:.1f} "
              "(other jobs shared the cores)", "", "| phase | wall time | CPU time | note |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
