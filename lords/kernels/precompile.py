"""Compiling the LoRDS kernels ahead of their first use, in parallel processes.

Autotuning compiles each config of a kernel the first time a shape meets it, one after another, inside the first
forward. `precompile` compiles every config those calls will need into Triton's on-disk cache first, in one process
per CPU core, so that autotuning only times them.
"""

import multiprocessing
import os
import time

import torch

from ..packing import row_bytes
from . import KERNELS, candidates
from .autotune import compile_only
from .codes import rank_pad
from .forward import dequantize, m_bucket

WORKERS = min(16, os.cpu_count() or 1)


def layer_launches(out_features, in_features, rank, bits, codebook, rows, dtype, scale_dtype, bias) -> list[tuple]:
    """The kernel launches lords_matmul may make for one layer (codes of an (N, K) weight, rank, bits, codebook
    levels, B and A in scale_dtype, bias or not) at each row count, with activations in dtype. The codebook's dtype
    is part of it: on the GPU the kernels take the codebook tensor as it is (level_lookup)."""
    levels = (tuple(codebook.tolist()), codebook.dtype)
    return [(name, out_features, in_features, m, bits, rank, levels, dtype, scale_dtype, bias)
            for m in rows for name in candidates(m, rank)]


def compile_launches(launches, device="cuda") -> None:
    """Run each launch under compile_only, on zero tensors of its shapes and dtypes."""
    for name, n, k, m, bits, rank, levels, dtype, scale_dtype, bias in launches:
        codes = torch.zeros(n, row_bytes(k, bits), dtype=torch.uint8, device=device)
        codebook = torch.tensor(levels[0], dtype=levels[1], device=device)
        scale_b = torch.zeros(n, rank, dtype=scale_dtype, device=device)
        scale_a = torch.zeros(rank, k, dtype=scale_dtype, device=device)
        x = torch.zeros(m, k, dtype=dtype, device=device)
        with compile_only(), torch.no_grad():
            if name == "dequant":  # only the dequantize pass is Triton; the cuBLAS GEMM after it needs no compiling
                dequantize(codes, codebook, scale_b, scale_a, bits, dtype)
            else:
                KERNELS[name](x, codes, codebook, scale_b, scale_a, bits,
                              torch.zeros(n, dtype=dtype, device=device) if bias else None)


def precompile(launches, workers: int | None = None) -> float:
    """Compile every autotune config of these launches (layer_launches) into Triton's disk cache, in `workers`
    processes (default WORKERS: one per CPU core, at most 16). Launches that look like one Triton specialisation (same
    kernel, rank padding and divisibility) go to one worker in turn, so that the second finds the first's binary.
    Nothing to do without CUDA: the CPU interpreter compiles nothing. Returns the seconds taken.

    The workers are spawned (a forked child cannot use CUDA once the parent has), so a script that calls this must do
    so under `if __name__ == "__main__":`, as for any spawned pool."""
    started = time.perf_counter()
    if not torch.cuda.is_available():
        return 0.0
    groups = {}
    for launch in dict.fromkeys(launches):
        name, n, k, m, bits, rank, levels, dtype, scale_dtype, bias = launch
        rows = (m if name in ("decode", "decode-xa") else (m == 1, m % 16 == 0, m_bucket(m) % 16 == 0)
                if name == "tiled" else None)
        specialisation = (name, rows, bits, rank_pad(rank), rank % 16 == 0, rank == 1, n % 16 == 0, k % 256 == 0,
                          levels, dtype, scale_dtype, bias)
        groups.setdefault(specialisation, []).append(launch)
    with multiprocessing.get_context("spawn").Pool(workers or WORKERS) as pool:
        pool.map(compile_launches, sorted(groups.values(), key=len, reverse=True), chunksize=1)
    return time.perf_counter() - started
