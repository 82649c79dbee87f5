"""What the checkpoint digests cost (lords.integrity), as a markdown table.

    python -m benchmarks.integrity --gb 1 --hidden 512 --layers 8 --out results/integrity.md

- digest throughput: sha256 of tensors' bytes, the part of a save that the digests add;
- verification throughput: verify_file over a safetensors file of --gb GB (plain reads, sha256, the NaN/Inf check
  of floating tensors), the file first written by lords' writer (so it is in the page cache: the CPU cost, which is
  what the background thread adds beside transformers' own reads);
- lords.load of a real lords checkpoint (a random Llama of --hidden and --layers, quantized with the SVD init only)
  with verify=True and verify=False, median of --repeats loads each: what the overlap leaves of the cost.
The machine's load average is printed with the table: other jobs sharing the cores stretch every row alike.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.tables import finish_report, produced_by


def synthetic_specs(gigabytes: float) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensors of a 4-bit checkpoint's mix: 4096 x 2048 packed codes (uint8) and bf16 scales, to about gigabytes."""
    specs, total, index = {}, 0, 0
    while total < gigabytes * 1e9:
        specs[f"layers.{index}.codes"] = ((4096, 2048), torch.uint8)
        specs[f"layers.{index}.scale_b"] = ((4096, 64), torch.bfloat16)
        specs[f"layers.{index}.scale_a"] = ((64, 4096), torch.bfloat16)
        total += 4096 * 2048 + 2 * 4096 * 64 * 2
        index += 1
    return specs


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the synthetic file verified")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the checkpoint loaded")
    parser.add_argument("--layers", type=int, default=8, help="decoder blocks of the checkpoint loaded")
    parser.add_argument("--repeats", type=int, default=3, help="loads timed per setting (median)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    import lords
    from lords import integrity
    from lords.checkpoint import WEIGHTS_NAME, ShardedSafetensors

    rows = []
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        folder = Path(scratch)
        specs = synthetic_specs(args.gb)
        writer = ShardedSafetensors(folder, specs, "1000GB")
        generator = torch.Generator().manual_seed(0)
        tensors = {name: torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).view(dtype)
                   if dtype == torch.uint8 else torch.randn(shape, generator=generator).to(dtype)
                   for name, (shape, dtype) in specs.items()}
        data = [integrity.tensor_bytes(tensor) for tensor in tensors.values()]
        size = sum(len(chunk) for chunk in data)
        digest = seconds(lambda: [integrity.digest(chunk) for chunk in data])
        rows.append((f"sha256 of {size / 1e9:.2f} GB of tensors (save)", f"{digest:.2f} s",
                     f"{size / digest / 1e9:.2f}"))
        write = seconds(lambda: ([writer.write(name, tensor) for name, tensor in tensors.items()], writer.close()))
        rows.append((f"lords' writer, digests included, {size / 1e9:.2f} GB", f"{write:.2f} s",
                     f"{size / write / 1e9:.2f}"))
        del tensors, data
        verify = seconds(lambda: integrity.verify_file(folder / WEIGHTS_NAME))
        rows.append((f"verify_file of the {size / 1e9:.2f} GB file (page cache)", f"{verify:.2f} s",
                     f"{size / verify / 1e9:.2f}"))
        (folder / WEIGHTS_NAME).unlink()

        config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                             num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                             tie_word_embeddings=True)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        lords.quantize(model, lords.LoRDSConfig(bits=4, steps=0), device="cpu", progress=False)
        lords.save(model, folder / "ckpt")
        checkpoint = (folder / "ckpt" / WEIGHTS_NAME).stat().st_size
        parameters = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6
        times = {}
        for verify_flag in (False, True, False, True):  # interleaved, so that a change of load hits both alike
            times.setdefault(verify_flag, []).extend(
                seconds(lambda: lords.load(folder / "ckpt", verify=verify_flag)) for _ in range(args.repeats))
        for verify_flag in (False, True):
            median = statistics.median(times[verify_flag])
            rows.append((f"lords.load of a {parameters:.0f}M-parameter 4-bit checkpoint ({checkpoint / 1e6:.0f} MB), "
                         f"verify={verify_flag}", f"{median:.2f} s", f"{checkpoint / median / 1e9:.2f}"))
        overhead = statistics.median(times[True]) / statistics.median(times[False]) - 1

    lines = produced_by("# Integrity digests: what they cost (CPU)", "benchmarks.integrity")
    lines += [f"- date: {time.strftime('%Y-%m-%d')}; device: cpu ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}); torch {torch.__version__}, "
              f"transformers {transformers.__version__}", "",
              "| step | time | GB/s |", "|---|---|---|"]
    lines += [f"| {step} | {time_} | {rate} |" for step, time_, rate in rows]
    lines += ["", f"verify=True costs {overhead * 100:+.0f}% of the load time here (median of "
              f"{2 * args.repeats} loads each)."]
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
