"""The PTQ comparison: LoRDS against block-wise NF-k (= bitsandbytes), HQQ, refined block-wise scales and GPTQ.

Every method quantizes the same linears of the same model and is scored on the same held-out tokens. Baselines
are applied as fake quantization (their dequantized weights written back into nn.Linear), which gives the same
perplexity as their kernels would; bits per weight count every stored scale at its storage width.
"""

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..baselines.gptq import SCALE_BITS as GPTQ_SCALE_BITS
from ..baselines.gptq import gptq_blockwise_weight
from ..blockwise import dequantize_blockwise, quantize_blockwise
from ..codebooks import get_codebook
from ..config import LoRDSConfig
from ..factorize import blockwise_refine, relative_error
from ..model import LayerReport, quantize, walk_blocks


@dataclass
class Row:
    method: str
    bits: int | None
    bits_per_weight: float
    score: float  # held-out perplexity for LMs (lower is better); see run_comparison's caller otherwise
    weight_error: float  # mean over layers of ||W - W_hat|| / ||W||
    seconds: float  # quantization time, all layers


def _blockwise_group(names, linears, config, channel_weights, method: str, device):
    """Fake-quantize a stack of same-shaped linears with a block-wise method: 'rtn', 'refined', 'hqq' or 'gptq'
    (channel_weights then hold each layer's E[x x^T]: config.codes == "gptq")."""
    start = time.perf_counter()
    codebook = get_codebook(config.codebook, config.bits).to(device)
    weight = torch.stack([linear.weight.detach() for linear in linears]).to(device=device, dtype=torch.float32)
    if method == "rtn":
        codes, absmax = quantize_blockwise(weight, codebook, config.block_size)
        approx = dequantize_blockwise(codes, absmax, codebook, config.block_size)
        scale_bits = 32  # bitsandbytes keeps its absmax in fp32
    elif method == "refined":
        channels = None if channel_weights is None else torch.stack(channel_weights).to(device)
        codes, block_scale = blockwise_refine(weight, codebook, config.block_size, config.steps, config.lr, channels)
        approx = dequantize_blockwise(codes, block_scale.float(), codebook, config.block_size)
        scale_bits = 16
    elif method == "gptq":
        approx = gptq_blockwise_weight(weight, torch.stack(channel_weights).to(device), codebook, config.block_size)
        scale_bits = GPTQ_SCALE_BITS
    else:
        from hqq.core.quantize import Quantizer

        approx = torch.empty_like(weight)
        for i, one in enumerate(weight):
            codes, meta = Quantizer.quantize(
                one, nbits=config.bits, group_size=config.block_size, optimize=True, axis=1,
                device=str(device), compute_dtype=torch.float32, bitpack=False,
            )
            approx[i] = Quantizer.dequantize(codes, meta).reshape(one.shape)
        scale_bits = 32  # an fp16 scale and an fp16 zero point per group
    errors = relative_error(weight, approx)
    seconds = (time.perf_counter() - start) / len(linears)
    groups = -(-weight.shape[2] // config.block_size)  # per row; GPTQ's last group may be shorter
    results = []
    for i, (name, linear) in enumerate(zip(names, linears)):
        report = LayerReport(
            name, tuple(weight.shape[1:]), config.bits, None, config.bits + scale_bits * groups / weight.shape[2],
            float("nan"), errors[i].item(), errors[i].item(), seconds,
        )
        # the candidate is already a copy of the model, so the baseline's weights can go into its linears in place
        linear.weight.data = approx[i].to(device=linear.weight.device, dtype=linear.weight.dtype)
        results.append((linear, report))
    return results


def _summary(method, bits, reports, score) -> Row:
    numel = sum(r.shape[0] * r.shape[1] for r in reports)
    bpw = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in reports) / numel
    error = sum(r.weight_error for r in reports) / len(reports)
    return Row(method, bits, bpw, score, error, sum(r.seconds for r in reports))


GPTQ_GROUPS = {"gptq-g64": 64, "gptq-g128": 128}  # the GPTQ baseline's rows and their group sizes


def needs_calibration(method: str) -> bool:
    return method.endswith("-aware") or "gptq" in method


def run_method(
    model: nn.Module, method: str, bits: int, calibration: torch.Tensor | None, block_size: int = 64,
    steps: int = 500, lr: float = 0.1, codebook: str = "nf", refit_rounds: int = 0, device=None,
) -> list[LayerReport]:
    """Quantize `model` in place with one method of run_comparison; returns the layers' reports.

    lords-gptq: LoRDS scales with error-feedback codes (LoRDSConfig(codes="gptq"), refit_rounds rounds);
    gptq-g64, gptq-g128: the GPTQ baseline (lords.baselines.gptq) with absmax groups of that size."""
    if needs_calibration(method) and calibration is None:
        raise ValueError(f"method {method} needs calibration data")
    calib = calibration if needs_calibration(method) else None
    codes = "gptq" if "gptq" in method else "nearest"
    config = LoRDSConfig(bits=bits, block_size=GPTQ_GROUPS.get(method, block_size), codebook=codebook,
                         steps=0 if method == "lords-init" else steps, lr=lr, codes=codes,
                         refit_rounds=refit_rounds if method == "lords-gptq" else 0)
    if method.startswith("lords"):
        return quantize(model, config, calibration=calib, device=device, progress=False)
    kind = {"nf-rtn": "rtn", "hqq": "hqq", **dict.fromkeys(GPTQ_GROUPS, "gptq")}.get(method, "refined")
    group = partial(_blockwise_group, method=kind, device=device)
    return walk_blocks(model, config, group, calibration=calib, progress=False)


def run_comparison(
    model: nn.Module,
    score: Callable[[nn.Module], float],
    calibration: torch.Tensor | None,
    bits_list=(4, 3, 2),
    block_size: int = 64,
    steps: int = 500,
    lr: float = 0.1,
    methods=("nf-rtn", "hqq", "lords-init", "lords", "lords-aware", "nf-refined-aware"),
    device=None,
    log=print,
    codebooks=("nf",),
    refit_rounds: int = 0,
) -> list[Row]:
    """Quantize a fresh copy of `model` with each method at each bit width and score it (perplexity for an LM).

    Methods: nf-rtn, hqq, lords-init, lords, nf-refined, lords-gptq, gptq-g64, gptq-g128 (run_method); an "-aware"
    suffix uses `calibration` for the activation-aware objective, as the GPTQ methods always do. The LoRDS methods
    run once per codebook in `codebooks` (rows named e.g. "lords-aware-int" for any but nf); the block-wise
    baselines use NF."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = next(model.parameters()).dtype
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    rows = [Row(name, None, float(torch.finfo(dtype).bits), score(model), 0.0, 0.0)]
    log(f"{rows[0].method}: {rows[0].score:.4f}")
    runs = [(method, codebook) for method in methods
            for codebook in (codebooks if method.startswith("lords") else ("nf",))]
    for bits in bits_list:
        for method, codebook in runs:
            candidate = copy.deepcopy(model)
            reports = run_method(candidate, method, bits, calibration, block_size, steps, lr, codebook, refit_rounds,
                                 device)
            label = method if codebook == "nf" else f"{method}-{codebook}"
            row = _summary(label, bits, reports, score(candidate))
            rows.append(row)
            log(
                f"{label} {bits}-bit: {row.bits_per_weight:.3f} bpw, score {row.score:.4f}, "
                f"weight error {row.weight_error:.4f}, {row.seconds:.1f} s"
            )
            del candidate
    return rows


def format_rows(rows: list[Row], score_name: str = "perplexity") -> str:
    lines = [
        f"| method | bits | bits/weight | {score_name} | rel. weight error | quant. time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        bits = "-" if row.bits is None else row.bits
        lines.append(
            f"| {row.method} | {bits} | {row.bits_per_weight:.3f} | {row.score:.4f} | "
            f"{row.weight_error:.4f} | {row.seconds:.1f} |"
        )
    return "\n".join(lines)


def plot_rows(rows: list[Row], path, score_name: str = "held-out perplexity", log_scale: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(row.method for row in rows if row.bits is not None):
        points = sorted((r.bits_per_weight, r.score) for r in rows if r.method == method)
        axis.plot(*zip(*points), marker="o", label=method)
    reference = rows[0]
    axis.axhline(reference.score, color="gray", linestyle="--", label=f"{reference.method} ({reference.score:.4g})")
    axis.set_xlabel("bits per weight (scales included)")
    axis.set_ylabel(score_name)
    if log_scale:
        axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
