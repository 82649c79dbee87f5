"""Every autotune config of the decode and tiled kernels on its own, on the GPU, called many times.

    python -m benchmarks.kernel_configs --out results/kernel_configs.md     # needs CUDA

lords_matmul runs the config autotuning picks, and the checks in benchmarks.kernels see only those. Here each config
runs alone at row counts that are and are not multiples of 16, `--calls` times on the same inputs, against a float64
reference: the worst relative error, how many calls were off by more than 1e-2, and whether the stream-K workspace was
left zero. Programs that share an output tile meet in that workspace (stream_k.py), so a missing barrier or fence
shows as a few calls off among many: a single call proves little.
"""

import argparse
import contextlib
import functools
import multiprocessing
import time

import torch
import triton
from triton.runtime.autotuner import Autotuner

from lords.factorize import parity_rank
from lords.kernels import XA_ONCE_MAX_ROWS, decode, forward
from lords.kernels.autotune import compile_only
from lords.kernels.decode import MAX_ROWS
from lords.kernels.stream_k import workspace_tensors
from lords.linear import LoRDSLinear

from .kernels import random_layer
from .tables import finish_report, produced_by

# (N, K, bits, codebook), parity rank at b = 64. The INT codebook decodes without a table: other code, other layouts.
CASES = [(14336, 4096, 4, "nf"), (4096, 14336, 4, "nf"), (14336, 4096, 3, "nf"), (14336, 4096, 2, "nf"),
         (14336, 4096, 4, "int"), (4096, 4096, 4, "nf"), (1024, 4096, 4, "nf"), (28672, 8192, 4, "nf")]
TILED_ROWS = (1, 2, 3, 4, 5, 7, 8, 12, 16, 24, 32)
DECODE_ROWS = tuple(range(1, MAX_ROWS + 1))
OFF = 1e-2


def kernels():
    """(name, autotuned launcher, call(x, layer), row counts) for each kernel form."""
    def decode_call(xa_once):
        return lambda x, layer: decode.decode_matmul(x, layer.codes, layer.codebook, layer.scale_b, layer.scale_a,
                                                     layer.bits, xa_once=xa_once)

    def tiled_call(x, layer):
        return forward.tiled_matmul(x, layer.codes, layer.codebook, layer.scale_b, layer.scale_a, layer.bits)

    return [("decode", decode._decode, decode_call(False), DECODE_ROWS),
            ("decode (X*A once)", decode._decode, decode_call(True), DECODE_ROWS[:XA_ONCE_MAX_ROWS]),
            ("tiled", forward._tiled, tiled_call, TILED_ROWS)]


@contextlib.contextmanager
def only(launcher, config):
    """Within it, the autotuned kernel has this one config and forgets what it tuned and launched before."""
    saved = launcher.autotuner.configs
    launcher.autotuner.configs = [config]
    launcher.autotuner.cache.clear()
    launcher.launches.clear()
    try:
        yield
    finally:
        launcher.autotuner.configs = saved
        launcher.autotuner.cache.clear()
        launcher.launches.clear()


def name_of(config) -> str:
    return (" ".join(f"{key.removeprefix('BLOCK_')}={value}" for key, value in config.kwargs.items())
            + f" w{config.num_warps} s{config.num_stages}")


def surviving(launcher, call, x, layer) -> list:
    """The configs autotuning would consider for this launch (after its early pruning), found without compiling."""
    kept = []

    def record(kwargs):
        kept.extend(Autotuner.prune_configs(launcher.autotuner, kwargs))
        return []

    launcher.autotuner.prune_configs = record
    try:
        with compile_only():
            call(x, layer)
    finally:
        del launcher.autotuner.prune_configs
    return kept


@functools.lru_cache(maxsize=1)
def empty_layer(case) -> LoRDSLinear:
    """A layer of the case's shapes and dtypes, values left at their initial zeros: what compiling needs (random
    codes take GBs of temporaries at 28672 x 8192, times 16 workers)."""
    n, k, bits, codebook = case
    return LoRDSLinear(k, n, bits, parity_rank(n, k, 64), codebook=codebook, device="cuda")


def runs(case) -> list[tuple]:
    """(kernel form index, row count, config) for every config of every form at every row count of one case."""
    return [(index, m, config) for index, (_, launcher, call, rows) in enumerate(kernels()) for m in rows
            for config in surviving(launcher, call, torch.zeros(m, case[1], device="cuda", dtype=torch.bfloat16),
                                    empty_layer(case))]


def compile_run(task) -> None:
    case, index, m, config = task
    _, launcher, call, _ = kernels()[index]
    with only(launcher, config), compile_only():
        call(torch.zeros(m, case[1], device="cuda", dtype=torch.bfloat16), empty_layer(case))


def check(call, layer, xs, references, calls) -> tuple[float, int, list[int]]:
    """Worst relative error over every row count and call, calls off by more than OFF, and the row counts they hit."""
    worst, off, off_rows = 0.0, 0, []
    for m, x in xs.items():
        errors = torch.stack([(call(x, layer).double() - references[m]).norm() / references[m].norm()
                              for _ in range(calls)])
        errors = torch.nan_to_num(errors, nan=float("inf"))
        worst = max(worst, errors.max().item())
        count = int((errors > OFF).sum())
        off += count
        if count:
            off_rows.append(m)
    return worst, off, off_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--calls", type=int, default=40, help="calls per config and row count")
    parser.add_argument("--cases", type=int, default=len(CASES), help="how many of CASES to run")
    parser.add_argument("--compile-workers", type=int, default=16)
    args = parser.parse_args()
    started = time.perf_counter()
    cases = CASES[: args.cases]
    todo = {case: runs(case) for case in cases}
    # One task per binary: PER_SM is not specialised on, and the tiled kernel's rows only on M = 1 and on M and its
    # bucket being multiples of 16 (2, 12 and 16 stand for the others).
    compiles = {}
    for case in cases:
        for index, m, config in todo[case]:
            if index < 2 or m in (1, 2, 12, 16):
                tile = {key: value for key, value in config.kwargs.items() if key != "PER_SM"}
                compiles.setdefault((case, index, m, str(tile), config.num_warps, config.num_stages),
                                    (case, index, m, config))
    with multiprocessing.get_context("spawn").Pool(args.compile_workers) as pool:
        pool.map(compile_run, sorted(compiles.values(), key=lambda task: cases.index(task[0])), chunksize=1)
    report = [
        *produced_by("# Each decode and tiled kernel config on its own, many calls (GPU)", "benchmarks.kernel_configs"),
        f"- date: {time.strftime('%Y-%m-%d')}; device: {torch.cuda.get_device_name()}; torch {torch.__version__}, "
        f"triton {triton.__version__}; compiled in {time.perf_counter() - started:.0f} s",
        f"- parity rank at b = 64, bf16 activations; per config {args.calls} calls at each row count (decode: "
        f"{', '.join(map(str, DECODE_ROWS))}, with X*A once up to {XA_ONCE_MAX_ROWS}; tiled: "
        f"{', '.join(map(str, TILED_ROWS))}), fresh inputs per row count; off: relative error against float64 above "
        f"{OFF:g}; PER_SM: programs per multiprocessor of the one-wave grid that shares tiles (0: one program per "
        "tile, nothing shared)",
        "", "| N x K | bits | codebook | kernel | config | worst rel. error | calls off | of | rows off | "
        "workspace left zero |",
        "|---" * 10 + "|",
    ]
    torch.manual_seed(0)
    for case in cases:
        n, k, bits, codebook = case
        layer = random_layer(n, k, bits, parity_rank(n, k, 64), "cuda", codebook)
        weight = layer.dequantize(torch.float64)
        for index, (name, launcher, call, rows) in enumerate(kernels()):
            xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in rows}
            references = {m: x.double() @ weight.T for m, x in xs.items()}
            for config in dict.fromkeys(config for i, _, config in todo[case] if i == index):
                checked = {m: xs[m] for i, m, c in todo[case] if i == index and c == config}
                with only(launcher, config):
                    try:
                        worst, off, off_rows = check(call, layer, checked, references, args.calls)
                    except Exception as error:  # more shared memory than a block has: autotuning skips it too
                        report.append(f"| {n} x {k} | {bits} | {codebook} | {name} | {name_of(config)} | "
                                      f"{type(error).__name__}: {str(error)[:80]} | | | | |")
                        print(report[-1], flush=True)
                        continue
                clean = all(bool((tensor == 0).all()) for tensor in workspace_tensors())
                report.append(f"| {n} x {k} | {bits} | {codebook} | {name} | {name_of(config)} | {worst:.1e} | {off} | "
                              f"{args.calls * len(checked)} | {', '.join(map(str, off_rows))} | {clean} |")
                print(report[-1], flush=True)
        del weight, layer
        torch.cuda.empty_cache()
    report += ["", f"Total {time.perf_counter() - started:.0f} s."]
    finish_report(report, args.out)


if __name__ == "__main__":
    main()
