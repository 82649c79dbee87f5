"""LoRDS fused forward vs the anchors, on the GPU: correctness first, then median latency per (shape, M).

    python benchmarks/kernels.py --out results/kernels.md        # needs CUDA; bitsandbytes optional

Anchors in the same run, same inputs: bf16 cuBLAS (F.linear), bitsandbytes NF4 (matmul_4bit, block 64), torch's
tinygemm int4 (_weight_int4pack_mm, group 128), and the naive LoRDS path (dequantize, then cuBLAS). Ours runs at the
parity rank for b = 64 and b = 128. Times are medians of triton.testing.do_bench; ratios are to bf16.
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from lords.codebooks import get_codebook
from lords.factorize import parity_rank
from lords.linear import LoRDSLinear
from lords.packing import pack_codes

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]  # (out N, in K)
MS = [1, 4, 16, 64, 256, 2048, 8192]


def random_layer(n, k, bits, rank, device) -> LoRDSLinear:
    layer = LoRDSLinear(k, n, bits, rank, device=device)
    with torch.no_grad():
        layer.codes.copy_(pack_codes(torch.randint(0, 2**bits, (n, k), device=device, dtype=torch.uint8), bits))
        layer.scale_b.copy_(torch.rand(n, rank, device=device) * 0.1 + 0.01)
        layer.scale_a.copy_(torch.rand(rank, k, device=device) * 0.1 + 0.01)
    return layer


def check_correctness(device) -> list[str]:
    """Fresh random inputs per case; relative error against a float64 reference of the same layer."""
    lines = ["| shape (N x K) | M | bits | codebook | rank | rel. error vs fp64 | finite |", "|---|---|---|---|---|---|---|"]
    for (n, k), m, bits, kind, rank in [
        ((4096, 4096), 1, 4, "nf", 32), ((1000, 1000), 7, 3, "nf", 13), ((14336, 4096), 64, 2, "int", 49),
        ((333, 520), 300, 4, "int", 1), ((4096, 14336), 16, 3, "nf", 49),
    ]:
        layer = random_layer(n, k, bits, rank, device)
        layer.codebook.copy_(get_codebook(kind, bits).to(device))
        layer.backend = "triton"
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        out = layer(x)
        reference = x.double() @ layer.dequantize(torch.float64).T
        error = ((out.double() - reference).norm() / reference.norm()).item()
        lines.append(f"| {n} x {k} | {m} | {bits} | {kind} | {rank} | {error:.2e} | {bool(torch.isfinite(out).all())} |")
    return lines


def int4_tinygemm(weight: torch.Tensor):
    """torch's tinygemm int4 path (as torchao/gpt-fast prepare it), group size 128, random codes."""
    n, k = weight.shape
    codes = torch.randint(0, 16, (n, k), device=weight.device, dtype=torch.int32)
    packed_uint8 = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_uint8, 8)
    scales_and_zeros = torch.rand(k // 128, n, 2, device=weight.device, dtype=torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, 128, scales_and_zeros)


def bnb_nf4(weight: torch.Tensor):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    qweight, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    return lambda x: bnb.matmul_4bit(x, qweight.t(), quant_state=state)


def copy_bandwidth(device) -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench(fn, x) -> float:
    return triton.testing.do_bench(lambda: fn(x), warmup=25, rep=100, return_mode="median") * 1e3  # microseconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="how many of SHAPES to time")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    started = time.perf_counter()
    report = [
        "# LoRDS fused forward vs bf16 cuBLAS, bitsandbytes NF4 and torch int4 (tinygemm)", "",
        "Produced by:", "", "    python benchmarks/kernels.py --out results/kernels.md", "",
        f"- date: {time.strftime('%Y-%m-%d')}; device: {torch.cuda.get_device_name()}; torch {torch.__version__}, "
        f"triton {triton.__version__}",
    ]
    bandwidth = copy_bandwidth(device)
    report += [f"- measured copy bandwidth (read + write): {bandwidth:.0f} GB/s", "", "## Correctness on the GPU", ""]
    report += check_correctness(device)
    plots = {}
    for n, k in SHAPES[: args.shapes]:
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        anchors = {"bf16": lambda x, w=weight: F.linear(x, w)}
        for name, make in (("bnb-nf4", bnb_nf4), ("int4-tinygemm", int4_tinygemm)):
            try:
                anchors[name] = make(weight)
            except Exception as error:  # an anchor that cannot run here is reported, not fatal
                report.append(f"- {name} unavailable for {n}x{k}: {type(error).__name__}: {error}")
        ours = {}
        for block in (64, 128):
            layer = random_layer(n, k, 4, parity_rank(n, k, block), device)
            layer.backend = "triton"
            ours[f"lords-b{block}"] = layer
        naive = random_layer(n, k, 4, parity_rank(n, k, 64), device)
        naive.backend = "torch"
        anchors["lords-naive"] = naive
        names = [*anchors, *ours]
        report += ["", f"## {n} x {k} (out x in), 4-bit, ranks {[l.rank for l in ours.values()]}", "",
                   "| M | " + " | ".join(f"{name} (us)" for name in names)
                   + " | b64 / bf16 | b64 / bnb | b64 / int4 | b64 GB/s (% of copy) |",
                   "|---" * (len(names) + 5) + "|"]
        for m in MS:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            times = {}
            for name, fn in {**anchors, **ours}.items():
                try:
                    with torch.no_grad():
                        times[name] = bench(fn, x)
                except Exception as error:
                    times[name] = float("nan")
                    report.append(f"<!-- {name} M={m}: {type(error).__name__}: {error} -->")
            ours_time = times["lords-b64"]
            layer = ours["lords-b64"]
            moved = layer.codes.numel() + 2 * layer.rank * (n + k) + 2 * m * (n + k)
            ratio = {name: ours_time / times[name] if name in times else float("nan") for name in ("bf16", "bnb-nf4", "int4-tinygemm")}
            report.append(
                f"| {m} | " + " | ".join(f"{times[name]:.1f}" for name in names)
                + f" | {ratio['bf16']:.2f} | {ratio['bnb-nf4']:.2f} | {ratio['int4-tinygemm']:.2f} | "
                f"{moved / (ours_time * 1e-6) / 1e9:.0f} ({100 * moved / (ours_time * 1e-6) / 1e9 / bandwidth:.0f}%) |"
            )
            for name in names:
                plots.setdefault((n, k), {}).setdefault(name, []).append(times[name])
        print("\n".join(report[-len(MS) - 4 :]), flush=True)
    report += ["", f"Total {time.perf_counter() - started:.0f} s."]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text)
        plot(plots, out.with_suffix(".png"))


def plot(plots, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(plots), figsize=(4.2 * len(plots), 3.8), squeeze=False)
    for axis, ((n, k), series) in zip(axes[0], plots.items()):
        for name, times in series.items():
            axis.plot(MS, times, marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"{n} x {k}")
        axis.set_xlabel("M (tokens)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("median latency (us)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
