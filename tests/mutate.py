"""Mutation testing of one core module with mutmut, on that module's own tests only.

    nice -n 10 python tests/mutate.py MODULE [--sample N | --mutants NAME ...] [--jobs J]

mutmut rewrites every function of lords/MODULE.py into small variants (a flipped comparison, an off-by-one, a dropped
argument) and runs the tests that cover each variant; a variant that passes them all "survived": no test notices that
change. Only the tests that `[tool.lords.mutation_tests]` in pyproject.toml lists for MODULE run, so that a module
takes minutes on 2 cores instead of hours under the whole suite. The work happens in .mutation/MODULE/ (mutmut's
mutated copy and its cached results: a second run only tests what changed; delete the folder to start over). The run
ends with the survivors, a diff each, and one summary line.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUS_BY_EXIT_CODE = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout",
                       24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def tests_by_module() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["lords"]["mutation_tests"]


def all_mutant_names(workdir: Path, module: str) -> list[str]:
    """The names mutmut gives the mutants of lords/MODULE.py, computed here so that a sample can be drawn before a run.
    mutmut reads its settings from the working directory."""
    from mutmut.mutation.file_mutation import mutate_file_contents

    path = f"lords/{module}.py"
    os.chdir(workdir)
    mutated = mutate_file_contents(path, (ROOT / path).read_text())
    return sorted(f"lords.{module}.{name}" for name in mutated.mutant_names)


def prepare_workdir(module: str, tests: list[str]) -> Path:
    """.mutation/MODULE/ holds links to the sources and tests and a pyproject.toml with only mutmut's settings for
    MODULE; mutmut reads its settings from the working directory's pyproject.toml."""
    workdir = ROOT / ".mutation" / module
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("lords", "tests"):
        if not (workdir / name).exists():
            (workdir / name).symlink_to(ROOT / name)
    selection = ", ".join(json.dumps(test) for test in tests)
    (workdir / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["lords"]\n'
        f'only_mutate = ["lords/{module}.py"]\n'
        f"pytest_add_cli_args_test_selection = [{selection}]\n"
        # torch's thread pools do not survive a fork of a process that has used them: fork each test run from a
        # fresh server process instead of from mutmut's own.
        'process_isolation = "forkserver"\n'
        # a mutant's tests may take 60 s + 3x their clean time: the 2-core machine is shared, and mutmut's default
        # (15 x (time + 1 s)) counted runs that were only slowed down by other work as timeouts
        "timeout_constant = 20.0\ntimeout_multiplier = 3.0\n"
        "\n[tool.pytest.ini_options]\n"
        'testpaths = ["tests"]\n'
    )
    return workdir


def summary(workdir: Path, module: str) -> dict[str, str | None]:
    meta = json.loads((workdir / "mutants" / "lords" / f"{module}.py.meta").read_text())
    return {name: STATUS_BY_EXIT_CODE.get(code, f"exit code {code}") for name, code in meta["exit_code_by_key"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="a key of [tool.lords.mutation_tests] in pyproject.toml, e.g. codebooks")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sample", type=int, metavar="N", help="test N mutants drawn at random (seed 0)")
    which.add_argument("--mutants", nargs="+", metavar="NAME", help="test only these mutants (names as printed)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    args = parser.parse_args()

    tests = tests_by_module()
    if args.module not in tests:
        sys.exit(f"error: no module {args.module!r} in [tool.lords.mutation_tests]; choose from {', '.join(tests)}")
    workdir = prepare_workdir(args.module, tests[args.module])
    names = all_mutant_names(workdir, args.module)
    chosen = args.mutants or []
    if args.sample is not None:
        chosen = sorted(random.Random(0).sample(names, min(args.sample, len(names))))
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        sys.exit(f"error: no mutant {unknown[0]} in lords/{args.module}.py")

    # one thread per test run: --jobs runs share the machine's cores
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs), *chosen],
                         cwd=workdir, env=env)
    if run.returncode != 0:
        sys.exit(f"error: mutmut exited with {run.returncode}")

    status = summary(workdir, args.module)
    counted = chosen or names
    # a mutant that makes a test run past mutmut's time limit (a loop that no longer ends) is caught too
    survivors = [name for name in counted if status.get(name) not in ("killed", "timeout")]
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    for name in survivors:
        print(f"\n# {name}: {status.get(name)}\n{get_diff_for_mutant(name, path=f'lords/{args.module}.py')}")
    killed = len(counted) - len(survivors)
    timeouts = sum(status.get(name) == "timeout" for name in counted)
    print(f"\nlords/{args.module}.py: {len(counted)} mutants{' (sample)' if args.sample else ''}, {killed} killed "
          f"({timeouts} by a timeout), {len(survivors)} not killed ({100 * killed / len(counted):.1f}% killed)")


if __name__ == "__main__":
    main()
