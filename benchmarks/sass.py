"""What the LoRDS kernels compile to on an H100, read on any machine: sm_90a SASS, no GPU needed.

    python -m benchmarks.sass --out results/kernels_sass.md

Each wrapper (decode_matmul, tiled_matmul, dequantize) is called on CPU tensors of a real layer shape with Triton's
launch replaced by a recorder, so that each kernel is compiled ahead of time (triton.compile, target sm_90a) with
exactly the arguments and the compile-time values its launch would have had, for every autotune config that
survives pruning. Integer arguments are specialised as Triton's launcher does (1 becomes a constant, multiples of 16
are marked divisible by 16). Per config it reports registers, the stack (spills), shared memory, and for the
kernel's main loop (its largest backward branch) the SASS instructions per thread, the weights one thread handles
per iteration, their ratio, and the tensor-core instructions (HGMMA) and global loads in it.

Instructions per weight is a count, not a time: how much issue work decoding costs the SMs per weight. That work is
a large part of the decode kernel's time (on the GPU, replacing the codebook gather by a register lookup took the
14336 x 4096 decode from 97 to 54 us), but times come only from the GPU.
"""

import argparse
import collections
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from lords.codebooks import get_codebook
from lords.factorize import parity_rank
from lords.kernels import codes as kernel_codes
from lords.kernels import decode, forward
from lords.packing import SEGMENTS, row_bytes

from .tables import finish_report

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # an H100 block's shared memory; a config over it fails to launch and autotuning skips it
# An H100 SXM issues at most one warp instruction per cycle on each of its 132 SMs' 4 schedulers, at up to 1.98 GHz:
# a lower bound on the time of N * K weights at a given instruction count per weight.
ISSUE_PER_SECOND = 132 * 4 * 32 * 1.98e9
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
                 torch.int32: "*i32"}


@contextmanager
def recorded_launches():
    """Within the block, kernel[grid](...) records (kernel, args, kwargs) instead of launching."""
    launches = []
    saved = JITFunction.run, Autotuner.run, kernel_codes.INTERPRET

    def record(self, *args, grid=None, warmup=False, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run, Autotuner.run, kernel_codes.INTERPRET = record, record, False
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run, kernel_codes.INTERPRET = saved


def specialise(fn: JITFunction, args, kwargs) -> tuple[dict, dict, dict]:
    """Signature, constants and divisibility attributes of one launch, as Triton's launcher derives them."""
    values = dict(zip(fn.arg_names, args)) | kwargs
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, int) and param.do_not_specialize:
            signature[param.name] = "i32"
        elif isinstance(value, int) and value == 1:
            signature[param.name], constants[param.name] = "constexpr", 1
        else:
            signature[param.name] = "i32" if isinstance(value, int) else "fp32"
            if isinstance(value, int) and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def compile_launch(kernel: Autotuner, args, kwargs):
    """(config, compiled kernel) for every config the autotuned launch would consider, in the autotuner's order; a
    config that compiles to a binary already listed (one differing only in a runtime argument, PER_SM) is skipped."""
    kernel.nargs = dict(zip(kernel.arg_names, args))  # what Autotuner.run sets before pruning
    seen = set()
    for config in kernel.prune_configs(kwargs):
        signature, constants, attrs = specialise(kernel.fn, args, kwargs | config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        binary = repr((sorted(signature.items()), sorted(constants.items()), sorted(attrs.items()), options))
        if binary in seen:
            continue
        seen.add(binary)
        source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constants, attrs=attrs)
        yield config, triton.compile(source, target=TARGET, options=options)


def binary(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass_of(cubin: bytes) -> tuple[list[tuple[int, str]], str]:
    """[(address, instruction)] and cuobjdump's resource usage line."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass, usage = (subprocess.run([binary("cuobjdump"), flag, file.name], capture_output=True, text=True,
                                      check=True).stdout for flag in ("--dump-sass", "--dump-resource-usage"))
    return [(int(address, 16), text) for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)], usage


def main_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The instructions of the largest innermost loop (from a branch target to its backward branch, holding no other
    loop: the stream-K kernels nest their step loop in a loop over tiles); all if there is none."""
    index_of = {address: index for index, (address, _) in enumerate(instructions)}
    loops = []
    for index, (address, text) in enumerate(instructions):
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index_of:
            loops.append((index_of[int(target.group(1), 16)], index))
    innermost = [(start, end) for start, end in loops
                 if not any(start <= inner_start and inner_end <= end and (inner_start, inner_end) != (start, end)
                            for inner_start, inner_end in loops)]
    start, end = max(innermost, key=lambda loop: loop[1] - loop[0], default=(0, len(instructions) - 1))
    return [text for _, text in instructions[start: end + 1]]


def sums_read_before_cleared(ttgir: str) -> str:
    """"yes" if a barrier separates a stream-K kernel's load of a shared tile's float32 sums from the store of zeros
    over them, "no" if not, "" for a kernel with no shared tiles. The compiler lays that load and that store out over
    the threads independently, and the zeros wait on no loaded value: with no barrier one thread can clear sums
    another has yet to read (the H100 gave a few wrong rows now and then)."""
    lines = ttgir.splitlines()
    # cacheModifier = cg (Triton 3.6) or cache_modifier = cg (3.9); gpu.barrier or ttg.barrier all
    load = next((i for i, line in enumerate(lines)
                 if "tt.load" in line and re.search(r"cache_?modifier = cg", line, re.IGNORECASE)), None)
    if load is None:
        return ""
    zeros = {line.split()[0] for line in lines if "arith.constant dense<0.000000e+00>" in line}
    clear = next(i for i in range(load, len(lines))
                 if "tt.store" in lines[i] and lines[i].split()[2].rstrip(",") in zeros)
    return "yes" if any(re.search(r"\b(gpu|ttg)\.barrier\b", line) for line in lines[load:clear]) else "no"


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def analyse(compiled, weights_per_step: int, threads: int) -> dict:
    instructions, usage = sass_of(compiled.asm["cubin"])
    loop = main_loop(instructions)
    counts = collections.Counter(opcode(text) for text in loop)
    registers = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    per_thread = weights_per_step / threads
    return {"registers": int(registers), "stack": int(stack), "shared": compiled.metadata.shared,
            "loop": len(loop), "weights": per_thread, "per_weight": len(loop) / per_thread,
            "hgmma": counts["HGMMA"], "loads": counts["LDG"] + counts["LDGSTS"],
            "top": ", ".join(f"{name} {count}" for name, count in counts.most_common(5)),
            "sums": sums_read_before_cleared(compiled.asm["ttgir"])}


def weights_per_step(meta: dict, bits: int) -> int:
    """Weights one program covers per iteration of its main loop (the dequantize kernel has none: its whole body):
    BLOCK_J byte columns (or BLOCK_W int32 words of 4 byte columns) of every segment."""
    columns = 4 * meta["BLOCK_W"] if "BLOCK_W" in meta else meta["BLOCK_J"]
    return meta["BLOCK_N"] * columns * SEGMENTS[bits]


CASES = [  # (what, N, K, rows, bits, activation dtype, codebook)
    ("decode", 14336, 4096, 1, 4, torch.bfloat16, "nf"), ("decode", 14336, 4096, 1, 4, torch.bfloat16, "int"),
    ("decode", 14336, 4096, 4, 4, torch.bfloat16, "nf"),
    ("decode-xa", 14336, 4096, 1, 4, torch.bfloat16, "nf"), ("decode-xa", 14336, 4096, 1, 4, torch.bfloat16, "int"),
    ("decode-xa", 14336, 4096, 2, 4, torch.bfloat16, "nf"),
    ("decode", 14336, 4096, 1, 3, torch.bfloat16, "nf"), ("decode", 14336, 4096, 1, 2, torch.bfloat16, "nf"),
    ("decode", 4096, 4096, 1, 4, torch.float16, "nf"),
    ("tiled", 14336, 4096, 16, 4, torch.bfloat16, "nf"), ("dequantize", 14336, 4096, 2048, 4, torch.bfloat16, "nf"),
]


def launches_of(what: str, n: int, k: int, rows: int, bits: int, dtype, kind: str) -> list:
    rank = parity_rank(n, k, 64)
    codes = torch.zeros(n, row_bytes(k, bits), dtype=torch.uint8)
    codebook = get_codebook(kind, bits)
    scale_b, scale_a = torch.ones(n, rank), torch.ones(rank, k)
    x = torch.zeros(rows, k, dtype=dtype)
    with recorded_launches() as launches:
        if what in ("decode", "decode-xa"):
            decode.decode_matmul(x, codes, codebook, scale_b, scale_a, bits, xa_once=what == "decode-xa")
        elif what == "tiled":
            forward.tiled_matmul(x, codes, codebook, scale_b, scale_a, bits)
        else:
            forward.dequantize(codes, codebook, scale_b, scale_a, bits, dtype)
    return launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="per kernel, stop at the first config that fits and does not spill (the CI check)")
    args = parser.parse_args()
    started = time.perf_counter()
    report = [
        "# What the LoRDS kernels compile to on an H100 (sm_90a SASS, compiled ahead of time, no GPU)", "",
        "Produced by:", "", "    python -m benchmarks.sass --out results/kernels_sass.md", "",
        f"- date: {time.strftime('%Y-%m-%d')}; target sm_90a; triton {triton.__version__}, torch {torch.__version__}",
        "- per autotune config that survives pruning (--quick: up to the first that fits and does not spill); fits: "
        "shared memory within an H100 block's 227 KB (a config over it is skipped by autotuning); loop: SASS "
        "instructions per thread in the main loop; weights: weights one thread handles per iteration; issue bound: "
        "the instructions of all N x K weights at one warp instruction per cycle per scheduler of an H100 SXM "
        "(132 SMs x 4, 1.98 GHz), a floor under the kernel's time that leaves out memory, tensor-core time and the "
        "work outside the loop; stack > 0 means register spills; sums read before cleared: a barrier between a "
        "shared tile's last read of its float32 sums and the zeros stored over them (stream-K kernels)", "",
        "| kernel | shape (N x K) | rows | bits | codebook | dtype | config | registers | stack (B) | shared (KB) "
        "| fits | loop instr. | weights / thread | instr. / weight | issue bound (us) | HGMMA | global loads "
        "| most frequent | sums read before cleared |",
        "|---" * 19 + "|",
    ]
    for what, n, k, rows, bits, dtype, kind in CASES:
        for kernel, launch_args, launch_kwargs in launches_of(what, n, k, rows, bits, dtype, kind):
            if not isinstance(kernel, Autotuner):  # a helper pass without configs, not a loop over the weights
                continue
            name = kernel.fn.__name__.strip("_") + (" (X*A once)" if launch_kwargs.get("XA_ONCE") else "")
            for config, compiled in compile_launch(kernel, launch_args, launch_kwargs):
                result = analyse(compiled, weights_per_step(config.kwargs, bits), 32 * config.num_warps)
                shown = " ".join(f"{key.removeprefix('BLOCK_')}={value}" for key, value in config.kwargs.items())
                report.append(
                    f"| {name} | {n} x {k} | {rows} | {bits} | {kind} | {str(dtype)[6:]} | {shown} "
                    f"w{config.num_warps} s{config.num_stages} | {result['registers']} | {result['stack']} | "
                    f"{result['shared'] / 1024:.0f} | {'yes' if result['shared'] <= SHARED_LIMIT else 'no'} | "
                    f"{result['loop']} | {result['weights']:.0f} | "
                    f"{result['per_weight']:.1f} | {result['per_weight'] * n * k / ISSUE_PER_SECOND * 1e6:.1f} | "
                    f"{result['hgmma']} | {result['loads']} | {result['top']} | {result['sums']} |")
                print(report[-1], flush=True)
                if args.quick and result["stack"] == 0 and result["shared"] <= SHARED_LIMIT:
                    break
    report += ["", f"Total {time.perf_counter() - started:.0f} s."]
    finish_report(report, args.out)


if __name__ == "__main__":
    main()
