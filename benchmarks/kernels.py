"""LoRDS kernels vs the anchors, on the GPU: correctness first, then median latency per (shape, M).

    python -m benchmarks.kernels --out results/kernels.md        # needs CUDA; bitsandbytes and gemlite optional

Anchors in the same run, same inputs: bf16 cuBLAS (F.linear), bitsandbytes NF4 (matmul_4bit, block 64), torch's
tinygemm int4 (_weight_int4pack_mm, group 128), gemlite A16W4 (group 64, bf16), and the naive LoRDS path (torch
dequantize, then cuBLAS). Ours, at the
parity rank for b = 64: each kernel on its own (decode for M <= 4, tiled up to M = 256, Triton dequantize + cuBLAS),
and `lords_matmul`, which picks the fastest of them per shape and is what LoRDSLinear runs on CUDA, also at b = 128;
3- and 2-bit (NF) and 4-bit with the INT codebook through lords_matmul at b = 64. Times are medians of replays of
CUDA graphs (triton.testing.do_bench_cudagraph), so that launch overhead counts for no method; ratios are
lords_matmul at b = 64 over the anchor. The same run writes the 4-bit times beside the table as JSON
(results/kernels.json: device, versions, date, and rows of n, k, m, method, us). `--anchors-only` times the anchors
and lords_matmul alone (NF and INT at b = 64, NF at b = 128), the table the kernel issue asks for.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from lords.codebooks import get_codebook
from lords.factorize import parity_rank
from lords.kernels import (MAX_ROWS, TILED_MAX_ROWS, decode_matmul, decode_xa_matmul, dequant_matmul, lords_matmul,
                           tiled_matmul)
from lords.kernels.precompile import WORKERS, layer_launches, precompile
from lords.kernels.stream_k import workspace_tensors
from lords.linear import LoRDSLinear
from lords.packing import pack_codes

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (28672, 8192)]  # (out N, in K)
MS = [1, 4, 16, 64, 256, 2048, 8192]
DECODE_MS = [1, 2, 4]
REPEATS = 20  # calls per correctness case
OTHER_WIDTH_MS = [1, 16, 2048]


# (shape, M, bits, codebook, rank, activation dtypes); M odd gets a bias. Few cases: every new (bits, rank, dtype)
# compiles each autotune config.
CORRECTNESS_CASES = [
    ((4096, 4096), 1, 4, "nf", 32, (torch.bfloat16, torch.float16)),
    ((1000, 1000), 3, 3, "int", 13, (torch.bfloat16,)),
    ((14336, 4096), 64, 2, "int", 49, (torch.bfloat16,)), ((1024, 4096), 2, 2, "nf", 99, (torch.bfloat16,)),
    ((333, 520), 300, 4, "int", 1, (torch.bfloat16,)),
]


def random_layer(n, k, bits, rank, device, codebook: str = "nf") -> LoRDSLinear:
    layer = LoRDSLinear(k, n, bits, rank, codebook=codebook, device=device)
    with torch.no_grad():
        layer.codes.copy_(pack_codes(torch.randint(0, 2**bits, (n, k), device=device, dtype=torch.uint8), bits))
        layer.scale_b.copy_(torch.rand(n, rank, device=device) * 0.1 + 0.01)
        layer.scale_a.copy_(torch.rand(rank, k, device=device) * 0.1 + 0.01)
    return layer


def kernel_fns(layer: LoRDSLinear, bias=None) -> dict:
    args = (layer.codes, layer.codebook, layer.scale_b, layer.scale_a, layer.bits)
    return {
        "decode": lambda x: decode_matmul(x, *args, bias),
        "decode-xa": lambda x: decode_xa_matmul(x, *args, bias),
        "tiled": lambda x: tiled_matmul(x, *args, bias),
        "dequant": lambda x: dequant_matmul(x, *args, bias),
        "lords": lambda x: lords_matmul(x, *args, bias),
    }


def timing_launches(shapes, rows, layers) -> list[tuple]:
    """The kernel launches lords_matmul makes for these shapes, row counts and (bits, block, codebook) layers, as
    random_layer builds them (bf16 scales) with bf16 activations."""
    return [launch for n, k in shapes for bits, block, kind in layers
            for launch in layer_launches(n, k, parity_rank(n, k, block), bits, get_codebook(kind, bits), rows,
                                         torch.bfloat16, torch.bfloat16, False)]


def correctness_launches() -> list[tuple]:
    return [launch for (n, k), m, bits, kind, rank, dtypes in CORRECTNESS_CASES for dtype in dtypes
            for launch in layer_launches(n, k, rank, bits, get_codebook(kind, bits), [m], dtype, torch.bfloat16,
                                         m % 2 == 1)]


def poison_allocator(device) -> None:
    """Fill free cached blocks with NaN so that an output element the kernel never writes shows up."""
    poison = torch.full((2**28,), float("nan"), device=device)
    del poison


def check_correctness(device) -> list[str]:
    """Fresh random inputs per case; every kernel, bf16 and fp16 activations, against a float64 reference."""
    lines = [f"| kernel | shape (N x K) | M | bits | codebook | rank | bias | dtype | rel. error vs fp64 (worst of "
             f"{REPEATS} calls) | all written | workspace left zero | rel. error, CUDA graph replays |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (n, k), m, bits, kind, rank, dtypes in CORRECTNESS_CASES:
        layer = random_layer(n, k, bits, rank, device)
        layer.codebook.copy_(get_codebook(kind, bits).to(device))
        bias = torch.randn(n, device=device) if m % 2 else None
        reference_weight = layer.dequantize(torch.float64)
        for dtype in dtypes:
            x = torch.randn(m, k, device=device, dtype=dtype)
            reference = x.double() @ reference_weight.T + (0 if bias is None else bias.double())
            for name, fn in kernel_fns(layer, None if bias is None else bias.to(dtype)).items():
                if name.startswith("decode") and m > MAX_ROWS:
                    continue
                poison_allocator(device)
                out = fn(x)
                written = bool(torch.isfinite(out).all())
                # the programs that share a tile meet in the workspace: a missed partial sum shows in some call
                error = max(((fn(x) if call else out).double() - reference).norm().item() / reference.norm().item()
                            for call in range(REPEATS))
                print(f"checked {name} {n}x{k} M={m} bits={bits} {dtype}", flush=True)
                clean = all(bool((t == 0).all()) for t in workspace_tensors())
                replayed = replay_error(fn, x, reference)
                lines.append(f"| {name} | {n} x {k} | {m} | {bits} | {kind} | {rank} | {bias is not None} | "
                             f"{str(dtype)[6:]} | {error:.2e} | {written} | {clean} | {replayed:.2e} |")
    return lines


def replay_error(fn, x, reference, replays: int = 3) -> float:
    """Worst relative error of fn(x) captured in a CUDA graph and replayed: the capture stream gets its own stream-K
    workspace, allocated inside the capture, and each replay must find it zeroed by the one before."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)
    errors = []
    for _ in range(replays):
        out.fill_(float("nan"))
        graph.replay()
        errors.append(((out.double() - reference).norm() / reference.norm()).item())
    return max(errors)


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


def gemlite_a16w4(weight: torch.Tensor):
    """gemlite's A16W4 (HQQ-style asymmetric int4, group 64, bf16 activations and output), as gemlite's own examples
    pack it."""
    from gemlite import DType, GemLiteLinear

    n, k = weight.shape
    group = 64
    groups = weight.float().reshape(n, k // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-6) / 15
    zero = -low / scale
    codes = (groups / scale + zero).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    layer = GemLiteLinear(4, group_size=group, in_features=k, out_features=n, input_dtype=DType.BF16,
                          output_dtype=DType.BF16)
    layer.pack(codes, scale.reshape(n, -1).to(torch.bfloat16), zero.reshape(n, -1).to(torch.bfloat16), None)
    return layer


# The JSON's method names (the kernel issue's) for the table's columns.
JSON_METHODS = {"bf16": "bf16", "bnb-nf4": "bnb_nf4", "int4-tinygemm": "tinygemm", "gemlite": "gemlite",
                "lords-b64": "lords_nf4", "lords-4bit-int-b64": "lords_int4", "lords-b128": "lords_nf4_b128"}


def copy_bandwidth(device) -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench(fn, x) -> float:
    """Median microseconds of GPU time. Replays of a captured CUDA graph, so that Python launch overhead (tens of us
    for a Triton launcher, more than a decode kernel itself) is not counted for any method; plain launches where a
    method cannot be captured."""
    fn(x)  # autotuning and lazy allocation happen outside the capture
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(lambda: fn(x), rep=30, return_mode="median") * 1e3
    except Exception:
        torch.cuda.synchronize()
        return triton.testing.do_bench(lambda: fn(x), warmup=10, rep=50, return_mode="median") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="how many of SHAPES to time")
    parser.add_argument("--skip", type=int, default=0, help="start at this index of SHAPES (a run cut short resumes)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the tables in --out")
    parser.add_argument("--compile-workers", type=int, default=WORKERS,
                        help="processes compiling the kernels before timing (0: compile while autotuning)")
    parser.add_argument("--ms", type=int, nargs="+", default=None, help="row counts to time (default: all)")
    parser.add_argument("--anchors-only", action="store_true",
                        help="time the anchors and lords_matmul only (no per-kernel columns, 3-/2-bit or naive)")
    parser.add_argument("--no-checks", action="store_true", help="skip the correctness section")
    args = parser.parse_args()
    if args.replot:
        plot(tables_from_markdown(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    device = torch.device("cuda")
    torch.manual_seed(0)
    started = time.perf_counter()
    shapes = SHAPES[args.skip : args.shapes]
    ms = args.ms or sorted({*MS, *DECODE_MS})
    other_width_ms = [m for m in OTHER_WIDTH_MS if m in ms] if not args.anchors_only else ms
    checks = not args.skip and not args.no_checks
    compiled = "kernels compiled while autotuning"
    if args.compile_workers:
        launches = timing_launches(shapes, ms, [(4, 64, "nf"), (4, 128, "nf")])
        widths = [(4, 64, "int")] if args.anchors_only else [(3, 64, "nf"), (2, 64, "nf"), (4, 64, "int")]
        launches += timing_launches(shapes, other_width_ms, widths)
        seconds = precompile(launches + (correctness_launches() if checks else []), args.compile_workers)
        compiled = f"kernels compiled beforehand by {args.compile_workers} processes in {seconds:.0f} s"
        print(compiled, flush=True)
    report = [
        "# LoRDS kernels vs bf16 cuBLAS, bitsandbytes NF4, torch int4 (tinygemm) and gemlite", "",
        "Produced by:", "", f"    python -m benchmarks.kernels {shlex.join(sys.argv[1:])}", "",
        f"- date: {time.strftime('%Y-%m-%d')}; device: {torch.cuda.get_device_name()}; torch {torch.__version__}, "
        f"triton {triton.__version__}; {compiled}",
        "- lords-b64/b128 and the 3-/2-bit and int rows: `lords_matmul`, what LoRDSLinear runs on CUDA: whichever of "
        "the decode kernel (X*A per tile or once per call), the tiled kernel, Triton dequantize + cuBLAS and, on "
        "Hopper at 4 bits, the CUDA kernels (gemv4 for one row, gemm4 for 2-128 rows) timed fastest for the shape at "
        "first use; decode-b64 (X*A per tile), tiled-b64 and dequant-b64: each kernel on its own",
    ]
    bandwidth = copy_bandwidth(device)
    report += [f"- measured copy bandwidth (read + write): {bandwidth:.0f} GB/s", "", "## Correctness on the GPU", ""]
    report += check_correctness(device) if checks else ["(not in this run: the GPU suite, results/gpu_tests.md)"]
    plots, json_rows = {}, []
    for n, k in shapes:
        weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        anchors = {"bf16": lambda x, w=weight: F.linear(x, w)}
        for name, make in (("bnb-nf4", bnb_nf4), ("int4-tinygemm", int4_tinygemm), ("gemlite", gemlite_a16w4)):
            try:
                anchors[name] = make(weight)
            except Exception as error:  # an anchor that cannot run here is reported, not fatal
                report.append(f"- {name} unavailable for {n}x{k}: {type(error).__name__}: {error}")
        layers = {(bits, block, kind): random_layer(n, k, bits, parity_rank(n, k, block), device, kind)
                  for bits, block, kind in ((4, 64, "nf"), (4, 128, "nf"), (3, 64, "nf"), (2, 64, "nf"),
                                            (4, 64, "int"))}
        kernels = kernel_fns(layers[4, 64, "nf"])
        ours = {"lords-b64": kernels["lords"], "lords-b128": kernel_fns(layers[4, 128, "nf"])["lords"]}
        if not args.anchors_only:
            naive = layers[4, 64, "nf"]
            anchors["lords-naive"] = lambda x, layer=naive: F.linear(x, layer.dequantize(x.dtype))
            ours = {"decode-b64": kernels["decode"], "tiled-b64": kernels["tiled"], "dequant-b64": kernels["dequant"],
                    **ours}
        other_widths = {f"lords-{bits}bit-{kind}-b64": kernel_fns(layers[bits, 64, kind])["lords"]
                        for bits, kind in ((4, "int"),) + (() if args.anchors_only else ((3, "nf"), (2, "nf")))}
        names = [*anchors, *ours]
        report += ["", f"## {n} x {k} (out x in), 4-bit, ranks {layers[4, 64, 'nf'].rank} (b64), "
                   f"{layers[4, 128, 'nf'].rank} (b128)",
                   "", "| M | " + " | ".join(f"{name} (us)" for name in names)
                   + " | b64 / bf16 | b64 / bnb | b64 / int4 | b64 GB/s (% of copy) |",
                   "|---" * (len(names) + 5) + "|"]
        widths = ["| M | bf16 (us) | " + " | ".join(f"{name} (us) | / bf16" for name in other_widths) + " |",
                  "|---" * (2 + 2 * len(other_widths)) + "|"]
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            times = {}
            timed = {**anchors, **ours, **(other_widths if m in other_width_ms else {})}
            for name, fn in timed.items():
                if (name == "decode-b64" and m not in DECODE_MS) or (name == "tiled-b64" and m > TILED_MAX_ROWS):
                    continue
                try:
                    with torch.no_grad():
                        times[name] = bench(fn, x)
                except Exception as error:  # reported in the table and printed, and the run goes on
                    report.append(f"<!-- {name} M={m}: {type(error).__name__}: {error} -->")
                    print(report[-1], flush=True)
            ours_time = times.get("lords-b64", float("nan"))
            layer = layers[4, 64, "nf"]
            moved = layer.codes.numel() + 2 * layer.rank * (n + k) + 2 * m * (n + k)
            ratio = {name: ours_time / times[name] if name in times else float("nan")
                     for name in ("bf16", "bnb-nf4", "int4-tinygemm")}
            report.append(
                f"| {m} | " + " | ".join(f"{times[name]:.1f}" if name in times else "" for name in names)
                + f" | {ratio['bf16']:.2f} | {ratio['bnb-nf4']:.2f} | {ratio['int4-tinygemm']:.2f} | "
                f"{moved / (ours_time * 1e-6) / 1e9:.0f} ({100 * moved / (ours_time * 1e-6) / 1e9 / bandwidth:.0f}%) |"
            )
            json_rows += [{"n": n, "k": k, "m": m, "method": JSON_METHODS[name], "us": round(time_us, 2)}
                          for name, time_us in times.items() if name in JSON_METHODS]
            if m in other_width_ms:
                widths.append(f"| {m} | {times['bf16']:.1f} | " + " | ".join(
                    f"{times[name]:.1f} | {times[name] / times['bf16']:.2f}" if name in times else " | "
                    for name in other_widths) + " |")
            for name in names:
                plots.setdefault((n, k), {}).setdefault(name, {})[m] = times.get(name)
        report += ["", f"Other widths, {n} x {k}, lords_matmul at b = 64:", "", *widths]
        print("\n".join(report[-len(ms) - 12 :]), flush=True)
        if args.out:  # after every shape, so that a run cut short still leaves its tables
            Path(args.out).write_text("\n".join(report) + "\n")
            write_json(Path(args.out).with_suffix(".json"), device, json_rows)
    report += ["", f"Total {time.perf_counter() - started:.0f} s."]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text(text)
        if plots:  # none with --shapes 0, the correctness checks alone
            plot(plots, out.with_suffix(".png"))


def write_json(path: Path, device, rows: list[dict]) -> None:
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows},
                               indent=1) + "\n")


def tables_from_markdown(text: str) -> dict:
    """{(N, K): {method: {M: microseconds}}} from the 4-bit latency tables this script writes."""
    plots, shape, names = {}, None, None
    for line in text.splitlines():
        if line.startswith("## ") and " x " in line and "4-bit" in line:
            n, k = line[3:].split(" (")[0].split(" x ")
            shape, names = (int(n), int(k)), None
        elif shape and line.startswith("| M |"):
            names = [cell.strip().removesuffix(" (us)") if "(us)" in cell else None
                     for cell in line.strip("|").split("|")[1:]]
        elif shape and names and line.startswith("| ") and line[2].isdigit():
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            for name, cell in zip(names, cells[1:]):
                if name:
                    plots.setdefault(shape, {}).setdefault(name, {})[int(cells[0])] = float(cell) if cell else None
        elif not line.startswith("|"):
            names = None if line.strip() else names
    return plots


def plot(plots, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(plots), figsize=(4.2 * len(plots), 3.8), squeeze=False)
    for axis, ((n, k), series) in zip(axes[0], plots.items()):
        for index, (name, times) in enumerate(series.items()):
            ms = [m for m, time_us in times.items() if time_us is not None]
            axis.plot(ms, [times[m] for m in ms], marker="o", label=name, color=plt.cm.tab20(index))
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
