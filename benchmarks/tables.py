"""Writing a results table: through a temporary name moved into place, so that a reader (or a run cut short) never
sees half a file and an earlier table is replaced only by a whole new one."""

from pathlib import Path

import torch


def write_table(path: str | Path, text: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text)
    partial.replace(out)


def devices(device: torch.device) -> str:
    """The report's device entry: "2 x NVIDIA H200" on CUDA, "cpu" otherwise."""
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if device.type == "cuda" else "cpu"


def finish_report(lines: list[str], out: str | Path | None) -> None:
    """Print a finished report and write it to out, if given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_table(out, text)
