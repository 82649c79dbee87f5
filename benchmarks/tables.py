"""Writing a results report: its opening lines (the command that produced it), and the file itself through a temporary
name moved into place, so that a reader (or a run cut short) never sees half a file and an earlier table is replaced
only by a whole new one."""

import shlex
import sys
from pathlib import Path

import torch


def write_table(path: str | Path, text: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text)
    partial.replace(out)


def produced_by(title: str, module: str) -> list[str]:
    """A report's opening lines: its title and the command that wrote it, with this run's arguments."""
    return [title, "", "Produced by:", "", f"    python -m {module} {shlex.join(sys.argv[1:])}".rstrip(), ""]


def elapsed(seconds: float, done: bool) -> str:
    """A report's run time, or the mark of a run cut short."""
    return f"total {seconds:.0f} s" if done else f"PARTIAL: the run had not finished ({seconds:.0f} s in)"


def devices(device: torch.device) -> str:
    """The report's device entry: "2 x NVIDIA H200" on CUDA, "cpu" otherwise."""
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if device.type == "cuda" else "cpu"


def finish_report(lines: list[str], out: str | Path | None, done: bool = True) -> None:
    """Write the report to out, if given; print it once it is done (a partial one is written after every row, so that
    a run cut short still leaves its finished rows)."""
    text = "\n".join(lines) + "\n"
    if done:
        print(text)
    if out:
        write_table(out, text)
