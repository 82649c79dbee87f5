"""Compiling the LoRDS kernels ahead of their first use, in parallel processes.

Autotuning compiles each config of a kernel the first time a shape meets it, one after another, inside the first
forward. `precompile` compiles every config those calls will need into Triton's on-disk cache first, in one process
per CPU core, so that autotuning only times them.
"""

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

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


def precompile(launches, workers: int | None = None, device: str = "cuda") -> float:
    """Compile every autotune config of these launches (layer_launches) into Triton's disk cache, in `workers`
    processes (default WORKERS: one per CPU core, at most 16). Launches that look like one Triton specialisation (same
    kernel, rank padding and divisibility) go to one worker in turn, so that the second finds the first's binary.
    Nothing to do without CUDA: the CPU interpreter compiles nothing (device="cpu" runs the workers anyway, for the
    tests). Returns the seconds taken.

    The workers are fresh interpreters (`python -m lords.kernels.precompile`, the launches on their stdin), not a
    multiprocessing pool: a spawned pool re-runs the caller's script in every worker, which without an
    `if __name__ == "__main__":` guard starts pools of its own and never finishes."""
    started = time.perf_counter()
    if device == "cuda" and not torch.cuda.is_available():
        return 0.0
    groups = {}
    for launch in dict.fromkeys(launches):
        name, n, k, m, bits, rank, levels, dtype, scale_dtype, bias = launch
        rows = (m if name in ("decode", "decode-xa") else (m == 1, m % 16 == 0, m_bucket(m) % 16 == 0)
                if name == "tiled" else None)
        specialisation = (name, rows, bits, rank_pad(rank), rank % 16 == 0, rank == 1, n % 16 == 0, k % 256 == 0,
                          levels, dtype, scale_dtype, bias)
        groups.setdefault(specialisation, []).append(launch)
    # the largest groups first, each to the worker with the fewest launches so far
    shares = [[] for _ in range(min(workers or WORKERS, len(groups)))]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(shares, key=lambda share: sum(map(len, share))).append(group)
    package_root = str(Path(__file__).resolve().parents[2])  # lords importable from a source checkout too
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                            os.environ.get("PYTHONPATH")]))}
    processes = [subprocess.Popen([sys.executable, "-m", "lords.kernels.precompile"], stdin=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=environment) for _ in shares]
    for process, share in zip(processes, shares):
        process.stdin.write(pickle.dumps((share, device)))
        process.stdin.close()
    failures = [process.stderr.read().decode().strip().splitlines() for process in processes]
    for process, errors in zip(processes, failures):
        if process.wait() != 0:
            raise RuntimeError(f"precompiling the LoRDS kernels failed in a worker process: "
                               f"{errors[-1] if errors else f'exit code {process.returncode}'}")
    return time.perf_counter() - started


def _worker() -> None:
    share, device = pickle.load(sys.stdin.buffer)
    for group in share:
        compile_launches(group, device)


if __name__ == "__main__":
    _worker()
