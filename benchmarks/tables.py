"""Writing a results table: through a temporary name moved into place, so that a reader (or a run cut short) never
sees half a file and an earlier table is replaced only by a whole new one."""

from pathlib import Path


def write_table(path: str | Path, text: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text)
    partial.replace(out)
