"""Time LoRDS PTQ (SVD init + refinement) of one layer and print a markdown table.

    python benchmarks/ptq_time.py --device cuda --steps 500            # GPU
    python benchmarks/ptq_time.py --device cpu --steps 20               # CPU (per-step time; 500 steps extrapolated)

The weight is random with LLM-like structure (row/column magnitudes, a few outlier columns); time does not depend
on the values. Shape (out, in) defaults to Llama-3-8B's down_proj, 4096 x 14336.
"""

import argparse
import platform
import time

import torch

from lords.codebooks import nf_codebook
from lords.factorize import lords_quantize, parity_rank


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_quantize(weight, bits, block_size, rank, steps, channel_weight, device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    factors = lords_quantize(weight, nf_codebook(bits).to(device), block_size, rank, steps,
                             channel_weight=channel_weight)
    synchronize(device)
    return time.perf_counter() - start, factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--in-features", type=int, default=14336)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--objectives", nargs="+", choices=("data-free", "activation-aware"),
                        default=["data-free", "activation-aware"])
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    n, m = args.out_features, args.in_features
    weight = torch.randn(n, m, generator=generator) * (torch.rand(n, 1, generator=generator) + 0.5)
    weight *= torch.rand(1, m, generator=generator) + 0.5
    weight[:, :8] *= 10
    weight = (weight * 0.02).to(device)
    channel_weight = (torch.rand(m, generator=generator) ** 4 * 10).to(device)
    rank = parity_rank(n, m, args.block_size)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)")
    timed_quantize(weight[:256], args.bits, args.block_size, rank, 2, channel_weight, device)  # warm-up
    init_seconds, _ = timed_quantize(weight, args.bits, args.block_size, rank, 0, None, device)
    print(f"# PTQ time, {n}x{m}, {args.bits}-bit NF, rank {rank} (parity at b={args.block_size}), {name}, "
          f"torch {torch.__version__}")
    print()
    print("| objective | steps | seconds | ms / step | 500-step time (s) | rel. error init -> final |")
    print("|---|---|---|---|---|---|")
    for label, channels in (("data-free", None), ("activation-aware", channel_weight)):
        if label not in args.objectives:
            continue
        seconds, factors = timed_quantize(weight, args.bits, args.block_size, rank, args.steps, channels, device)
        per_step = (seconds - init_seconds) / max(args.steps, 1)
        projected = init_seconds + 500 * per_step
        note = "" if args.steps == 500 else " (extrapolated)"
        print(
            f"| {label} | {args.steps} | {seconds:.2f} | {per_step * 1e3:.1f} | {projected:.1f}{note} | "
            f"{factors.error_init.item():.4f} -> {factors.error.item():.4f} |"
        )
    print(f"\nSVD init alone: {init_seconds:.3f} s")


if __name__ == "__main__":
    main()
