"""Check lords' GPTQ baseline against llm-compressor's GPTQ on a tiny case with a known answer.

llm-compressor (a maintained GPTQ implementation) cannot run the model-level comparison here (it drives its own
calibration pipeline and has no NF levels), but its core, quantize_weight, takes a weight, a Hessian and the group
scales. Given the same static absmax groups and symmetric INT levels, lords.baselines.gptq must return the same
dequantized weights. It runs in a separate virtual environment, so that llm-compressor's pinned transformers never
reaches the project's:

    python -m venv --system-site-packages /tmp/gptqref && /tmp/gptqref/bin/pip install llmcompressor
    /tmp/gptqref/bin/python -m benchmarks.gptq_reference --out results/gptq_reference_tiny.md
"""

import argparse
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from lords.baselines.gptq import gptq_blockwise_weight
from lords.blockwise import block_absmax, expand_blocks
from lords.codebooks import int_codebook
from lords.factorize import assign_codes, reconstruct
from lords.gptq import output_error


def correlated_case(out_features: int, in_features: int, tokens: int, seed: int):
    """A weight and H = X^T X / N for inputs with correlated, unequally active channels (as in a transformer)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    gains = torch.rand(in_features, generator=generator) * 3 + 0.1
    inputs = torch.randn(tokens, in_features, generator=generator) @ (torch.eye(in_features) + mixing) * gains
    return weight, inputs.T @ inputs / tokens


def reference(weight, hessian, bits: int, group_size: int) -> torch.Tensor:
    """llm-compressor's GPTQ with symmetric INT levels in static groups whose scales are lords' fp16 absmax / qmax."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size,
                            actorder="static")
    scale = block_absmax(weight, group_size).to(torch.float16).float() / (2 ** (bits - 1) - 1)
    quantized, _, fallback = quantize_weight(weight[None].clone(), hessian[None].clone(), scale[None],
                                             torch.zeros_like(scale[None], dtype=torch.int8), None, args,
                                             blocksize=128, percdamp=0.01)
    assert not fallback.any()
    return quantized[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="markdown file to write")
    args = parser.parse_args()
    weight, hessian = correlated_case(96, 512, 2048, seed=0)
    rows = []
    for bits in (4, 3, 2):
        for group_size in (64, 128):
            codebook = int_codebook(bits)
            ours = gptq_blockwise_weight(weight, hessian, codebook, group_size)
            theirs = reference(weight, hessian, bits, group_size)
            scale = expand_blocks(block_absmax(weight, group_size).to(torch.float16).float(), group_size)
            nearest = reconstruct(scale, assign_codes(weight, scale, codebook), codebook)
            same = (ours - theirs).abs() <= 1e-6 * weight.abs().max()
            errors = [output_error(weight, approx, hessian).item() for approx in (theirs, ours, nearest)]
            rows.append(f"| {bits} | {group_size} | {same.float().mean().item():.6f} | "
                        f"{(ours - theirs).abs().max().item():.2e} | " + " | ".join(f"{e:.5f}" for e in errors) + " |")
    lines = [
        "# lords' GPTQ baseline vs llm-compressor's GPTQ (tiny case)", "", "Produced by:", "",
        "    /tmp/gptqref/bin/python -m benchmarks.gptq_reference --out results/gptq_reference_tiny.md", "",
        f"- date: {time.strftime('%Y-%m-%d')}; device: cpu; torch {torch.__version__}, llmcompressor "
        f"{version('llmcompressor')}, compressed-tensors {version('compressed-tensors')} (in a separate venv)",
        "- case: a 96 x 512 weight (N(0, 0.02^2)), H = X^T X / N from 2048 inputs with correlated channels of unequal "
        "gains; symmetric INT levels, static absmax groups (fp16), act-order, damping 0.01, blocks of 128 columns",
        "- same: share of dequantized weights equal within 1e-6 of max |w|; output error sqrt(tr(E H E^T) / "
        "tr(W H W^T))", "",
        "| bits | group | same | max abs diff | output error llm-compressor | output error lords | nearest rounding |",
        "|---|---|---|---|---|---|---|", *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
