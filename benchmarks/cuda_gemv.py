"""The CUDA gemv4 kernel (lords/kernels/cuda) at one row, against bf16 cuBLAS, torch's tinygemm int4 and the Triton
kernels lords_matmul picks, all in one process on the same shapes (Llama-3-8B and 70B layers, 4 bits, the b = 64
parity rank), CUDA-graph medians. The kernel's default launch and the best of a small sweep of launch shapes.

    python -m benchmarks.cuda_gemv --out results/cuda_gemv.md      # also writes results/cuda_gemv.json
"""

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from lords.codebooks import get_codebook
from lords.factorize import parity_rank
from lords.kernels import cuda as gemv4, lords_matmul
from lords.kernels.autotune import processors
from lords.packing import pack_codes

from .kernels import bench, int4_tinygemm
from .tables import elapsed, finish_report, produced_by

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (28672, 8192)]


def sweep(out_features, in_features, rank, sms) -> list[dict]:
    """Launch shapes to time besides the default: 4 or 8 warps a block, 1-3x the default split."""
    shapes = []
    for warps in (4, 8):
        base = gemv4.config(out_features, in_features, rank, sms, warps=warps)["splits"]
        shapes += [dict(warps=warps, splits=s) for s in sorted({base, 2 * base, 3 * base})
                   if s <= in_features // gemv4.STEP_COLS]
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    started = time.perf_counter()
    sms = processors(device)
    gemv4.ENABLED = True  # whatever LORDS_CUDA says: this benchmark is about it
    keys = {(-(-parity_rank(n, k, 64) // 8), table) for n, k in SHAPES for table in (False, True)}
    with ThreadPoolExecutor(16) as pool:  # every configuration used below, compiled in parallel
        list(pool.map(lambda key: gemv4.library(*key), keys))
    lines = produced_by("# The CUDA gemv4 kernel at one row", "benchmarks.cuda_gemv")
    lines += [f"- date: {time.strftime('%Y-%m-%d')}; device: {torch.cuda.get_device_name()}; torch {torch.__version__},"
              f" triton {triton.__version__}; 4 bits, rank at b = 64 parity; bf16; CUDA-graph medians (us); ratios "
              "are the method's time over bf16's (lower is faster)", "- lords Triton: what lords_matmul picks among "
              "the Triton kernels; lords CUDA: gemv4 (wgmma) at its default launch; CUDA best: the fastest of the "
              "sweep (benchmarks.cuda_gemv.sweep), with its launch", "",
              "| shape (N x K) | rank | codebook | bf16 | tinygemm int4 | lords Triton | lords CUDA | CUDA best "
              "(launch) | CUDA / bf16 | CUDA / tinygemm |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for n, k in SHAPES:
        rank = parity_rank(n, k, 64)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        bf16 = bench(lambda x: F.linear(x, weight), x)
        tinygemm = bench(int4_tinygemm(weight), x)
        del weight
        packed = pack_codes(torch.randint(0, 16, (n, k), device=device, dtype=torch.uint8), 4)
        scale_b = (torch.rand(n, rank, device=device) * 0.1 + 0.01).bfloat16()
        scale_a = (torch.rand(rank, k, device=device) * 0.1 + 0.01).bfloat16()
        for kind in ("int", "nf"):
            codebook = get_codebook(kind, 4).to(device)
            gemv4.ENABLED = False  # lords_matmul among the Triton kernels alone
            triton_us = bench(lambda x: lords_matmul(x, packed, codebook, scale_b, scale_a, 4), x)
            gemv4.ENABLED = True
            cuda_us = bench(lambda x: gemv4.gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4), x)
            timed = [(cuda_us, "default")]
            for shape in sweep(n, k, rank, sms):
                timed.append((bench(lambda x: gemv4.gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4, **shape),
                                    x), "w{warps} s{splits}".format(**shape)))
            best, launch = min(timed)
            rows.append(dict(shape=f"{n}x{k}", rank=rank, codebook=kind, bf16=bf16, tinygemm=tinygemm,
                             lords_triton=triton_us, lords_cuda=cuda_us, cuda_best=best, cuda_best_launch=launch))
            lines.append(f"| {n} x {k} | {rank} | {kind} | {bf16:.1f} | {tinygemm:.1f} | {triton_us:.1f} | "
                         f"{cuda_us:.1f} | {best:.1f} ({launch}) | {cuda_us / bf16:.2f} | {cuda_us / tinygemm:.2f} |")
            print(lines[-1], flush=True)
            finish_report([*lines, "", elapsed(time.perf_counter() - started, False)], args.out, done=False)
    lines += ["", elapsed(time.perf_counter() - started, True)]
    finish_report(lines, args.out)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
             "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
