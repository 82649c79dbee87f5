"""Fine-tuning comparison on the default model: LoRDS-PEFT vs QLoRA, LoftQ and QPiSSA (peft), and LoRDS QAT vs PTQ.

    python -m benchmarks.finetune --out results/finetune.md      # GPU; needs bitsandbytes and peft

Every method starts from the same bf16 model, trains on the same windows of the training documents (same seed, batch,
steps, cosine schedule) and is scored by perplexity on the same held-out tokens. Trainable floats are equal: every
LoRA adapter gets, per module, the rank of that module's LoRDS scales (LoRA r(n + m) = LoRDS r(n + m)).
- LoRDS-PEFT: LoRDS 4-bit PTQ (activation-aware), then only B, A train (fp32); the Triton backward on CUDA.
- QLoRA: the decoder linears become bitsandbytes Linear4bit (NF4, block 64, double quantization), LoRA on top.
- LoftQ: peft's LoftQ init (4 bits, 1 iteration): the base is the NF4-dequantized residual, LoRA holds the rest.
- QPiSSA: peft's PiSSA init on the bf16 weights, then the residual base quantized to NF4 (bitsandbytes round trip).
- QAT: LoRDS QAT (same PTQ start, weights and scales trained, scales at 4x lr), exported; vs PTQ alone.
Step time and peak memory are measured in the same run; LoftQ and QPiSSA keep their NF4 bases as dequantized bf16
tensors (peft's LoftQ does too), so their memory is that of a dense base.
"""

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

import lords
from lords.assets import (calibration_tokens, default_model_path, documents, heldout_tokens, load_pretrained,
                          token_stream)
from lords.tasks import choice_accuracy, evaluation_split, load_task, training_tokens
from lords.eval.perplexity import perplexity
from benchmarks.e2e import to_nf4
from benchmarks.tables import elapsed, finish_report, produced_by
from lords.factorize import parity_rank
from lords.hd_pissa import TARGETS
from lords.model import set_submodule
from lords.linear import LoRDSLinear
from lords.peft import lords_layers, mark_trainable
from lords.qat import export_qat, prepare_qat, qat_parameter_groups
from lords.kernels.autotune import gpu_time
from lords.train import finetune



def decoder_linears(model) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, nn.Linear)}


def lords_ranks(model, block_size: int) -> dict[str, int]:
    """Rank per module type (every layer of a type has one shape): LoRA gets the same trainable floats as LoRDS."""
    return {name.rsplit(".", 1)[-1]: parity_rank(m.out_features, m.in_features, block_size)
            for name, m in decoder_linears(model).items()}


def nf4_round_trip_(weight: torch.Tensor) -> None:
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.data, blocksize=64, quant_type="nf4", compress_statistics=True)
    weight.data.copy_(bnbf.dequantize_4bit(packed, state).to(weight.dtype))


def to_bnb_nf4_(model) -> None:
    for name, linear in decoder_linears(model).items():
        set_submodule(model, name, to_nf4(linear))


def lora(model, ranks: dict[str, int], init):
    from peft import LoftQConfig, LoraConfig, get_peft_model

    extra = {"loftq_config": LoftQConfig(loftq_bits=4, loftq_iter=1)} if init == "loftq" else {}
    config = LoraConfig(
        r=max(ranks.values()), lora_alpha=2 * max(ranks.values()), target_modules=list(ranks), lora_dropout=0.0,
        rank_pattern=ranks, alpha_pattern={name: 2 * rank for name, rank in ranks.items()},
        init_lora_weights=init, task_type="CAUSAL_LM", **extra,
    )
    return get_peft_model(model, config)


def trainable_floats(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prepare(method: str, dense, ranks, calibration, args):
    """(model ready to train, its trainable floats); every method from its own copy of the dense model."""
    model = copy.deepcopy(dense)
    if method == "lords-peft":
        lords.quantize(model, lords.LoRDSConfig(bits=4, block_size=args.block_size, steps=args.ptq_steps),
                       calibration=calibration, progress=False)
        return model, mark_trainable(model)
    if method == "qlora":
        to_bnb_nf4_(model)
        model = lora(model, ranks, True)
    elif method == "loftq":
        model = lora(model, ranks, "loftq")
    elif method == "qpissa":
        model = lora(model, ranks, "pissa")
        for name, module in model.named_modules():
            if hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Linear):
                nf4_round_trip_(module.base_layer.weight)
    else:
        raise ValueError(method)
    return model, trainable_floats(model)


def dense_weight(module) -> torch.Tensor:
    if isinstance(module, LoRDSLinear):
        return module.dequantize(torch.float32)
    return module.weight.detach().float()


def lora_delta(model, layer_name: str) -> torch.Tensor:
    module = model.get_submodule("base_model.model." + layer_name)
    adapter = module.active_adapters[0]
    return (module.lora_B[adapter].weight.float() @ module.lora_A[adapter].weight.float()) * module.scaling[adapter]


def gradient_check(layer: LoRDSLinear, tokens: int = 512) -> tuple[float, float]:
    """Relative errors of the Triton dB, dA against autograd through the dense float64 weight, fresh random inputs."""
    from lords.kernels import scale_grads

    x = torch.randn(tokens, layer.in_features, device=layer.codes.device, dtype=torch.bfloat16)
    grad_out = torch.randn(tokens, layer.out_features, device=x.device, dtype=torch.bfloat16)
    grad_b, grad_a = scale_grads(grad_out, x, layer.codes, layer.codebook, layer.scale_b, layer.scale_a, layer.bits)
    scale_b = layer.scale_b.detach().double().requires_grad_(True)
    scale_a = layer.scale_a.detach().double().requires_grad_(True)
    weight = (scale_b @ scale_a) * layer.codebook.double()[layer.unpacked_codes().long()]
    ((x.double() @ weight.T) * grad_out.double()).sum().backward()
    return tuple(((ours.double() - ref.grad).norm() / ref.grad.norm()).item()
                 for ours, ref in ((grad_b, scale_b), (grad_a, scale_a)))


def effective_rank(delta: torch.Tensor, energy: float = 0.99) -> int:
    """How many singular values hold `energy` of ||delta||_F^2."""
    values = torch.linalg.svdvals(delta.double()) ** 2
    return int((values.cumsum(0) / values.sum() < energy).sum().item()) + 1


def qat_trainable(model, lr: float) -> list[dict]:
    """Only the QAT weights and scales train (not the embeddings or norms); their AdamW groups."""
    for param in model.parameters():
        param.requires_grad_(False)
    groups = qat_parameter_groups(model, lr)
    for group in groups:
        for param in group["params"]:
            param.requires_grad_(True)
    return groups


def timed_finetune(model, tokens, args, param_groups=None, fsdp=False) -> tuple[list[float], float, float]:
    """(losses, median seconds per step, peak GPU memory in GB while training)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stamps = [time.perf_counter()]
    losses = finetune(model, tokens, args.steps, args.lr, args.batch_size, args.seq_len, progress=False,
                      param_groups=param_groups, fsdp=fsdp,
                      on_step=lambda step, loss: stamps.append(time.perf_counter()))
    steps = sorted(b - a for a, b in zip(stamps[1:], stamps[2:]))  # the first step (autotuning) is left out
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    return losses, steps[len(steps) // 2] if steps else float("nan"), peak


@torch.no_grad()
def forward_ms(model, tokens: torch.Tensor) -> tuple[float, str]:
    """(milliseconds, how timed) of one forward over a (1, 256) window, the inference cost of the adapted model. On
    CUDA the forward is replayed from a CUDA graph: eager, a 135M model's few hundred kernel launches would be timed
    rather than its kernels."""
    batch = tokens[:256].view(1, -1).to(next(model.parameters()).device)
    model.eval()
    run = lambda: model(batch, use_cache=False)  # noqa: E731
    if torch.cuda.is_available():
        try:
            return gpu_time(run), "graph"
        except Exception:  # noqa: BLE001 - capture can fail; eager timing is reported as such
            torch.cuda.synchronize()
    times = []
    for _ in range(33):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times[3:])[15], "eager"


def as_served(model, dtype):
    """The LoRDS scales back in the model's dtype, as an adapter saves them (they train in float32)."""
    for layer in lords_layers(model).values():
        layer.scale_b.data, layer.scale_a.data = layer.scale_b.data.to(dtype), layer.scale_a.data.to(dtype)
    return model


def workload(args, tokenizer, heldout: torch.Tensor):
    """(training tokens, score(model), what is scored, what is trained on): a QA task of lords.tasks with --task, else
    the news text scored by perplexity."""
    if args.task:
        split = evaluation_split(args.task)
        train_tokens = training_tokens(tokenizer, load_task(args.task, "train"))
        docs = load_task(args.task, split)[: args.eval_examples]
        metric = f"{args.task} {split} acc_per_char ({len(docs)} examples; higher is better)"
        training = f"the {args.task} train split as 'query answer<eos>' text ({train_tokens.numel()} tokens)"
        return train_tokens, lambda model: choice_accuracy(model, tokenizer, docs)["acc_per_char"], metric, training
    train_tokens = token_stream(tokenizer, documents("calibration"))
    metric = f"perplexity over {heldout.numel()} held-out tokens of documents 240-298 + lee.cor (lower is better)"
    training = f"{train_tokens.numel()} tokens of Lee news documents 0-239 (held-out text is the same kind of news)"
    return train_tokens, lambda model: perplexity(model, heldout, seq_len=512, progress=False), metric, training


def add_workload_arguments(parser) -> None:
    parser.add_argument("--task", default=None,
                        help="a multiple-choice task of lords.tasks (e.g. arc_easy): train on its train split, score "
                        "accuracy on its test split (validation where it has none); default: news text, perplexity")
    parser.add_argument("--eval-examples", type=int, default=None, help="with --task: score only the first N")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: the packaged default model")
    parser.add_argument("--out", default=None)
    parser.add_argument("--methods", nargs="+", default=["lords-peft", "qlora", "loftq", "qpissa"])
    parser.add_argument("--qat-bits", type=int, nargs="*", default=[4, 3])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--qat-lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--ptq-steps", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=40_000)
    parser.add_argument("--layer", default="model.layers.10.mlp.down_proj", help="layer whose update is analysed")
    add_workload_arguments(parser)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    path = Path(args.model) if args.model else default_model_path()
    dense, tokenizer = load_pretrained(path, device, dtype)
    heldout = heldout_tokens(tokenizer, args.max_tokens)  # also the latency probe
    calibration = calibration_tokens(tokenizer, 64, 512)
    train_tokens, score, args.metric, args.training = workload(args, tokenizer, heldout)
    ranks = lords_ranks(dense, args.block_size)
    rows = [("bf16 (no training)", float("nan"), score(dense), "", "", "", "", "")]
    spectra, checks = {}, []
    print(f"bf16 untrained: {args.metric} = {rows[0][2]:.3f}; LoRA ranks per module = LoRDS ranks: {ranks}", flush=True)
    for method in args.methods:
        try:
            model, floats = prepare(method, dense, ranks, calibration, args)
            before_score = score(model)
            before = dense_weight(model.get_submodule(args.layer)) if method == "lords-peft" else None
            if method == "lords-peft" and device.type == "cuda":
                errors = gradient_check(model.get_submodule(args.layer))
                checks.append(f"- GPU gradient check of the Triton backward on {args.layer} (512 random bf16 tokens): "
                              f"relative error of dB {errors[0]:.1e}, of dA {errors[1]:.1e} against float64 autograd")
            if method == "lords-peft":  # un-adapted, scales as served (bf16): same modules, same kernels
                latency_before, timing = forward_ms(as_served(copy.deepcopy(model), dtype), heldout)
            else:
                with model.disable_adapter():  # the quantized base without its LoRA branch
                    latency_before, timing = forward_ms(model, heldout)
            losses, step_s, peak = timed_finetune(model, train_tokens, args)
            after_score = score(model)
            if method == "lords-peft":
                as_served(model, dtype)
            latency_after, timing_after = forward_ms(model, heldout)
            if method == "lords-peft":
                delta = dense_weight(model.get_submodule(args.layer)) - before
            else:
                delta = lora_delta(model, args.layer)
            spectra[method] = torch.linalg.svdvals(delta.detach().double()).cpu()
            latency = f"{latency_before:.2f} -> {latency_after:.2f}"
            if not timing == timing_after == "graph":
                latency += f" ({timing} -> {timing_after})"
            rows.append((method, floats, after_score, f"{before_score:.3f}", f"{1e3 * step_s:.1f}", f"{peak:.2f}",
                         latency, str(effective_rank(delta))))
            print(method, rows[-1], f"loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f}", flush=True)
            report(args, path, device, rows, [], spectra, checks, time.perf_counter() - started)
            del model
        except Exception as error:  # a baseline that cannot run here is reported, not fatal
            rows.append((method, float("nan"), float("nan"), f"{type(error).__name__}: {error}"[:120], "", "", "", ""))
            print(method, "failed:", error, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    qat_rows = []
    for bits in args.qat_bits:
        config = lords.LoRDSConfig(bits=bits, block_size=args.block_size, steps=args.ptq_steps)
        ptq = copy.deepcopy(dense)
        lords.quantize(ptq, config, calibration=calibration, progress=False)
        ptq_score = score(ptq)
        del ptq
        qat = copy.deepcopy(dense)
        prepare_qat(qat, config, calibration, progress=False)
        groups = qat_trainable(qat, args.qat_lr)
        floats = trainable_floats(qat)
        losses, step_s, peak = timed_finetune(qat, train_tokens, args, param_groups=groups)
        export_qat(qat)
        qat_rows.append((bits, ptq_score, score(qat), floats, 1e3 * step_s, peak))
        print("qat", qat_rows[-1], flush=True)
        report(args, path, device, rows, qat_rows, spectra, checks, time.perf_counter() - started)
        del qat
    report(args, path, device, rows, qat_rows, spectra, checks, time.perf_counter() - started, done=True)


def report(args, path, device, rows, qat_rows, spectra, checks, seconds, done=False) -> None:
    """Written after every method, so that a run cut short still leaves its finished rows (marked as partial)."""
    import transformers

    lines = [
        *produced_by("# Fine-tuning: LoRDS-PEFT vs QLoRA, LoftQ and QPiSSA; LoRDS QAT vs PTQ", "benchmarks.finetune"),
        f"- date: {time.strftime('%Y-%m-%d')}; "
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}; "
        + elapsed(seconds, done),
        f"- model: {path.name} (SmolLM2-135M-Instruct, dequantized from its GGUF); training: {args.training}, "
        f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens, AdamW lr {args.lr} (cosine); held-out: "
        f"{args.metric}",
        f"- LoRDS: 4-bit NF, parity rank for block {args.block_size}, {args.ptq_steps} activation-aware PTQ steps; "
        "LoRA ranks per module equal to the LoRDS ranks, alpha = 2 r, all seven decoder linears",
        f"- step time: median over steps 2..{args.steps}; peak: torch.cuda.max_memory_allocated while training; "
        "forward: latency of one (1, 256) window (median of CUDA-graph replays, eager where marked) through the "
        "base (LoRDS before training, scales in bf16 as served; the peft model with its adapter disabled) -> through "
        "the trained model (LoRDS scales back in bf16, as saved)",
        *checks, "",
        "| method | trainable floats | held-out after | before training | step (ms) | peak memory (GB) "
        "| forward (ms) | rank of ΔW (99% energy) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, floats, after, before, step, peak, latency, erank in rows:
        floats_text = "" if isinstance(floats, float) and math.isnan(floats) else f"{floats / 1e6:.2f}M"
        lines.append(f"| {method} | {floats_text} | {after:.3f} | {before} | {step} | {peak} | {latency} | {erank} |")
    if qat_rows:
        lines += ["", f"LoRDS QAT vs PTQ (same PTQ start; QAT trains weights and scales for {args.steps} steps at lr "
                  f"{args.qat_lr}, scales x4, then exports to LoRDSLinear):", "",
                  "| bits | PTQ held-out | QAT held-out | trainable floats | step (ms) | peak memory (GB) |",
                  "|---|---|---|---|---|---|"]
        for bits, ptq_score, qat_score, floats, step, peak in qat_rows:
            lines.append(f"| {bits} | {ptq_score:.3f} | {qat_score:.3f} | {floats / 1e6:.1f}M | {step:.1f} "
                         f"| {peak:.2f} |")
    finish_report(lines, args.out, done)
    if args.out and spectra:
        plot_spectra(spectra, args.layer, Path(args.out).with_suffix(".png"))


def plot_spectra(spectra: dict, layer: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, values in spectra.items():
        axis.semilogy(range(1, len(values) + 1), (values / values[0]).clamp(min=1e-8), label=method)
    axis.set_title(f"singular values of the trained update, {layer}", fontsize=9)
    axis.set_xlabel("index")
    axis.set_ylabel("sigma_i / sigma_1")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
