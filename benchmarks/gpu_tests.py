"""Run the GPU suite (tests/gpu: the GPU-only kernels, and the Triton kernels compiled) and write its summary: every
case, its outcome and the worst relative error against float64 it measured.

    python -m benchmarks.gpu_tests --out results/gpu_tests.md     # on a GPU (Hopper for the GPU-only kernels)
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

import torch
import triton

from .tables import finish_report, produced_by


def run_suite(junit: str, path: str = "tests/gpu", workers: int = 1) -> int:
    """pytest on tests/gpu (or one file of it) in a child process without Triton's interpreter (tests/conftest.py
    sets it otherwise); with workers > 1, that many pytest-xdist processes share the GPU, so that the Triton cases'
    compiles and autotuning run side by side."""
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-o", "junit_family=xunit1"]  # the family that keeps record_property's values
    command += ["-n", str(workers)] if workers > 1 else []
    return subprocess.run(command, env=environment).returncode


def cases(junit: str) -> list[tuple[str, str, str]]:
    """(test id, outcome, worst relative error or '') per case of the JUnit report."""
    rows = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            if case.find(kind) is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
        error = next((item.get("value") for item in case.iter("property") if item.get("name") == "rel_error"), "")
        rows.append((case.get("name"), outcome, f"{float(error):.2e}" if error else ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--path", default="tests/gpu", help="the suite, or one file of it")
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist processes (the Triton cases compile)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        junit = os.path.join(folder, "gpu.xml")
        code = run_suite(junit, args.path, args.workers)
        rows = cases(junit)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    counts = {outcome: sum(row[1] == outcome for row in rows) for outcome in ("passed", "FAILED", "ERROR", "skipped")}
    lines = produced_by("# GPU kernels: the tests/gpu suite", "benchmarks.gpu_tests")
    lines += [f"- date: {time.strftime('%Y-%m-%d')}; device: {device}; torch {torch.__version__}, "
              f"triton {triton.__version__}; pytest exit code {code}; {time.perf_counter() - started:.0f} s",
              "- " + ", ".join(f"{count} {outcome}" for outcome, count in counts.items()),
              "- worst relative error: over the case's 20 calls (5 graph replays), against a float64 reference", "",
              "| case | outcome | worst relative error |", "|---|---|---|"]
    lines += [f"| {name} | {outcome} | {error} |" for name, outcome, error in rows]
    finish_report(lines, args.out)


if __name__ == "__main__":
    main()
