"""The kernels' register lookup (PTX, GPU only) checked on the CPU by executing its instructions in Python."""

import pytest
import torch

pytest.importorskip("triton")

from lords.codebooks import get_codebook  # noqa: E402
from lords.kernels import codes as kernel_codes  # noqa: E402

MASK = 0xFFFFFFFF


def prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): output byte k is byte (low three bits of selector nibble k) of the 8 bytes
    {b, a}, or, where the nibble's bit 3 is set, that byte's sign bit replicated."""
    pool = a | (b << 32)
    out = 0
    for k in range(4):
        index = (selector >> (4 * k)) & 0xF
        byte = (pool >> (8 * (index & 7))) & 0xFF
        out |= (0xFF * (byte >> 7) if index & 8 else byte) << (8 * k)
    return out


OPS = {
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "shr.u32": lambda a, b: a >> b,
    "shl.b32": lambda a, b: a << b,
    "mov.b32": lambda a: a,
    "mul.lo.u32": lambda a, b: (a * b) & MASK,
    "prmt.b32": prmt,
    "lop3.b32": lambda a, b, mask, lut: (a & mask) | (b & ~mask & MASK) if lut == 0xE4 else None,
}


def execute(ptx: str, packed_codes: int) -> tuple[int, int]:
    """Runs the table on four codes, one per byte; returns the two words of level pairs (codes 0, 1 and 2, 3)."""
    quads = "$4" in ptx  # the four-output form: 16-bit $0-$3, the codes in $4
    registers = {"$4" if quads else "$2": packed_codes}
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        if line.startswith("mov.b32 {"):  # mov.b32 {$0, $1}, a: the low and high halves of a
            halves, source = line[len("mov.b32 {"):].split("},")
            low, high = (name.strip() for name in halves.split(","))
            registers[low], registers[high] = registers[source.strip()] & 0xFFFF, registers[source.strip()] >> 16
            continue
        op, operands = line.split(None, 1)
        target, *sources = [operand.strip() for operand in operands.split(",")]
        values = [int(source, 0) if source[0].isdigit() else registers[source] for source in sources]
        registers[target] = OPS[op](*values) & MASK
    if quads:
        return registers["$0"] | registers["$1"] << 16, registers["$2"] | registers["$3"] << 16
    return registers["$0"], registers["$1"]


@pytest.mark.parametrize("quads", [False, True], ids=["pairs", "quads"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["nf", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_register_lookup_returns_the_levels(monkeypatch, kind, bits, dtype, quads):
    monkeypatch.setattr(kernel_codes, "INTERPRET", False)
    codebook = get_codebook(kind, bits)
    ptx = kernel_codes.level_table(codebook, dtype, quads)
    generator = torch.Generator().manual_seed(bits)
    for _ in range(200):
        codes = torch.randint(0, 2**bits, (4,), generator=generator).tolist()
        low, high = execute(ptx, sum(code << (8 * k) for k, code in enumerate(codes)))
        halves = torch.tensor([low & 0xFFFF, low >> 16, high & 0xFFFF, high >> 16], dtype=torch.int32)
        assert torch.equal(halves.to(torch.int16).view(dtype), codebook.to(dtype)[codes])


def test_register_lookup_covers_every_code_in_every_position(monkeypatch):
    """All 16 codes at each of the four byte positions: the selector and the bit-3 mask of every lane."""
    monkeypatch.setattr(kernel_codes, "INTERPRET", False)
    codebook = torch.linspace(-1, 1, 16)
    ptx = kernel_codes.level_table(codebook, torch.bfloat16)
    for code in range(16):
        for position in range(4):
            codes = [(code + 5 * lane) % 16 if lane != position else code for lane in range(4)]
            low, high = execute(ptx, sum(c << (8 * k) for k, c in enumerate(codes)))
            halves = torch.tensor([low & 0xFFFF, low >> 16, high & 0xFFFF, high >> 16], dtype=torch.int32)
            assert torch.equal(halves.to(torch.int16).view(torch.bfloat16), codebook.bfloat16()[codes])


def test_table_follows_writes_to_the_codebook(monkeypatch):
    monkeypatch.setattr(kernel_codes, "INTERPRET", False)
    codebook = get_codebook("nf", 4).clone()
    before = kernel_codes.level_table(codebook)
    assert kernel_codes.level_table(codebook) is before  # cached: no read-back from the GPU on later calls
    codebook.mul_(0.5)
    after = kernel_codes.level_table(codebook)
    assert after != before
    _, high = execute(after, 15 << 24)
    assert torch.tensor([high >> 16], dtype=torch.int32).to(torch.int16).view(torch.float16).item() == pytest.approx(
        codebook[15].item(), rel=1e-3)


def test_no_table_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernel_codes, "INTERPRET", True)
    assert kernel_codes.level_table(get_codebook("nf", 4)) is None
