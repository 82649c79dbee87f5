"""HD-PiSSA on K real processes (NCCL on GPUs, gloo on CPUs) against its single-process emulation with K virtual slices.

    python -m benchmarks.hd_pissa_processes --processes 2 --out results/hd_pissa_processes.md   # a machine with 2 GPUs

The script starts K workers with torchrun, each on its own GPU training its own slice on its own chunk of every batch
and all-gathering the factor deltas; rank 0 scores the exported model and saves its float32 update of one layer. Then
it runs the same training in this process, the K slices taking turns on one GPU, and compares: the two must compute the
same update (bit-identical up to the GPU's non-deterministic kernels), and the K processes should take about 1/K of
the emulation's time per step.
"""

import sys
import time
from pathlib import Path

import torch

from benchmarks.tables import devices, finish_report, produced_by
from benchmarks.distributed import check_gpus, join_process_group, process_parser, run_workers
from benchmarks.finetune import add_workload_arguments, workload
from lords.assets import default_model_path, heldout_tokens, load_pretrained
from lords.hd_pissa import hd_pissa_finetune


def train(args, device: torch.device, slices: int | None) -> dict:
    """HD-PiSSA on the default workload; under torch.distributed, slices=None (the processes are the slices)."""
    path = Path(args.model) if args.model else default_model_path()
    model, tokenizer = load_pretrained(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    train_tokens, score, metric, _ = workload(args, tokenizer, heldout_tokens(tokenizer, args.max_tokens))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = hd_pissa_finetune(model, train_tokens, args.steps, args.rank, args.lr, args.batch_size, args.seq_len,
                               slices=slices, progress=False, updates_of=(args.layer,))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "losses": result["losses"], "sent": result["sent_values_per_step"],
            "update": result["updates"][args.layer].cpu(), "score": score(model), "metric": metric}


def worker(args) -> None:
    import torch.distributed as dist

    result = train(args, join_process_group(), None)
    if dist.get_rank() == 0:
        torch.save(result, args.worker_out)
    dist.destroy_process_group()


def main() -> None:
    parser = process_parser(__doc__, steps=100, batch_help="global batch, split over the K slices")
    parser.add_argument("--rank", type=int, default=5, help="rank per slice")
    parser.add_argument("--max-tokens", type=int, default=40_000)
    parser.add_argument("--layer", default="model.layers.10.mlp.down_proj")
    add_workload_arguments(parser)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args)
    check_gpus(args.processes)
    started = time.perf_counter()
    processes = run_workers("benchmarks.hd_pissa_processes", sys.argv[1:], args.processes)
    launched = time.perf_counter() - started
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    emulated = train(args, device, args.processes)
    difference = (processes["update"] - emulated["update"]).norm() / emulated["update"].norm()
    loss_gap = max(abs(a - b) for a, b in zip(processes["losses"], emulated["losses"]))
    rows = [(f"{args.processes} processes ({'NCCL' if device.type == 'cuda' else 'gloo'})", processes),
            (f"1 process, {args.processes} virtual slices", emulated)]
    lines = [
        *produced_by(f"# HD-PiSSA on {args.processes} processes vs its single-process emulation",
                     "benchmarks.hd_pissa_processes"),
        f"- date: {time.strftime('%Y-%m-%d')}; device: "
        f"{devices(device)}; "
        f"torch {torch.__version__}; the torchrun launch took {launched:.0f} s in all (model loading included)",
        f"- {args.steps} steps, global batch {args.batch_size} x {args.seq_len} tokens, rank {args.rank} per slice, "
        f"Adam lr {args.lr} cosine; held-out: {emulated['metric']}",
        f"- difference between the two runs: relative, of {args.layer}'s float32 ΔW "
        f"{difference:.2e}; largest per-step loss difference {loss_gap:.2e}", "",
        "| run | training wall (s) | per step (ms) | held-out | sent per step per device "
        "| final loss (mean of last 10) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in rows:
        last = result["losses"][-10:]
        lines.append(f"| {name} | {result['seconds']:.1f} | {1e3 * result['seconds'] / args.steps:.1f} "
                     f"| {result['score']:.3f} | {result['sent'] / 1e6:.2f}M | {sum(last) / len(last):.4f} |")
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
