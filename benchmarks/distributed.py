"""LoRDS-PEFT and LoRDS-QAT under torchrun (DDP and FSDP2) against one process on the whole batch.

    python -m benchmarks.distributed --processes 2 --out results/distributed.md     # a machine with 2 GPUs

For each method and each mode the script starts K workers with torchrun (NCCL on GPUs, gloo on CPUs); every worker
builds the same model (LoRDS SVD init, no refinement), trains on its share of each global batch through
lords.train.finetune, and rank 0 saves its losses, timings and the starting and trained values of one decoder block.
The reference is the same training on the whole batch in one torchrun process. K processes should take the same
steps as one, so their updates (trained minus starting values) should agree up to the order of floating-point sums.
The reference runs under torchrun too, every run with the same thread count, because the starting values depend on
it: on the CPU, LAPACK's SVD gave down_proj factors of the default model that differ by 1e-4 relative between one
thread and two. With the reference in this process (two threads) the updates of 2 processes differed from its own
by 3.5-4% after 2 AdamW steps; with every process on one thread, by 1.8-2.9e-5. The table reports the start gap and
the update gap apart.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.finetune import qat_trainable, timed_finetune
from benchmarks.tables import devices, finish_report, produced_by
import lords
from lords.assets import default_model_path, documents, load_pretrained, token_stream
from lords.peft import mark_trainable
from lords.qat import prepare_qat
from lords.train import process_and_world

METHODS = ("peft", "qat")
MODES = ("ddp", "fsdp")


def process_parser(description: str, steps: int, batch_help: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark that compares a run on several processes with one process; --worker-out is set
    for its torchrun workers."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8, help=batch_help)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return parser


def check_gpus(processes: int) -> None:
    if torch.cuda.is_available() and torch.cuda.device_count() < processes:
        raise SystemExit(f"{processes} processes need {processes} GPUs, this machine has {torch.cuda.device_count()}")


def run_workers(module: str, argv: list[str], processes: int) -> dict:
    """Run `python -m module argv --worker-out FILE` on `processes` torchrun workers; what rank 0 saved to FILE."""
    # torchrun sets one thread a process only when it starts several; the same count everywhere keeps the SVD init,
    # which depends on it, the same in a one-process reference and in the workers.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as folder:
        worker_out = Path(folder) / "rank0.pt"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                        "-m", module, *argv, "--worker-out", str(worker_out)], check=True, env=env)
        return torch.load(worker_out)


def join_process_group() -> torch.device:
    """In a torchrun worker: this worker's device, after joining the group (NCCL on GPUs, gloo on CPUs)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def train(args, method: str, fsdp: bool, device: torch.device) -> dict:
    path = Path(args.model) if args.model else default_model_path()
    model, tokenizer = load_pretrained(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = lords.LoRDSConfig(bits=4, steps=0)
    groups = None
    if method == "peft":
        lords.quantize(model, config, device=device, progress=False)
        mark_trainable(model)
    else:
        prepare_qat(model, config, device=device, progress=False)
        groups = qat_trainable(model, args.qat_lr)
    block = f"model.layers.{args.block}."
    initial = {name: p.detach().float().cpu().clone() for name, p in model.named_parameters()
               if p.requires_grad and name.startswith(block)}
    tokens = token_stream(tokenizer, documents("calibration"))
    losses, step_s, peak_gb = timed_finetune(model, tokens, args, param_groups=groups, fsdp=fsdp)
    trained = {name: p.detach().float().cpu() for name, p in model.named_parameters() if name in initial}
    return {"losses": losses, "step_s": step_s, "peak_gb": peak_gb,
            "update": {name: trained[name] - initial[name] for name in initial}, "trained": trained}


def worker(args) -> None:
    import torch.distributed as dist

    device = join_process_group()
    try:
        result = train(args, args.method, args.mode == "fsdp", device)
    except Exception as error:  # reported in the table, not fatal
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"[:160]}
    if process_and_world()[0] == 0:
        torch.save(result, args.worker_out)
    dist.destroy_process_group()


def differences(result: dict, reference: dict) -> tuple[float, float]:
    """||update - reference update|| and ||start - reference start|| over the saved block, both over ||reference
    update||."""
    def norm(values) -> torch.Tensor:
        return sum(value.norm() ** 2 for value in values) ** 0.5

    def start(run: dict, name: str) -> torch.Tensor:
        return run["trained"][name] - run["update"][name]

    names = list(reference["update"])
    update = norm(reference["update"].values())
    update_gap = norm(result["update"][n] - reference["update"][n] for n in names)
    start_gap = norm(start(result, n) - start(reference, n) for n in names)
    return (update_gap / update).item(), (start_gap / update).item()


def main() -> None:
    parser = process_parser(__doc__, steps=50, batch_help="global batch, split over the processes")
    parser.add_argument("--qat-lr", type=float, default=2e-5)
    parser.add_argument("--block", type=int, default=10, help="decoder block whose trained values are compared")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # set for the torchrun workers
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args)
    check_gpus(args.processes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    rows = []
    for method in METHODS:
        reference = run_workers("benchmarks.distributed", [*sys.argv[1:], "--method", method, "--mode", "ddp"], 1)
        if "error" in reference:
            raise SystemExit(f"{method} on one process failed: {reference['error']}")
        rows.append((method, "1 process, whole batch", reference, None))
        for mode in MODES:
            result = run_workers("benchmarks.distributed", [*sys.argv[1:], "--method", method, "--mode", mode],
                                 args.processes)
            rows.append((method, f"{args.processes} processes, {mode.upper()}", result,
                         None if "error" in result else differences(result, reference)))
            print(method, mode, result.get("error", f"loss {result['losses'][-1]:.4f}"), flush=True)
    backend = "NCCL" if device.type == "cuda" else "gloo"
    lines = [
        *produced_by(f"# LoRDS-PEFT and QAT on {args.processes} processes (DDP, FSDP2) vs one process",
                     "benchmarks.distributed"),
        f"- date: {time.strftime('%Y-%m-%d')}; device: "
        f"{devices(device)}; "
        f"torch {torch.__version__}; {backend}; total {time.perf_counter() - started:.0f} s",
        f"- default model, LoRDS 4-bit SVD init (no refinement); {args.steps} steps of a global batch of "
        f"{args.batch_size} x {args.seq_len} tokens of the training documents; PEFT trains B, A at lr {args.lr}; QAT "
        f"trains weights and scales at lr {args.qat_lr} (scales x4)",
        f"- update gap: ||update - update by one process|| / ||update by one process|| over block {args.block}'s "
        "trained values (update = trained - starting values); start gap: the starting values' difference over the "
        "same norm; step: median; peak: torch.cuda.max_memory_allocated on rank 0", "",
        "| method | run | step (ms) | peak memory per GPU (GB) | loss, last step | update gap | start gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, run, result, gaps in rows:
        if "error" in result:
            lines.append(f"| {method} | {run} | {result['error']} | | | | |")
            continue
        gap_cells = "| | |" if gaps is None else f"| {gaps[0]:.2e} | {gaps[1]:.2e} |"
        lines.append(f"| {method} | {run} | {1e3 * result['step_s']:.1f} | {result['peak_gb']:.2f} "
                     f"| {result['losses'][-1]:.4f} {gap_cells}")
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
