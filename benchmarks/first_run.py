"""The README's main command timed in a fresh clone, and its phases on the CPU against what bounds them.

    python -m benchmarks.first_run --fresh-clone /tmp/fresh --out results/first_run.md

- with --fresh-clone: this checkout's last commit is cloned into a new folder with a new venv, and the README's first
  command runs there exactly as written, each of its `&&` steps under `/usr/bin/time -v`, while the load average is
  sampled (other jobs sharing the cores make every time an upper bound); its log and time files stay in the folder;

- calibration: the streaming walk that records E[x^2] (lords.stream.walk_blocks with watched linears) against a plain
  dense forward of the same tokens (target: <= 1.3x);
- refinement: seconds and page faults per step over the default model's stacks (per-step cost, from `--steps` steps
  minus a 0-step run), so the README command's total can be read off for any number of steps;
- evaluation and generation: perplexity and 40 greedy tokens of a 4-bit model (SVD init only: the speed does not
  depend on the steps) against the dense model (target: <= 1.3x), one forward with the per-call dequantization that
  lords.dense_weights replaced, and dequantizing every layer through unpacked codes against unpack_levels' tables.
The machine's load average is printed with the tables: other jobs sharing the cores stretch every row alike.
"""

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import torch

from benchmarks.tables import finish_report, produced_by


REPO = Path(__file__).resolve().parents[1]
# the lines of `/usr/bin/time -v` that the report keeps
TIME_FIELDS = {"wall": "Elapsed (wall clock) time", "user": "User time (seconds)",
               "system": "System time (seconds)", "max_rss_kb": "Maximum resident set size (kbytes)",
               "minor_faults": "Minor (reclaiming a frame) page faults"}


def readme_command(readme: Path) -> str:
    """The README's first command: the first indented line of the section "The two commands"."""
    section = readme.read_text().split("## The two commands", 1)[1]
    return next(line.strip() for line in section.splitlines() if line.startswith("    "))


def seconds_of(clock: str) -> float:
    """`/usr/bin/time`'s h:mm:ss or m:ss.ss as seconds."""
    total = 0.0
    for part in clock.split(":"):
        total = 60 * total + float(part)
    return total


def read_time_file(path: Path) -> dict:
    text = path.read_text()
    values = {}
    for key, label in TIME_FIELDS.items():
        match = re.search(rf"{re.escape(label)}.*: (\S+)$", text, re.MULTILINE)
        values[key] = seconds_of(match.group(1)) if key == "wall" else float(match.group(1))
    return values


class LoadSampler:
    """The 1-minute load average every few seconds while a step runs: its mean and maximum go next to the time."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self.stop = every, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def timed_step(step: str, folder: Path, env: dict, index: int) -> dict:
    """Run one step of the command in the fresh clone under `/usr/bin/time -v`; its output goes to step<index>.log."""
    log, time_file = folder / f"step{index}.log", folder / f"step{index}.time"
    with open(log, "w") as out, LoadSampler() as load:
        result = subprocess.run(["/usr/bin/time", "-v", "-o", str(time_file), "bash", "-c", step], cwd=folder, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"error: `{step}` failed with exit code {result.returncode}; see {log}")
    return {"step": step, "log": log.read_text(), **read_time_file(time_file),
            "load_mean": sum(load.samples) / len(load.samples), "load_max": max(load.samples)}


def fresh_clone_run(folder: Path) -> tuple[str, list[dict]]:
    """Clone this checkout's last commit into folder, make a venv there, and run the README's first command in it,
    step by step; returns the commit and each step's figures, plus `lords --help` timed the same way. A folder where
    such a run finished is read back instead (its steps.json), so that the phases can be measured again alone."""
    record = folder / "steps.json"
    if record.exists():
        saved = json.loads(record.read_text())
        return saved["commit"], saved["steps"]
    if folder.exists():
        raise SystemExit(f"error: {folder} exists without a finished run (steps.json); the fresh clone needs a new "
                         "folder")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(folder)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder / ".venv")], check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(folder / ".venv"), PATH=f"{folder / '.venv' / 'bin'}:{os.environ['PATH']}")
    steps = [*readme_command(folder / "README.md").split(" && "), "lords --help"]
    figures = [timed_step(step, folder, env, index) for index, step in enumerate(steps)]
    record.write_text(json.dumps({"commit": commit, "steps": figures}))
    return commit, figures


def main_command_step(steps: list[dict]) -> dict:
    return next(step for step in steps if step["step"].startswith("lords quantize"))


def fresh_clone_lines(commit: str, steps: list[dict]) -> list[str]:
    """The fresh clone's table: every step's times and load, then what the main command printed."""
    lines = [f"## The README's first command in a fresh clone (commit {commit}, new venv)", "",
             "| step | wall | user | system | max RSS | minor page faults | load average (1 min): mean / max |",
             "|---|---|---|---|---|---|---|"]
    for step in steps:
        lines.append(f"| `{step['step']}` | {step['wall']:.1f} s | {step['user']:.1f} s | {step['system']:.1f} s | "
                     f"{step['max_rss_kb'] / 1e6:.2f} GB | {step['minor_faults']:,.0f} | "
                     f"{step['load_mean']:.1f} / {step['load_max']:.1f} |")
    main_log = main_command_step(steps)["log"]
    printed = [line for line in main_log.splitlines() if not re.search(r"\d+%\|", line)]
    lines += ["", "What the main command printed (progress bars left out):", ""]
    lines += [f"    {line}" for line in printed if line.strip()]
    return lines


def timed(function):
    """(wall seconds, CPU seconds of this process, minor page faults, result): on a loaded machine the CPU seconds
    move less than the wall time."""
    start, cpu = time.perf_counter(), time.process_time()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    result = function()
    return (time.perf_counter() - start, time.process_time() - cpu,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, result)


def indexed_weight(layer) -> torch.Tensor:
    """The dequantization that unpack_levels replaced: unpack the codes, then index the codebook with them."""
    return (layer.scale_b.float() @ layer.scale_a.float()) * layer.codebook.float()[layer.unpacked_codes().long()]


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else f"missed by {value / target - 1:.0%}"


def measure_phases(args) -> tuple[list[tuple], list[tuple]]:
    """The phases' rows and the targets they measure."""
    import lords
    from lords.assets import calibration_tokens, default_model_path, heldout_tokens, load_pretrained
    from lords.codebooks import get_codebook
    from lords.eval.perplexity import perplexity
    from lords.factorize import lords_quantize
    from lords.linear import LoRDSLinear
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
    calibration_ratio = calib_cpu / dense_cpu
    rows.append((f"dense forward over the {tokens} calibration tokens", f"{dense_seconds:.1f} s", f"{dense_cpu:.1f} s",
                 ""))
    rows.append(("calibration statistics (streaming walk, one forward a block)", f"{calib_seconds:.1f} s",
                 f"{calib_cpu:.1f} s", f"{calibration_ratio:.2f}x the dense forward's CPU time"))

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
    prompt = tokenizer("The capital of France is", return_tensors="pt")

    def generate():
        with torch.no_grad(), lords.dense_weights(model):
            return model.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False)

    dense_eval, dense_eval_cpu, _, dense_ppl = timed(lambda: perplexity(model, heldout, progress=False))
    dense_generate, dense_generate_cpu, _, _ = timed(generate)
    lords.quantize(model, lords.LoRDSConfig(bits=4, steps=0), progress=False)
    lords_eval, lords_eval_cpu, _, lords_ppl = timed(lambda: perplexity(model, heldout, progress=False))
    lords_generate, lords_generate_cpu, _, _ = timed(generate)
    eval_ratio, generate_ratio = lords_eval_cpu / dense_eval_cpu, lords_generate_cpu / dense_generate_cpu
    window = heldout[: 4 * 512].view(4, 512)
    with torch.no_grad():
        per_call, per_call_cpu, _, _ = timed(lambda: model(window, use_cache=False))
        with lords.dense_weights(model):
            once, once_cpu, _, _ = timed(lambda: model(window, use_cache=False))
        layers = [module for module in model.modules() if isinstance(module, LoRDSLinear)]
        indexed, indexed_cpu, _, _ = timed(lambda: [indexed_weight(layer) for layer in layers])
        looked_up, looked_up_cpu, _, _ = timed(lambda: [layer.dequantize() for layer in layers])
    rows.append((f"perplexity, dense model, {heldout.numel()} tokens", f"{dense_eval:.1f} s", f"{dense_eval_cpu:.1f} s",
                 f"ppl {dense_ppl:.3f}"))
    rows.append((f"perplexity, LoRDS 4-bit (SVD init), {heldout.numel()} tokens", f"{lords_eval:.1f} s",
                 f"{lords_eval_cpu:.1f} s", f"{eval_ratio:.2f}x the dense model's CPU time (ppl {lords_ppl:.3f})"))
    rows.append((f"generate {args.new_tokens} tokens, dense model", f"{dense_generate:.1f} s",
                 f"{dense_generate_cpu:.1f} s", ""))
    rows.append((f"generate {args.new_tokens} tokens, LoRDS 4-bit (dense_weights)", f"{lords_generate:.1f} s",
                 f"{lords_generate_cpu:.1f} s", f"{generate_ratio:.2f}x the dense model's CPU time"))
    rows.append(("one forward of 4 x 512 tokens: dequantizing per call / dense_weights", f"{per_call:.2f} s / "
                 f"{once:.2f} s", f"{per_call_cpu:.2f} s / {once_cpu:.2f} s", f"{per_call_cpu / once_cpu:.1f}x"))
    rows.append((f"dequantize all {len(layers)} layers: indexing with unpacked codes / unpack_levels",
                 f"{indexed:.2f} s / {looked_up:.2f} s", f"{indexed_cpu:.2f} s / {looked_up_cpu:.2f} s",
                 f"{indexed_cpu / looked_up_cpu:.1f}x faster"))

    targets = [("calibration statistics <= 1.3x a dense forward (CPU time)", f"{calibration_ratio:.2f}x",
                verdict(calibration_ratio, 1.3)),
               ("evaluation of the 4-bit model <= 1.3x the dense model (CPU time)", f"{eval_ratio:.2f}x",
                verdict(eval_ratio, 1.3)),
               ("generation with the 4-bit model <= 1.3x the dense model (CPU time)", f"{generate_ratio:.2f}x",
                verdict(generate_ratio, 1.3)),
               ("refinement step without allocation churn (page faults a step, whole model)",
                f"{total_faults:,.0f}", "")]
    return rows, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh-clone", type=Path, default=None,
                        help="a new folder: run the README's first command in a fresh clone there first")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration sequences of --calib-len tokens")
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="refinement steps timed per stack")
    parser.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens for the evaluation rows")
    parser.add_argument("--new-tokens", type=int, default=40, help="greedy tokens for the generation rows")
    parser.add_argument("--no-phases", dest="phases", action="store_false",
                        help="only the fresh clone's table (with --fresh-clone: read back from a finished run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    fresh = fresh_clone_run(args.fresh_clone) if args.fresh_clone else None
    rows, targets = measure_phases(args) if args.phases else ([], [])

    lines = produced_by("# The main command on the CPU: a fresh clone, its phases, the targets of issue 24",
                        "benchmarks.first_run")
    lines += [f"- date: {time.strftime('%Y-%m-%d %H:%M')} UTC; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores shared with other jobs, torch {torch.__version__} ({torch.get_num_threads()} "
              f"threads), transformers {version('transformers')}; load average at the end {os.getloadavg()[0]:.1f}",
              "- every wall time is an upper bound when the load average exceeds the 2 cores: other jobs shared them; "
              "CPU time (this process's own) moves less with the load, so the ratios below use it", ""]
    if fresh:
        lines += [*fresh_clone_lines(*fresh), ""]
    if rows:
        lines += ["## Phases", "", "| phase | wall time | CPU time | note |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in rows]
    readme_lines = len((REPO / "README.md").read_text().splitlines())
    targets.append(("README under 250 lines", f"{readme_lines}", verdict(readme_lines, 249)))
    if fresh:
        main_step, help_step = main_command_step(fresh[1]), fresh[1][-1]
        loaded = (f" (its CPU time {main_step['user'] + main_step['system']:.0f} s; load average "
                  f"{main_step['load_mean']:.1f} on {os.cpu_count()} cores: an upper bound)")
        targets += [("main command <= 6 min after the install (wall)", f"{main_step['wall']:.0f} s{loaded}",
                     verdict(main_step["wall"], 360)),
                    ("whole main command's minor page faults (issue: 237M)", f"{main_step['minor_faults'] / 1e6:.2f}M",
                     ""),
                    ("`lords --help` under 1 s (wall, fresh venv)", f"{help_step['wall']:.2f} s",
                     verdict(help_step["wall"], 1.0))]
    lines += ["", "## Targets measured here", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in targets]
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
