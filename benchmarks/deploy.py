"""Issue 25's deployment figures on one device, each measured in a fresh process so that its peaks are its own:

- make: a random-weight Llama of the config (seed 0, bf16) written as sharded safetensors, the source of the rest;
- stream: `lords quantize`'s streaming path from that folder to a lords checkpoint (time, peak GPU and host memory);
- in-memory: the same through the whole model in memory (from_pretrained, lords.quantize, lords.save), to compare;
- load: AutoModelForCausalLM.from_pretrained of the lords checkpoint (time, peak host memory against its size);
- generate: a fresh process's first 64-token greedy generate against the same call once warm;
- synthetic: a SyntheticSource of the config's shapes (70B, 405B: no disk or host memory could hold them) streamed
  for a few blocks (--blocks), extrapolated to the whole model by the median time a block took (meaningful where
  each block fills its own refinement stacks, as from 8B up; a tiny model's blocks share one stack);
- distributed: the synthetic source's first --blocks blocks quantized by one process, then by --processes processes
  under torchrun (lords.distributed: gloo on the CPU, NCCL on GPUs), and the two checkpoints compared byte for byte.

    python -m benchmarks.deploy --device cpu --config tiny                      # every step, on the CPU
    python -m benchmarks.deploy --device cpu --config small --run make stream load   # a checkpoint of ~450 MB
    python -m benchmarks.deploy --device cuda --config 8b --run make stream in-memory    # H200, one call each,
    python -m benchmarks.deploy --device cuda --config 8b --run load generate            # each within minutes
    python -m benchmarks.deploy --device cuda --config 70b --run synthetic --blocks 4
    python -m benchmarks.deploy --device cpu --config tiny --run distributed --processes 2

Each step adds its record to --results/deploy.json (replacing an earlier one of the same config, step and device)
and rewrites deploy.md from all records: a table per step, under the commands that produced its rows. On the GPU
machine, carry results/deploy.json between calls (or pass --results $OUT and merge) so that the tables accumulate.
Host memory is the process's peak resident set (VmHWM) and what it rose by from the start of the step (after
imports and CUDA's initialisation); GPU memory is torch's peak allocated.
"""

import argparse
import datetime
import filecmp
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.tables import write_table

STEPS = ("make", "stream", "in-memory", "load", "generate", "synthetic", "distributed")
LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
              tie_word_embeddings=False)
CONFIGS = {
    "tiny": dict(LLAMA3, vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    # TinyLlama-1.1B's shapes, 8 of its 22 blocks: a 4-bit checkpoint of about 450 MB
    "small": dict(LLAMA3, vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4),
    "8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "405b": dict(LLAMA3, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128),
}
GiB = 2**30


def llama_config(name: str, layers: int | None = None):
    from transformers import LlamaConfig

    values = dict(CONFIGS[name])
    if layers is not None:
        values["num_hidden_layers"] = layers
    return LlamaConfig(**values)


def status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class Peaks:
    """Wall time, peak host RSS and peak GPU memory of what runs between start() and stop()."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.empty(1, device=device)  # CUDA's context counts in the start, not in the step

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        except OSError:
            pass  # then the peak may predate the step (imports); the rise is still measured from the start
        self.host_start = status("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.started = time.perf_counter()

    def stop(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        figures = {"seconds": time.perf_counter() - self.started, "host_peak_GiB": status("VmHWM") / GiB,
                   "host_rise_GiB": (status("VmHWM") - self.host_start) / GiB}
        if self.device.type == "cuda":
            figures["gpu_peak_GiB"] = torch.cuda.max_memory_allocated(self.device) / GiB
        return figures


def folder_size(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors")) / GiB


def calibration(config, args) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (args.calib_samples, args.calib_len), generator=generator)


def lords_config(args):
    import lords

    return lords.LoRDSConfig(bits=4, block_size=64, steps=args.steps)


def step_make(args, work: Path, device: torch.device) -> dict:
    """The dense source: bf16 random weights, generated on the device and written as transformers shards."""
    from lords.checkpoint import ShardedSafetensors, write_folder
    from lords.stream import SyntheticSource

    config = llama_config(args.config)
    source = SyntheticSource(config, seed=0, dtype=torch.bfloat16, device=device)
    peaks = Peaks(device)
    peaks.start()

    def write(staging: Path) -> None:
        writer = ShardedSafetensors(staging, {name: (shape, torch.bfloat16) for name, shape in source.shapes.items()},
                                    args.max_shard_size)
        for name in source.shapes:
            writer.write(name, source.tensor(name, device))
        writer.close()
        config.dtype = torch.bfloat16
        config.save_pretrained(staging)

    write_folder(work / "source", True, write)
    return {**peaks.stop(), "size_GiB": folder_size(work / "source"),
            "parameters_B": sum(torch.Size(s).numel() for s in source.shapes.values()) / 1e9}


def step_stream(args, work: Path, device: torch.device) -> dict:
    from lords.stream import SafetensorsSource, quantize_to_folder

    source = SafetensorsSource(work / "source")
    calib = calibration(source.config, args)
    peaks = Peaks(device)
    peaks.start()
    quantize_to_folder(source, work / "lords", lords_config(args), calib, device=device, overwrite=True,
                       max_shard_size=args.max_shard_size, progress=False)
    return {**peaks.stop(), "size_GiB": folder_size(work / "lords")}


def step_in_memory(args, work: Path, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    import lords

    config = lords_config(args)
    peaks = Peaks(device)
    peaks.start()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(work / "source", device_map=device, dtype=dtype)
    loaded = time.perf_counter()
    lords.quantize(model, config, calibration=calibration(model.config, args), device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    quantized = time.perf_counter()
    lords.save(model, work / "lords-in-memory", config=config, overwrite=True, dtype=torch.bfloat16,
               max_shard_size=args.max_shard_size)
    figures = peaks.stop()
    figures.update(load_seconds=loaded - peaks.started, quantize_seconds=quantized - loaded,
                   save_seconds=time.perf_counter() - quantized, size_GiB=folder_size(work / "lords-in-memory"))
    return figures


def step_load(args, work: Path, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    import lords  # noqa: F401  (registers quant_method "lords")

    peaks = Peaks(device)
    peaks.start()
    model = AutoModelForCausalLM.from_pretrained(work / "lords", device_map=device, dtype="auto")
    figures = {**peaks.stop(), "size_GiB": folder_size(work / "lords")}
    if device.type == "cpu":  # the tensors stay mapped from the files until used: one forward reads them all
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long))
        figures["host_peak_after_forward_GiB"] = status("VmHWM") / GiB
    return figures


def step_generate(args, work: Path, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    import lords  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(work / "lords", device_map=device, dtype="auto")
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(3):
        peaks = Peaks(device)
        peaks.start()
        with torch.no_grad():
            model.generate(prompt.to(device), max_new_tokens=64, min_new_tokens=64, do_sample=False)
        seconds.append(peaks.stop()["seconds"])
    steady = min(seconds[1:])
    return {"first_seconds": seconds[0], "steady_seconds": steady, "first_over_steady": seconds[0] / steady,
            "first_tokens_per_s": 64 / seconds[0], "steady_tokens_per_s": 64 / steady}


class BlockClock:
    """A source that notes when each decoder block is first read: the walk reads block i + 1 once block i is done
    (read, run, quantized and written, as each block of a 70B model fills its own refinement stacks)."""

    def __init__(self, source):
        self.source, self.starts = source, {}

    def __getattr__(self, name):
        return getattr(self.source, name)

    def tensor(self, name: str, device) -> torch.Tensor:
        now, tensor = time.perf_counter(), self.source.tensor(name, device)
        parts = name.split(".")
        if "layers" in parts and tensor.dim() > 1:  # a block's norms are copied ahead; its matrices come with it
            self.starts.setdefault(int(parts[parts.index("layers") + 1]), now)
        return tensor


def step_synthetic(args, work: Path, device: torch.device) -> dict:
    """The config's shapes truncated to --blocks blocks, generated on the device, streamed to disk (then deleted);
    the median time between the starts of consecutive blocks extrapolates to the whole model."""
    from lords.stream import SyntheticSource, quantize_to_folder

    config = llama_config(args.config, args.blocks)
    source = BlockClock(SyntheticSource(config, seed=0, dtype=torch.bfloat16, device=device))
    calib = calibration(config, args)
    peaks = Peaks(device)
    peaks.start()
    out = work / "synthetic"
    quantize_to_folder(source, out, lords_config(args), calib, device=device, overwrite=True,
                       max_shard_size=args.max_shard_size, progress=False)
    figures = {**peaks.stop(), "size_GiB": folder_size(out), "blocks": args.blocks}
    shutil.rmtree(out)
    starts = [source.starts[index] for index in range(args.blocks)]
    intervals = sorted(later - earlier for earlier, later in zip(starts, starts[1:]))
    per_block = intervals[len(intervals) // 2]
    total = CONFIGS[args.config]["num_hidden_layers"]
    return {**figures, "block_seconds": intervals, "seconds_per_block": per_block, "blocks_in_model": total,
            "extrapolated_seconds": figures["seconds"] + (total - args.blocks) * per_block}


def step_distributed(args, work: Path, device: torch.device) -> dict:
    """One side of the distributed step: this process alone, or under torchrun with the others (the first one
    returns the slowest process's time and the largest peaks of any)."""
    import torch.distributed as dist

    from lords.stream import SyntheticSource, quantize_to_folder, read_report

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    config = llama_config(args.config, args.blocks)
    source = SyntheticSource(config, seed=0, dtype=torch.bfloat16, device=device)
    peaks = Peaks(device)
    peaks.start()
    out = work / f"distributed-{world}"
    quantize_to_folder(source, out, lords_config(args), calibration(config, args), device=device, overwrite=True,
                       max_shard_size=args.max_shard_size, progress=False)
    every = [peaks.stop()]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, peaks.stop())
        dist.destroy_process_group()
    figures = {key: max(f[key] for f in every) for key in every[0]}
    phases = read_report(out)["seconds"] if int(os.environ.get("RANK", "0")) == 0 else {}
    return {**figures, "processes": world, "threads": torch.get_num_threads(), "blocks": args.blocks, "phases": phases}


def same_checkpoints(first: Path, second: Path) -> bool:
    files = sorted(path.name for path in first.glob("*.safetensors*"))
    return files == sorted(path.name for path in second.glob("*.safetensors*")) and all(
        filecmp.cmp(first / name, second / name, shallow=False) for name in files)


def run_worker(args) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    work = Path(args.work) / args.config
    work.mkdir(parents=True, exist_ok=True)
    figures = globals()["step_" + args.worker.replace("-", "_")](args, work, device)
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(figures), flush=True)


def environment(device: torch.device) -> dict:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__, "commit": commit,
            "date": datetime.date.today().isoformat(),
            "command": "python -m benchmarks.deploy " + shlex.join(sys.argv[1:])}


def gib(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"


NOTES = {"distributed": [
    "Each side runs in fresh processes; seconds are the slowest process's, peaks the largest of any process. On the "
    "CPU every process has one thread (OMP_NUM_THREADS=1, torchrun's default), the one process too: the speed-up is "
    "then the split's alone, and the checkpoints compare byte for byte (a run whose one process had 2 threads gave a "
    "checkpoint that was not byte-identical: a CPU reduction's order follows the threads). Multi-GPU figures (time "
    "against one GPU, speed-up per GPU, peak memory per GPU for the 70B-shaped synthetic source) are not measured: "
    "the device tool lent only single-H200 machines during this work; they would come from `python -m "
    "benchmarks.deploy --device cuda --config 70b --run distributed --blocks 8 --processes 8`, not run yet.", ""]}


def render(records: list[dict]) -> str:
    lines = ["# Deployment: streaming quantization, from_pretrained, first generate, models larger than a GPU", "",
             "Produced by `benchmarks/deploy.py` (issue 25): each table lists the commands that produced its rows. "
             "Random weights (seed 0), 4-bit NF, block 64, parity rank; memory: host peak resident set (and its rise "
             "during the step), torch's peak allocated GPU memory.", ""]
    tables = {
        "make": ("Dense source written as sharded bf16 safetensors",
                 ["config", "device", "parameters (B)", "size (GiB)", "seconds"],
                 lambda r: [f"{r['parameters_B']:.2f}", gib(r["size_GiB"]), seconds(r["seconds"])]),
        "stream": ("Streaming quantize (`lords quantize`'s path), source folder to checkpoint",
                   ["config", "device", "steps", "seconds", "GPU peak (GiB)", "host peak (rise) (GiB)",
                    "checkpoint (GiB)"],
                   lambda r: [str(r["steps"]), seconds(r["seconds"]), gib(r.get("gpu_peak_GiB")),
                              f"{gib(r['host_peak_GiB'])} ({gib(r['host_rise_GiB'])})", gib(r["size_GiB"])]),
        "in-memory": ("In-memory path: from_pretrained of the dense folder, lords.quantize, lords.save",
                      ["config", "device", "steps", "load + quantize + save (s)", "GPU peak (GiB)",
                       "host peak (rise) (GiB)"],
                      lambda r: [str(r["steps"]), f"{r['load_seconds']:.1f} + {r['quantize_seconds']:.1f} + "
                                 f"{r['save_seconds']:.1f} = {r['seconds']:.1f}", gib(r.get("gpu_peak_GiB")),
                                 f"{gib(r['host_peak_GiB'])} ({gib(r['host_rise_GiB'])})"]),
        "load": ("AutoModelForCausalLM.from_pretrained of the lords checkpoint",
                 ["config", "device", "checkpoint (GiB)", "seconds", "host peak (rise) (GiB)", "rise / checkpoint",
                  "host peak after a forward (GiB)"],
                 lambda r: [gib(r["size_GiB"]), seconds(r["seconds"]),
                            f"{gib(r['host_peak_GiB'])} ({gib(r['host_rise_GiB'])})",
                            f"{r['host_rise_GiB'] / r['size_GiB']:.2f}", gib(r.get("host_peak_after_forward_GiB"))]),
        "generate": ("64-token greedy generate, batch 1, eager: a fresh process's first call against a warm one",
                     ["config", "device", "first (s)", "warm (s)", "first / warm", "tokens/s first, warm"],
                     lambda r: [seconds(r["first_seconds"]), seconds(r["steady_seconds"]),
                                f"{r['first_over_steady']:.2f}",
                                f"{r['first_tokens_per_s']:.1f}, {r['steady_tokens_per_s']:.1f}"]),
        "synthetic": ("Synthetic source (generated on the device block by block) streamed, extrapolated to all blocks",
                      ["config", "device", "steps", "blocks streamed: seconds", "GPU peak (GiB)",
                       "host peak (rise) (GiB)", "s / block (median)", "extrapolated to all blocks (s)"],
                      lambda r: [str(r["steps"]), f"{r['blocks']}: {r['seconds']:.1f}", gib(r.get("gpu_peak_GiB")),
                                 f"{gib(r['host_peak_GiB'])} ({gib(r['host_rise_GiB'])})",
                                 seconds(r["seconds_per_block"]),
                                 f"{r['extrapolated_seconds']:.0f} ({r['blocks_in_model']} blocks)"]),
        "distributed": ("Synthetic source streamed by one process and by several (torchrun, lords.distributed)",
                        ["config", "device", "steps", "blocks", "processes x threads", "seconds: 1, N",
                         "speed-up (per process)", "refinement s: 1, N", "reading and calibration s: 1, N",
                         "GPU peak per process: 1, N (GiB)", "host peak per process: 1, N "
                         "(GiB)", "checkpoints byte-identical"],
                        lambda r: [str(r["steps"]), str(r["blocks"]), f"1 x {r['one']['threads']}, "
                                   f"{r['split']['processes']} x {r['split']['threads']}",
                                   f"{r['one']['seconds']:.1f}, {r['split']['seconds']:.1f}",
                                   f"{r['speedup']:.2f} ({r['speedup'] / r['split']['processes']:.2f})",
                                   *(f"{r['one']['phases'][phase]:.1f}, {r['split']['phases'][phase]:.1f}"
                                     for phase in ("refinement", "reading and calibration")),
                                   f"{gib(r['one'].get('gpu_peak_GiB'))}, {gib(r['split'].get('gpu_peak_GiB'))}",
                                   f"{gib(r['one']['host_peak_GiB'])}, {gib(r['split']['host_peak_GiB'])}",
                                   "yes" if r["identical"] else "NO"]),
    }
    for step, (title, header, row) in tables.items():
        rows = [r for r in records if r["step"] == step]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        lines += [f"    {command}" for command in dict.fromkeys(r["command"] for r in rows)]
        lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for r in rows:
            lines.append("| " + " | ".join([r["config"], r["device"], *row(r)]) + " |")
        versions = sorted({f"torch {r['torch']}, transformers {r['transformers']}, commit {r['commit']}, {r['date']}"
                           for r in rows})
        lines += ["", "Versions: " + "; ".join(versions), ""] + NOTES.get(step, [])
    return "\n".join(lines)


def run_step(step: str, launcher: list[str], environ: dict | None = None) -> dict:
    """The figures of a worker run in a fresh process (or processes: launcher torchrun), with environ added."""
    done = subprocess.run([*launcher, "--worker", step, *sys.argv[1:]], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, **(environ or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stdout)
        raise SystemExit(f"step {step} failed (exit code {done.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=tuple(CONFIGS), default="tiny")
    parser.add_argument("--run", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--steps", type=int, default=100, help="refinement steps (the issue's figures used 100)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4, help="synthetic: blocks streamed (at least 2)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--processes", type=int, default=2, help="distributed: torchrun processes (GPUs on CUDA)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lords-deploy"),
                        help="where the source and checkpoints are written (kept between calls)")
    parser.add_argument("--results", default="results", help="folder of deploy.json and deploy.md")
    parser.add_argument("--worker", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    results = Path(args.results)
    store = results / "deploy.json"
    records = json.loads(store.read_text()) if store.is_file() else []
    context = environment(torch.device(args.device))
    for step in args.run:
        print(f"[{step}] {args.config} on {args.device}", flush=True)
        if step == "distributed":
            # on the CPU, one thread a process on both sides, as torchrun sets it: the comparison is then of the split
            # alone, and the checkpoints are comparable byte for byte (a CPU reduction's order follows the threads)
            threads = {"OMP_NUM_THREADS": "1"} if args.device == "cpu" else {}
            one = run_step(step, [sys.executable, "-m", "benchmarks.deploy"], threads)
            # "--" ends torchrun's own options: it would read --run as an abbreviation of its --run-path
            split = run_step(step, [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                    str(args.processes), "-m", "benchmarks.deploy", "--"])
            work = Path(args.work) / args.config
            figures = {"one": one, "split": split, "blocks": args.blocks, "speedup": one["seconds"] / split["seconds"],
                       "identical": same_checkpoints(work / "distributed-1", work / f"distributed-{args.processes}")}
        else:
            figures = run_step(step, [sys.executable, "-m", "benchmarks.deploy"])
        record = {"config": args.config, "step": step, "steps": args.steps, **context, **figures}
        print(json.dumps(record), flush=True)
        key = (args.config, step, context["device"])
        records = [r for r in records if (r["config"], r["step"], r["device"]) != key] + [record]
        write_table(store, json.dumps(records, indent=1) + "\n")
        write_table(results / "deploy.md", render(records))


if __name__ == "__main__":
    main()
