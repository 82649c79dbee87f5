"""A worked PaST example that runs offline on the default model: carry a task skill from one domain to another.

    python -m examples.past_skill_transfer --out results/past.md

The task: after a passage, answer "What is the last word of the passage?"; it is scored by exact match of the greedy
answer and by the loss of the answer tokens. The corpus is split by documents:
- source knowledge SFT: plain language modelling on documents 0-119   (theta_sft_S = SFT(theta_0))
- source skill stage on passages of documents 0-119                   (theta_skill_S = skill(theta_sft_S))
- target knowledge SFT: plain language modelling on documents 120-239 (theta_sft_T = SFT(theta_0))
- skill vector v = theta_skill_S - theta_sft_S; injected: theta_sft_T + lambda * v
- evaluation: the task on passages of the held-out documents 240-298.
The skill stage stands in for the paper's RL stage. By default (--skill-stage dpo) it is a preference stage, TRL's
DPOTrainer from theta_sft_S against a frozen copy of it (needs `pip install -e ".[rl]"`): chosen is the passage's last
word, rejected another word of the same passage. Plain DPO (loss type 'sigmoid') did not teach the task: theta_sft_S
answers with an end-of-turn token, and pairs that differ only in the word never contrast that, so after 30 steps at
lr 1e-5, 5e-5 and 1e-4 the held-out exact match was 0%, 2.5% and 5%. The default adds TRL's 'sft' loss type (the
chosen answer's negative log-likelihood, RPO-style) to the DPO loss. An RL stage proper was tried first: TRL's
GRPOTrainer runs on the default model, but every sampled answer scored 0 on this exact-match reward (no advantage,
no update), at about a minute per step on 2 CPU cores. --skill-stage sft is a second, task-format SFT
instead (the spec's fallback when no preference or RL trainer is installed).
The SFT stages fine-tune every parameter (AdamW, same lr); the deltas are taken with lords.skills.
"""

import argparse
import copy
import math
import os
import random
import tempfile
import time
from pathlib import Path

import torch

import lords
from lords.assets import default_model_path, documents, load_pretrained, token_stream
from lords.skills import apply_skill, extract, layer_cosines
from lords.train import finetune

QUESTION = "\nQuestion: What is the last word of the passage?\nAnswer:"
PUNCTUATION = ".,;:!?\"'()"


def task_passages(tokenizer, texts: list[str], passage_tokens: int) -> list[list[str]]:
    """The words of each document's opening, cut to a token budget; documents without a usable last word are dropped."""
    passages = []
    for text in texts:
        words = text.split()
        while words and len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > passage_tokens:
            words = words[: max(1, len(words) * 3 // 4)]
        if len(words) >= 5 and bare(words[-1]):
            passages.append(words)
    return passages


def bare(word: str) -> str:
    return word.strip(PUNCTUATION)


def prompt_text(words: list[str]) -> str:
    return "Passage: " + " ".join(words) + QUESTION


def answer_text(word: str) -> str:
    return " " + word + "\n"


def task_examples(tokenizer, passages: list[list[str]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt ids, answer ids) per passage."""
    def ids(text):
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [(ids(prompt_text(words)), ids(answer_text(bare(words[-1])))) for words in passages]


def preference_pairs(passages: list[list[str]], seed: int = 0) -> dict[str, list[str]]:
    """TRL's preference format: chosen answers the passage's last word, rejected another word of the same passage
    (drawn with a fixed seed), so both answers have the task's format and only the choice of word differs."""
    generator = random.Random(seed)
    pairs = {"prompt": [], "chosen": [], "rejected": []}
    for words in passages:
        last = bare(words[-1])
        others = sorted({bare(word) for word in words[:-1]} - {last, ""})
        if others:
            pairs["prompt"].append(prompt_text(words))
            pairs["chosen"].append(answer_text(last))
            pairs["rejected"].append(answer_text(generator.choice(others)))
    return pairs


def import_trl():
    try:
        import datasets
        import trl
    except ImportError as error:
        raise ImportError(f"--skill-stage dpo needs TRL ({error}): pip install -e \".[rl]\", or run with "
                          "--skill-stage sft") from error
    return trl, datasets


def dpo_stage(model, tokenizer, pairs: dict[str, list[str]], steps: int, lr: float, beta: float, batch_size: int,
              loss_type: list[str]) -> list[dict]:
    """TRL's DPOTrainer on `model` in place; returns TRL's per-step logs (loss, rewards/accuracies, ...)."""
    trl, datasets = import_trl()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # An explicit reference: TRL's default reloads the weights named in model.config, which are theta_0, not this model.
    reference = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as output_dir:
        config = trl.DPOConfig(
            output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            beta=beta, loss_type=loss_type, use_cpu=True, bf16=False, gradient_checkpointing=False, logging_steps=1,
            report_to="none", save_strategy="no", push_to_hub=False, disable_tqdm=True, seed=0)
        trainer = trl.DPOTrainer(model=model, ref_model=reference, args=config, processing_class=tokenizer,
                                 train_dataset=datasets.Dataset.from_dict(pairs))
        trainer.train()
    if trainer.accelerator.unwrap_model(trainer.model) is not model:
        raise RuntimeError("TRL trained a copy of the model, not the model the skill vector is taken from")
    model.eval()
    return [log for log in trainer.state.log_history if "rewards/accuracies" in log]


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
        hits += bool(predicted) and bare(predicted[0]) == expected[0]
    return hits / len(examples), loss / len(examples)


def dpo_skill(model, tokenizer, passages: list[list[str]], args) -> str:
    """The DPO skill stage on `model` in place; returns the report's line about it."""
    trl, _ = import_trl()
    pairs = preference_pairs(passages)
    steps = args.dpo_steps or args.steps
    logs = dpo_stage(model, tokenizer, pairs, steps, args.dpo_lr, args.dpo_beta, args.batch_size,
                     args.dpo_loss_type)
    last = logs[-5:]

    def first_to_last(key):
        return f"{logs[0][key]:.3f} -> {sum(log[key] for log in last) / len(last):.3f}"

    return (f"the skill stage is a preference stage, TRL {trl.__version__}'s DPOTrainer (loss types "
            f"{' + '.join(args.dpo_loss_type)}, beta {args.dpo_beta}, AdamW lr {args.dpo_lr} with TRL's linear "
            f"decay, {steps} steps, batch {args.batch_size}, full fine-tuning) from theta_sft_S against a frozen copy "
            f"of theta_sft_S; {len(pairs['prompt'])} pairs from the passages of documents 0-119: prompt = passage + "
            "question, chosen = its last word, rejected = another word of the same passage (seeded draw); loss "
            f"{first_to_last('loss')}, reward accuracy {first_to_last('rewards/accuracies')}, reward margin "
            f"{first_to_last('rewards/margins')}, chosen log-probability {first_to_last('logps/chosen')} (first step "
            f"-> mean of the last {len(last)})")


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
    parser.add_argument("--skill-stage", choices=["dpo", "sft"], default="dpo",
                        help="dpo: TRL's DPOTrainer on preference pairs; sft: a task-format SFT (no TRL needed)")
    parser.add_argument("--dpo-steps", type=int, default=None, help="DPO steps (default: --steps)")
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--dpo-loss-type", nargs="+", default=["sigmoid", "sft"],
                        help="TRL's DPO loss types, summed with weight 1; 'sigmoid' alone is plain DPO, which did not "
                             "teach the answer format here (see the module docstring)")
    args = parser.parse_args()
    # Everything stays on this machine: TRL's trainers would otherwise send a usage ping to the Hugging Face Hub
    # (read when huggingface_hub is first imported, so before that).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.skill_stage == "dpo":
        import_trl()  # fail before the first SFT stage, not after it
    started = time.perf_counter()
    torch.manual_seed(0)
    base, tokenizer = load_pretrained(default_model_path())
    source_docs, target_docs = documents("calibration")[:120], documents("calibration")[120:]
    heldout = task_examples(tokenizer, task_passages(tokenizer, documents("heldout"), args.passage_tokens))
    heldout = heldout[: args.eval_examples]
    source_passages = task_passages(tokenizer, source_docs, args.passage_tokens)

    def knowledge_sft(model, texts):
        finetune(model, token_stream(tokenizer, texts), args.steps, args.lr, args.batch_size, args.seq_len,
                 progress=False)
        return model

    sft_source = knowledge_sft(copy.deepcopy(base), source_docs)
    skill_source = copy.deepcopy(sft_source)
    if args.skill_stage == "dpo":
        skill_line = dpo_skill(skill_source, tokenizer, source_passages, args)
    else:
        losses = task_sft(skill_source, task_examples(tokenizer, source_passages), args.steps, args.lr,
                          args.batch_size)
        skill_line = (f"the skill stage is a task-format SFT (not RL, not a preference stage) on the "
                      f"{len(source_passages)} passages of documents 0-119, same steps and lr; its loss "
                      f"{losses[0]:.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f} (first step -> mean of the "
                      "last 5)")
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
    rows.append(("theta_sft_S (source knowledge SFT, before the skill stage)",
                 *evaluate(sft_source, tokenizer, heldout)))
    skill_row = (f"theta_skill_S (source model after the {args.skill_stage.upper()} skill stage)",
                 *evaluate(skill_source, tokenizer, heldout))
    rows.append(skill_row)
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
        "Produced by:", "",
        f"    python -m examples.past_skill_transfer --out results/{Path(args.out or 'past.md').name}", "",
        f"- date: {time.strftime('%Y-%m-%d')}; device: cpu ({torch.get_num_threads()} threads); torch "
        f"{torch.__version__}; total {time.perf_counter() - started:.0f} s",
        f"- knowledge SFT stages: {args.steps} full fine-tuning steps, batch {args.batch_size}, AdamW lr {args.lr}, "
        f"windows of {args.seq_len} tokens",
        f"- {skill_line}",
        f"- task: \"{QUESTION.strip().replace(chr(10), ' / ')}\" after a passage of at most {args.passage_tokens} "
        f"tokens; {len(heldout)} held-out passages (documents 240-298); exact match of the first answer word, and "
        "the answer tokens' loss",
        f"- mean cosine over parameters: skill vector v vs the target SFT delta {mean(cosine):+.4f}; control, two "
        f"SFT deltas (documents 120-239 vs a half-overlapping mix) {mean(control):+.4f}", *lords_lines, "",
        "| model | exact match | answer loss |", "|---|---|---|",
    ]
    lines += [f"| {name} | {match:.3f} | {loss:.3f} |" for name, match, loss in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not math.isfinite(skill_row[2]):
        raise SystemExit("the skill stage diverged")


if __name__ == "__main__":
    main()
