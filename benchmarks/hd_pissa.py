"""HD-PiSSA vs data-parallel LoRA vs PiSSA (peft) vs LoRDS-PEFT on the default model.

    python -m benchmarks.hd_pissa --out results/hd_pissa.md     # GPU; HD-PiSSA runs K virtual slices in one process

Same training windows, steps, global batch and learning rate for every method; trainable floats per device as equal as
the methods allow (LoRA/PiSSA take the LoRDS rank of each module; HD-PiSSA one rank per slice for all modules). On one
GPU, K devices are emulated: HD-PiSSA's K slices take turns on K chunks of each batch (tested equal to K gloo
processes), and data-parallel LoRA is LoRA on the whole batch (what K replicas with averaged gradients compute).
Communication per step is counted, not measured: values each device sends.
"""

import argparse
import copy
import time
from pathlib import Path

import torch

from benchmarks.tables import elapsed, finish_report, produced_by
from benchmarks.finetune import (add_workload_arguments, decoder_linears, effective_rank, lora, lora_delta, lords_ranks,
                                 prepare, timed_finetune, workload)
from lords.assets import calibration_tokens, default_model_path, heldout_tokens, load_pretrained
from lords.hd_pissa import hd_pissa_finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--slices", type=int, default=4, help="K devices emulated")
    parser.add_argument("--rank", type=int, default=5, help="HD-PiSSA rank per slice")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--ptq-steps", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=40_000)
    parser.add_argument("--layer", default="model.layers.10.mlp.down_proj")
    add_workload_arguments(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    path = Path(args.model) if args.model else default_model_path()
    dense, tokenizer = load_pretrained(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    heldout = heldout_tokens(tokenizer, args.max_tokens)
    calibration = calibration_tokens(tokenizer, 64, 512)
    train_tokens, score, metric, training = workload(args, tokenizer, heldout)
    ranks = lords_ranks(dense, args.block_size)
    linears = decoder_linears(dense)
    lora_values = sum(ranks[name.rsplit(".", 1)[-1]] * (m.in_features + m.out_features) for name, m in linears.items())
    rows = []

    dense_values = sum(m.in_features * m.out_features for m in linears.values())

    def record(method, model, floats, sent, seconds, delta):
        rows.append((method, floats, score(model), sent, seconds, effective_rank(delta)))
        print(rows[-1], flush=True)
        report(args, path, device, metric, training, dense_values, rows, time.perf_counter() - started, done=False)

    for method, init in (("data-parallel LoRA", True), ("PiSSA", "pissa")):
        model = lora(copy.deepcopy(dense), ranks, init)
        initial = lora_delta(model, args.layer)  # PiSSA's B0 A0 (LoRA's is 0); the residual base stays fixed
        start = time.perf_counter()
        timed_finetune(model, train_tokens, args)
        seconds = time.perf_counter() - start
        # The update is read from the float32 factors: the merged bf16 weight would add full-rank rounding.
        delta = lora_delta(model, args.layer) - initial
        # LoRA's replicas all-reduce their adapter gradients: about 2 r(n + m) values sent per device (ring).
        record(method, model.merge_and_unload(), lora_values, 2 * lora_values, seconds, delta)
        del model

    model = copy.deepcopy(dense)
    start = time.perf_counter()
    result = hd_pissa_finetune(model, train_tokens, args.steps, args.rank, args.lr, args.batch_size, args.seq_len,
                               slices=args.slices, progress=False, updates_of=(args.layer,))
    record(f"HD-PiSSA (K = {args.slices}, r = {args.rank} per slice)", model, result["sent_values_per_step"],
           result["sent_values_per_step"], time.perf_counter() - start, result["updates"][args.layer])
    del model

    model, floats = prepare("lords-peft", dense, ranks, calibration, args)
    before = model.get_submodule(args.layer).dequantize(torch.float32)
    start = time.perf_counter()
    timed_finetune(model, train_tokens, args)
    record("LoRDS-PEFT (4-bit)", model, floats, 2 * floats, time.perf_counter() - start,
           model.get_submodule(args.layer).dequantize(torch.float32) - before)

    report(args, path, device, metric, training, dense_values, rows, time.perf_counter() - started, done=True)


def report(args, path, device, metric, training, dense_values, rows, seconds, done) -> None:
    """Written after every method, so that a run cut short still leaves its finished rows (marked as partial)."""
    lines = [
        *produced_by("# HD-PiSSA vs data-parallel LoRA, PiSSA and LoRDS-PEFT", "benchmarks.hd_pissa"),
        f"- date: {time.strftime('%Y-%m-%d')}; device: "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
        + elapsed(seconds, done),
        f"- model: {path.name}; training: {training}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
        f"AdamW/Adam lr {args.lr} cosine; held-out: {metric}",
        f"- {args.slices} devices emulated on one GPU (see the script's docstring); sent per step: values each device "
        f"sends (a dense data-parallel fine-tune would all-reduce about {2 * dense_values / 1e6:.0f}M)",
        f"- rank of ΔW: singular values holding 99% of the float32 update's energy (LoRA/PiSSA from their factors, "
        f"HD-PiSSA from its master weight), {args.layer} (576 x 1536)",
        "- LoRA, PiSSA and HD-PiSSA train the bf16 model; LoRDS-PEFT trains a 4-bit LoRDS model (its score "
        "carries the quantization)", "",
        "| method | trainable floats per device | held-out | sent per step | wall (s) | rank of ΔW |",
        "|---|---|---|---|---|---|",
    ]
    for method, floats, held_out, sent, wall, erank in rows:
        lines.append(f"| {method} | {floats / 1e6:.2f}M | {held_out:.3f} | {sent / 1e6:.2f}M | {wall:.0f} | {erank} |")
    finish_report(lines, args.out, done)


if __name__ == "__main__":
    main()
