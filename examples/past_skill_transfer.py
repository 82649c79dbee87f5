"""A worked PaST example that runs offline on the default model: carry a task skill from one domain to another.

    python -m examples.past_skill_transfer --out results/past.md

The source "skill" stage is a second, task-format SFT (the spec's fallback), not RL. TRL installs from the registry
and its GRPOTrainer runs on the default model, but tried from the base model with this task's exact-match reward,
every sampled answer scored 0 (no advantage, no update), at about a minute per step on 2 CPU cores; an RL stage needs
a task-format SFT before it and a GPU. The task: after a passage, answer "What is the last word of the passage?"; it is scored by exact match of
the greedy answer and by the loss of the answer tokens. The corpus is split by documents:
- source knowledge SFT: plain language modelling on documents 0-119   (theta_sft_S = SFT(theta_0))
- source skill stage: the task on passages of documents 0-119         (theta_skill_S = SFT(theta_sft_S))
- target knowledge SFT: plain language modelling on documents 120-239 (theta_sft_T = SFT(theta_0))
- skill vector v = theta_skill_S - theta_sft_S; injected: theta_sft_T + lambda * v
- evaluation: the task on passages of the held-out documents 240-298.
All stages fine-tune every parameter (AdamW, same lr); the deltas are taken with lords.skills.
"""

import argparse
import copy
import math
import time
from pathlib import Path

import torch

import lords
from lords.assets import default_model_path, documents, load_pretrained, token_stream
from lords.skills import apply_skill, extract, layer_cosines
from lords.train import finetune

QUESTION = "\nQuestion: What is the last word of the passage?\nAnswer:"


def task_examples(tokenizer, texts: list[str], passage_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt ids, answer ids) per document: the passage is the document's first words, cut to a token budget."""
    examples = []
    for text in texts:
        words = text.split()
        while words and len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > passage_tokens:
            words = words[: max(1, len(words) * 3 // 4)]
        if len(words) < 5:
            continue
        last = words[-1].strip(".,;:!?\"'()")
        if not last:
            continue
        prompt = "Passage: " + " ".join(words) + QUESTION
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(" " + last + "\n", add_special_tokens=False)["input_ids"]
        examples.append((torch.tensor(prompt_ids), torch.tensor(answer_ids)))
    return examples


def task_sft(model, examples, steps: int, lr: float, batch_size: int, seed: int = 0) -> list[float]:
    """Full fine-tuning on the task, loss on the answer tokens only, one example per row (no packing)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        picks = torch.randint(0, len(examples), (batch_size,), generator=generator).tolist()
        loss = sum(answer_loss(model, *examples[i]) for i in picks) / batch_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def answer_loss(model, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([prompt, answer])[None]
    labels = ids.clone()
    labels[:, : prompt.numel()] = -100
    return model(ids, labels=labels, use_cache=False).loss


@torch.no_grad()
def evaluate(model, tokenizer, examples) -> tuple[float, float]:
    """(exact match of the greedy answer's first word, mean answer loss)."""
    model.eval()
    hits, loss = 0, 0.0
    for prompt, answer in examples:
        loss += answer_loss(model, prompt, answer).item()
        output = model.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                                max_new_tokens=answer.numel() + 2, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
        predicted = tokenizer.decode(output[0, prompt.numel():], skip_special_tokens=True).split()
        expected = tokenizer.decode(answer, skip_special_tokens=True).split()
        hits += bool(predicted) and predicted[0].strip(".,;:!?\"'()") == expected[0]
    return hits / len(examples), loss / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--passage-tokens", type=int, default=48)
    parser.add_argument("--eval-examples", type=int, default=40)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 1.5])
    parser.add_argument("--lords-bits", type=int, default=4, help="also inject into a LoRDS-quantized target (0: skip)")
    parser.add_argument("--lords-steps", type=int, default=20, help="data-free refinement steps of that target")
    parser.add_argument("--refit-steps", type=int, default=100)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    base, tokenizer = load_pretrained(default_model_path())
    source_docs, target_docs = documents("calibration")[:120], documents("calibration")[120:]
    heldout = task_examples(tokenizer, documents("heldout"), args.passage_tokens)[: args.eval_examples]

    def knowledge_sft(model, texts):
        finetune(model, token_stream(tokenizer, texts), args.steps, args.lr, args.batch_size, args.seq_len,
                 progress=False)
        return model

    sft_source = knowledge_sft(copy.deepcopy(base), source_docs)
    skill_source = copy.deepcopy(sft_source)
    skill_losses = task_sft(skill_source, task_examples(tokenizer, source_docs, args.passage_tokens), args.steps,
                            args.lr, args.batch_size)
    sft_target = knowledge_sft(copy.deepcopy(base), target_docs)
    sft_target_b = knowledge_sft(copy.deepcopy(base), source_docs[:60] + target_docs[:60])
    skill = extract(sft_source, skill_source)
    cosine = layer_cosines(skill, extract(base, sft_target))
    control = layer_cosines(extract(base, sft_target_b), extract(base, sft_target))

    rows = [("theta_0 (base)", *evaluate(base, tokenizer, heldout)),
            ("theta_sft_T (target SFT, no skill)", *evaluate(sft_target, tokenizer, heldout))]
    for scale in args.scales:
        injected = copy.deepcopy(sft_target)
        apply_skill(injected, skill, scale)
        rows.append((f"theta_sft_T + {scale:g} v (PaST)", *evaluate(injected, tokenizer, heldout)))
    rows.append(("theta_skill_S (source model with the skill)", *evaluate(skill_source, tokenizer, heldout)))
    lords_lines = []
    if args.lords_bits:
        quantized = copy.deepcopy(sft_target)
        reports = lords.quantize(quantized, lords.LoRDSConfig(bits=args.lords_bits, steps=args.lords_steps),
                                 progress=False)
        rows.append((f"LoRDS {args.lords_bits}-bit theta_sft_T", *evaluate(quantized, tokenizer, heldout)))
        shares = [(skill[f"{name}.weight"].norm() / module.dequantize(torch.float32).norm()).item()
                  for name, module in quantized.named_modules() if isinstance(module, lords.LoRDSLinear)]
        errors = apply_skill(quantized, skill, 1.0, args.refit_steps)
        rows.append((f"LoRDS {args.lords_bits}-bit theta_sft_T + 1 v (B, A and codes re-fitted)",
                     *evaluate(quantized, tokenizer, heldout)))
        injected_first = copy.deepcopy(sft_target)
        apply_skill(injected_first, skill, 1.0)
        lords.quantize(injected_first, lords.LoRDSConfig(bits=args.lords_bits, steps=args.lords_steps), progress=False)
        rows.append((f"LoRDS {args.lords_bits}-bit of (theta_sft_T + 1 v) (injected before quantizing)",
                     *evaluate(injected_first, tokenizer, heldout)))
        quantization = sum(r.weight_error for r in reports) / len(reports)
        before = sum(e[0] for e in errors.values()) / len(errors)
        after = sum(e[1] for e in errors.values()) / len(errors)
        lords_lines = [
            f"- LoRDS target: theta_sft_T quantized data-free ({args.lords_steps} steps, mean weight error "
            f"{quantization:.4f}); v applied by re-fitting every LoRDSLinear to its shifted weight ({args.refit_steps} "
            f"steps from the current scales). Mean relative error to the shifted weights: {before:.4f} with the old "
            f"scales, {after:.4f} after the re-fit; leaving v out entirely would be {sum(shares) / len(shares):.4f} "
            "(mean ||v|| / ||W||). Where the dense target is at hand, v can instead be added before quantizing "
            "(`lords skill apply` on the dense model, then `lords quantize`)"]

    def mean(values):
        return sum(values.values()) / len(values)

    lines = [
        "# PaST worked example: a task skill carried from documents 0-119 to a model tuned on documents 120-239", "",
        "Produced by:", "", f"    python -m examples.past_skill_transfer --out results/{Path(args.out or 'past.md').name}", "",
        f"- date: {time.strftime('%Y-%m-%d')}; device: cpu ({torch.get_num_threads()} threads); torch "
        f"{torch.__version__}; total {time.perf_counter() - started:.0f} s",
        f"- every stage: {args.steps} full fine-tuning steps, batch {args.batch_size}, AdamW lr {args.lr}; knowledge "
        f"SFT on windows of {args.seq_len} tokens; the skill stage is a task-format SFT (not RL); "
        f"its loss {skill_losses[0]:.3f} -> {sum(skill_losses[-5:]) / len(skill_losses[-5:]):.3f}",
        f"- task: \"{QUESTION.strip().replace(chr(10), ' / ')}\" after a passage of at most {args.passage_tokens} tokens; {len(heldout)} "
        "held-out passages (documents 240-298); exact match of the first answer word, and the answer tokens' loss",
        f"- mean cosine over parameters: skill vector v vs the target SFT delta {mean(cosine):+.4f}; control, two "
        f"SFT deltas (documents 120-239 vs a half-overlapping mix) {mean(control):+.4f}", *lords_lines, "",
        "| model | exact match | answer loss |", "|---|---|---|",
    ]
    lines += [f"| {name} | {match:.3f} | {loss:.3f} |" for name, match, loss in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not math.isfinite(rows[-1][2]):
        raise SystemExit("the skill stage diverged")


if __name__ == "__main__":
    main()
