"""End-to-end decode tokens/s and prefill time of a Llama-3-8B-shaped model with random weights (no download).

    python -m benchmarks.e2e --out results/kernels.md --append    # needs CUDA; bitsandbytes for the NF4 row

Every decoder linear is replaced in turn by bitsandbytes NF4 (Linear4bit, block 64) and by LoRDSLinear at 4 and 3
bits with the NF codebook and at 4 bits with the INT one (parity rank for b = 64, random codes and scales: speed
does not depend on the values). The embedding, norms, attention and the bf16 lm_head are shared by all rows.
Decode: one token per sequence against a static KV cache holding the prompt, the whole step captured in a CUDA
graph (eager where capture fails, marked so), median of replays; also, at batch 1, the same with the model's forward
under torch.compile (whole graph, inductor: it fuses the norms, RoPE and attention's small kernels; LoRDS layers stay
on their kernels as torch.ops.lords operators). Prefill: one eager forward over the prompt into a fresh static cache,
logits for the last token only. generate: transformers' `generate(cache_implementation="static")` at batch 1, greedy, 64
new tokens after the prompt (its prefill included), timed after one warm-up call, as a user of transformers runs it.
Beside the table (--out results/e2e.md) the same run writes results/e2e.json: rows of variant, batch, compiled and
tokens_per_s.
"""

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import transformers
from torch import nn
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from benchmarks.tables import elapsed, produced_by, write_table
from benchmarks.kernels import random_layer
from lords.factorize import parity_rank
from lords.kernels.precompile import WORKERS
from lords.model import precompile_kernels

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def replace_linears(model, make) -> None:
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in LINEARS:
                if hasattr(parent, name):
                    linear = getattr(parent, name)
                    setattr(parent, name, make(linear))
                    del linear
    torch.cuda.empty_cache()


def to_nf4(linear: nn.Linear) -> nn.Module:
    """bitsandbytes Linear4bit holding the linear's weight as NF4 (block 64, double-quantized absmax, as QLoRA)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=linear.weight.dtype, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                     blocksize=64).to(linear.weight.device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def to_lords(bits: int, codebook: str):
    def make(linear: nn.Linear) -> nn.Module:
        n, k = linear.out_features, linear.in_features
        return random_layer(n, k, bits, parity_rank(n, k, 64), linear.weight.device, codebook)

    return make


def prefill(model, batch: int, prompt: int):
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=prompt + 64)
    model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"),
          use_cache=True, logits_to_keep=1)
    return cache


@torch.no_grad()
def prefill_ms(model, batch: int, prompt: int, passes: int = 10) -> float:
    """Median of eager prefills, each timed by CUDA events around it (the host's launch queue included, as a user
    sees it)."""
    prefill(model, batch, prompt)  # warm-up: autotuning, allocator
    torch.cuda.synchronize()
    return median_ms(lambda: prefill(model, batch, prompt), passes)


@torch.no_grad()
def decode_ms(model, batch: int, prompt: int, forward=None, replays: int = 50) -> tuple[float, str, float]:
    """Median milliseconds of a decode step from a CUDA graph where it can be captured, how it ran, and the median
    of steps launched from Python (what a plain generate loop gets: the host's launch queue included). `forward`
    runs the step in place of the model's own (a compiled one)."""
    forward = forward or model
    cache = prefill(model, batch, prompt)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    position = torch.tensor([prompt], device="cuda")

    def step():
        # Some transformers versions keep the write position in the cache itself; pin it so every replay is the same.
        for layer in cache.layers:
            if hasattr(layer, "cumulative_length") and torch.is_tensor(layer.cumulative_length):
                layer.cumulative_length.fill_(prompt)
        return forward(input_ids=ids, past_key_values=cache, cache_position=position,
                       position_ids=position.view(1, 1).expand(batch, 1), use_cache=True).logits

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiling, autotuning and lazy allocations happen here, outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    run, mode = step, "eager"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run, mode = graph.replay, "CUDA graph"
    except Exception as error:  # reported in the table, not fatal
        traceback.print_exc()
        mode = f"eager ({type(error).__name__})"
        torch.cuda.synchronize()
    return median_ms(run, replays), mode, median_ms(step, replays)


def compiled_decode(model, prompt: int) -> dict:
    """Batch-1 decode with the forward under torch.compile (fullgraph, inductor's default mode), the step captured
    in a CUDA graph as decode_ms does, and the seconds the whole measurement took (nearly all of it compiling). A
    model that does not compile is reported in the mode column."""
    started = time.perf_counter()
    try:
        step, mode, _ = decode_ms(model, 1, prompt, torch.compile(model.forward, fullgraph=True, dynamic=False))
    except Exception as error:  # reported in the table, not fatal
        traceback.print_exc()
        return {"compiled decode b1 (tok/s)": None, "compiled mode": f"failed ({type(error).__name__})"}
    return {"compiled decode b1 (tok/s)": 1e3 / step, "compiled mode": mode,
            "compile (s)": time.perf_counter() - started}


@torch.no_grad()
def generate_tokens_per_s(model, prompt: int, new_tokens: int = 64) -> tuple[float, int]:
    """Tokens/s of transformers' generate with a static cache (whatever it compiles by default), batch 1, greedy,
    `new_tokens` forced (random weights would stop early at an end-of-text token), the second of two calls; and how
    many graphs inductor ran without CUDA graphs meanwhile (its mode is reduce-overhead: each skip leaves that graph
    to host-launched kernels; TORCH_LOGS=cudagraphs prints why)."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   cache_implementation="static", pad_token_id=0)
    skips = counters["inductor"]["cudagraph_skips"]
    model.generate(ids, **options)  # compiling, autotuning
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = model.generate(ids, **options)
    torch.cuda.synchronize()
    return (out.shape[1] - prompt) / (time.perf_counter() - started), counters["inductor"]["cudagraph_skips"] - skips


def median_ms(run, calls: int) -> float:
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[calls // 2]


LORDS = {"lords-4bit": (4, "nf"), "lords-3bit": (3, "nf"), "lords-4bit-int": (4, "int")}
VARIANTS = {"bf16": None, "bnb-nf4": to_nf4, **{name: to_lords(*layer) for name, layer in LORDS.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--append", action="store_true", help="append the section to --out (results/kernels.md)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--title", default="", help="added to the section title (e.g. 'run 2')")
    parser.add_argument("--compile-workers", type=int, default=WORKERS,
                        help="processes compiling the LoRDS kernels before timing (0: compile while autotuning)")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out) if args.out else None
    previous = out.read_text() + "\n" if args.append and out and out.exists() else ""  # kept above this run's section
    rows = {}
    for name in args.variants:
        make = VARIANTS[name]
        model = build_model(args.layers)
        try:
            if make is not None:
                replace_linears(model, make)
            if name in LORDS and args.compile_workers:  # the API a user would call before the first forward
                rows_per_call = [1, 16, args.prompt, 16 * args.prompt]
                seconds = precompile_kernels(model, rows_per_call, torch.bfloat16, args.compile_workers)
                print(f"{name}: kernels compiled in {seconds:.0f} s", flush=True)
            weights_gb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e9
            row = {"weights (GB)": weights_gb}
            for batch in (1, 16):
                step, mode, eager = decode_ms(model, batch, args.prompt)
                row[f"decode b{batch} (tok/s)"] = batch * 1e3 / step
                row[f"decode b{batch} mode"] = mode
                row[f"eager decode b{batch} (tok/s)"] = batch * 1e3 / eager
                row[f"prefill b{batch} (ms)"] = prefill_ms(model, batch, args.prompt)
            row.update(compiled_decode(model, args.prompt))
            try:
                row["generate static b1 (tok/s)"], skips = generate_tokens_per_s(model, args.prompt)
                row["compiled mode"] += f"; generate: {skips} cudagraph skips"
            except Exception as error:  # reported in the table, not fatal
                traceback.print_exc()
                row["generate static b1 (tok/s)"] = None
                row["compiled mode"] += f"; generate failed ({type(error).__name__})"
            rows[name] = row
            print(name, row, flush=True)
        except Exception as error:  # a variant that cannot run here is reported, not fatal
            rows[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
            traceback.print_exc()
        del model
        torch._dynamo.reset()  # drops the compiled graphs, which hold the model
        torch.cuda.empty_cache()
        write_report(args, rows, previous, time.perf_counter() - started, done=name == args.variants[-1])


def write_report(args, rows: dict, previous: str, seconds: float, done: bool) -> None:
    """Written after every variant, so that a run cut short still leaves its finished rows (marked as partial)."""
    report = [
        *produced_by(f"## End to end{', ' + args.title if args.title else ''}: Llama-3-8B shapes, random weights, "
                     + ", ".join(args.variants), "benchmarks.e2e"),
        f"- date: {time.strftime('%Y-%m-%d')}; device: {torch.cuda.get_device_name()}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {args.layers} decoder layers, prompt {args.prompt} tokens",
        "- lords rows: LoRDSLinear's CUDA path, lords.kernels.lords_matmul: per layer shape and batch, the fastest of "
        "the decode kernel (X*A per tile or once per call), the tiled kernel, Triton dequantize + cuBLAS and, for one "
        "row on Hopper, the CUDA wgmma kernel (lords.kernels.cuda), timed at first use",
        "- decode: median of 50 single-token steps at KV position = prompt, replayed from a CUDA graph (decode mode); "
        "eager decode: the same steps launched from Python, as a plain generate loop runs them (host time included); "
        "prefill: median of 10 eager passes",
        "- compiled decode b1: the model's forward under torch.compile (fullgraph, inductor default mode, "
        "dynamic=False), the step then captured in a CUDA graph as above; compile (s): wall time of that whole "
        "measurement, nearly all of it compiling",
        "- generate static b1: transformers' generate(cache_implementation=\"static\"), greedy, 64 new tokens after "
        "the prompt (prefill included), the second of two calls; whatever generate compiles by itself (the mode column "
        "counts the graphs it ran without CUDA graphs)", "",
        "| model | weights (GB) | decode b1 (tok/s) | vs bf16 | decode b16 (tok/s) | vs bf16 | eager decode b1 (tok/s) "
        "| vs bf16 | compiled decode b1 (tok/s) | vs bf16 | compile (s) | generate static b1 (tok/s) | vs bf16 "
        "| prefill b1 (ms) | vs bf16 | prefill b16 (ms) | vs bf16 | decode mode (b1 / b16 / compiled b1) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = rows.get("bf16", {})
    for name, row in rows.items():
        if "error" in row:
            report.append(f"| {name} | {row['error']} ||||||||||||||||")
            continue

        def ratio(key, row=row):
            return f"{row[key] / base[key]:.2f}" if row[key] and base.get(key) else "-"

        compiled = row["compiled decode b1 (tok/s)"]
        generated = row.get("generate static b1 (tok/s)")

        report.append(
            f"| {name} | {row['weights (GB)']:.2f} | {row['decode b1 (tok/s)']:.1f} | {ratio('decode b1 (tok/s)')} "
            f"| {row['decode b16 (tok/s)']:.1f} | {ratio('decode b16 (tok/s)')} | {row['eager decode b1 (tok/s)']:.1f} "
            f"| {ratio('eager decode b1 (tok/s)')} | {f'{compiled:.1f}' if compiled else '-'} "
            f"| {ratio('compiled decode b1 (tok/s)')} | {format(row['compile (s)'], '.0f') if compiled else '-'} "
            f"| {f'{generated:.1f}' if generated else '-'} | {ratio('generate static b1 (tok/s)')} "
            f"| {row['prefill b1 (ms)']:.1f} "
            f"| {ratio('prefill b1 (ms)')} | {row['prefill b16 (ms)']:.1f} | {ratio('prefill b16 (ms)')} "
            f"| {row['decode b1 mode']} / {row['decode b16 mode']} / {row['compiled mode']} |"
        )
    report += ["", elapsed(seconds, done) + "."]
    text = "\n".join(report) + "\n"
    if done:
        print(text)
    if args.out:
        write_table(args.out, previous + text)
        write_json(Path(args.out).with_suffix(".json"), rows)


def write_json(path: Path, rows: dict) -> None:
    """The issue's machine-readable form: tokens/s per variant, batch and whether the forward was compiled."""
    keys = [(1, False, "decode b1 (tok/s)"), (16, False, "decode b16 (tok/s)"),
            (1, True, "compiled decode b1 (tok/s)"), (1, True, "generate static b1 (tok/s)")]
    json_rows = [{"variant": name, "batch": batch, "compiled": compiled, "measure": key.split(" (")[0],
                  "tokens_per_s": round(row[key], 2)}
                 for name, row in rows.items() for batch, compiled, key in keys if row.get(key)]
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
                                "rows": json_rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
