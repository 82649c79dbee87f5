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
    """Launch shapes to time besides the defaults: the wgmma build at 4 or 8 warps and 1-2x its default split, where
    the rank has a wgmma shape; the mma.sync build at 8 warps, 1, 2 or 4 row tiles where they fit, 1-2x the default
    split."""
    shapes = []
    rank_tiles = -(-rank // 8)
    if rank_tiles in gemv4.WGMMA_RANK_TILES:
        for warps in (4, 8):
            base = gemv4.config(out_features, in_features, rank, sms, warps=warps, wgmma=True)["splits"]
            shapes += [dict(warps=warps, splits=s, wgmma=True) for s in sorted({base, 2 * base})
                       if s <= in_features // gemv4.STEP_COLS]
    for row_tiles in (1, 2, 4):
        if rank_tiles * row_tiles > 16:
            continue
        base = gemv4.config(out_features, in_features, rank, sms, row_tiles=row_tiles)["splits"]
        shapes += [dict(warps=8, row_tiles=row_tiles, splits=s, wgmma=False)
                   for s in sorted({base, 2 * base}) if s <= in_features // gemv4.STEP_COLS]
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    started = time.perf_counter()
    sms = processors(device)
    gemv4.ENABLED = True  # opt-in in the library (lords.kernels.cuda); this benchmark is about it
    keys = set()  # every configuration a launch below uses, compiled in parallel
    for n, k in SHAPES:
        rank = parity_rank(n, k, 64)
        for shape in [{}, {"wgmma": True}, *sweep(n, k, rank, sms)]:
            launch = gemv4.config(n, k, rank, sms, **shape)
            if not launch["wgmma"] or launch["rank_tiles"] in gemv4.WGMMA_RANK_TILES:
                keys |= {(launch["rank_tiles"], launch["row_tiles"], table, launch["wgmma"]) for table in (False, True)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: gemv4.library(*key), keys))
    lines = produced_by("# The CUDA gemv4 kernel at one row", "benchmarks.cuda_gemv")
    lines += [f"- date: {time.strftime('%Y-%m-%d')}; device: {torch.cuda.get_device_name()}; torch {torch.__version__},"
              f" triton {triton.__version__}; 4 bits, rank at b = 64 parity; bf16; CUDA-graph medians (us); ratios "
              "are the method's time over bf16's (lower is faster)", "- lords Triton: what lords_matmul picks among "
              "the Triton kernels; CUDA mma / wgmma: gemv4's mma.sync and wgmma builds at their default launch "
              "(wgmma: where the rank has a wgmma shape); CUDA best: the fastest of those and the sweep "
              "(benchmarks.cuda_gemv.sweep), with its launch", "",
              "| shape (N x K) | rank | codebook | bf16 | tinygemm int4 | lords Triton | CUDA mma | CUDA wgmma | "
              "CUDA best (launch) | best / bf16 | best / tinygemm |", "|---|---|---|---|---|---|---|---|---|---|---|"]
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
            triton_us = bench(lambda x: lords_matmul(x, packed, codebook, scale_b, scale_a, 4), x)
            cuda_us = bench(lambda x: gemv4.gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4, wgmma=False), x)
            timed = [(cuda_us, "mma default")]
            wgmma_us = None
            if -(-rank // 8) in gemv4.WGMMA_RANK_TILES:
                wgmma_us = bench(lambda x: gemv4.gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4, wgmma=True), x)
                timed.append((wgmma_us, "wgmma default"))
            for shape in (sweep(n, k, rank, sms) if n * k <= 4096 * 14336 else []):
                timed.append((bench(lambda x: gemv4.gemv4_matmul(x, packed, codebook, scale_b, scale_a, 4, **shape),
                                    x), "w{warps} s{splits}".format(**shape) + (" wgmma" if shape["wgmma"] else
                                                                                " r{row_tiles}".format(**shape))))
            best, launch = min(timed)
            rows.append(dict(shape=f"{n}x{k}", rank=rank, codebook=kind, bf16=bf16, tinygemm=tinygemm,
                             lords_triton=triton_us, cuda_mma=cuda_us, cuda_wgmma=wgmma_us, cuda_best=best,
                             cuda_best_launch=launch))
            wgmma_text = "-" if wgmma_us is None else f"{wgmma_us:.1f}"
            lines.append(f"| {n} x {k} | {rank} | {kind} | {bf16:.1f} | {tinygemm:.1f} | {triton_us:.1f} | "
                         f"{cuda_us:.1f} | {wgmma_text} | {best:.1f} ({launch}) | {best / bf16:.2f} | "
                         f"{best / tinygemm:.2f} |")
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
