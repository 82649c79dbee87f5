"""The kernels compile for an H100 (sm_90a) with their real configs, checked on the CPU through Triton's bundled
ptxas and cuobjdump (benchmarks/sass.py): a kernel that only the interpreter ever ran could otherwise break on the
GPU unnoticed (a constexpr Triton's interpreter accepts and its compiler does not, a spill, a lost tensor-core path)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
if not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists():
    pytest.skip("this Triton has no bundled ptxas / cuobjdump", allow_module_level=True)


def test_every_kernel_has_a_config_that_compiles_for_sm90_fits_and_does_not_spill(tmp_path):
    out = tmp_path / "sass.md"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # the GPU configs
    subprocess.run([sys.executable, "-m", "benchmarks.sass", "--quick", "--out", str(out)], check=True, env=env,
                   cwd=Path(__file__).parents[1], capture_output=True, timeout=900)
    lines = out.read_text().splitlines()
    header = [cell.strip() for cell in next(line for line in lines if line.startswith("| kernel")).split("|")[1:-1]]
    rows = [dict(zip(header, (cell.strip() for cell in line.split("|")[1:-1])))
            for line in lines if line.startswith("| ") and "_kernel" in line]
    usable = {(row["kernel"], row["bits"], row["rows"], row["dtype"]): row for row in rows
              if row["fits"] == "yes" and row["stack (B)"] == "0"}
    # every case has a config that launches without spilling: the autotuner is never left with none
    assert set(usable) == {(row["kernel"], row["bits"], row["rows"], row["dtype"]) for row in rows}
    assert {("decode_kernel", bits, "1", "bfloat16") for bits in "432"} <= set(usable)
    assert {("tiled_kernel", "4", "16", "bfloat16"), ("dequantize_kernel", "4", "2048", "bfloat16")} <= set(usable)
    for (kernel, *_), row in usable.items():
        assert float(row["instr. / weight"]) > 0
        if kernel == "decode_kernel":  # the algebraic form's dot runs on wgmma
            assert int(row["HGMMA"]) > 0, row
        # both stream-K kernels let every thread read a shared tile's sums before any clears them
        assert row["sums read before cleared"] == ("" if kernel == "dequantize_kernel" else "yes"), row


def test_main_loop_is_the_largest_innermost_loop():
    from benchmarks.sass import main_loop

    # a tile loop (0x10-0x90) around a step loop (0x20-0x60), then a short loop (0xa0-0xb0) after it
    text = {0x00: "MOV R1, R2", 0x10: "IADD R3, R3, 1", 0x20: "LDG R4, [R5]", 0x30: "HGMMA R6", 0x40: "PRMT R7",
            0x50: "ISETP P0", 0x60: "@P0 BRA 0x20", 0x70: "RED [R8], R9", 0x80: "ISETP P1", 0x90: "@P1 BRA 0x10",
            0xa0: "IADD R1, R1, 1", 0xb0: "@P2 BRA 0xa0", 0xc0: "EXIT"}
    assert main_loop(sorted(text.items())) == [text[address] for address in range(0x20, 0x70, 0x10)]
    assert main_loop([(0x0, "MOV R1, R2"), (0x10, "EXIT")]) == ["MOV R1, R2", "EXIT"]  # no loop: everything
