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


def halves(word: int, dtype: torch.dtype) -> torch.Tensor:
    """The two 16-bit floats of a 32-bit word, low half first, in float64."""
    return torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32).to(torch.int16).view(dtype).double()


def word(values: torch.Tensor, dtype: torch.dtype) -> int:
    """Two values rounded to a 16-bit float type, packed low half first."""
    low, high = values.to(dtype).view(torch.int16).to(torch.int32).tolist()
    return (low & 0xFFFF) | ((high & 0xFFFF) << 16)


def packed_fma(dtype: torch.dtype):
    """PTX fma.rn.{bf16x2, f16x2}: a * b + c on both 16-bit halves, rounded once."""
    return lambda a, b, c: word(halves(a, dtype) * halves(b, dtype) + halves(c, dtype), dtype)


OPS = {
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "shr.u32": lambda a, b: a >> b,
    "shr.b32": lambda a, b: a >> b,
    "shl.b32": lambda a, b: a << b,
    "mov.b32": lambda a: a,
    "mul.lo.u32": lambda a, b: (a * b) & MASK,
    "prmt.b32": prmt,
    "lop3.b32": lambda a, b, mask, lut: (a & mask) | (b & ~mask & MASK) if lut == 0xE4 else None,
    "fma.rn.bf16x2": packed_fma(torch.bfloat16),
    "fma.rn.f16x2": packed_fma(torch.float16),
}


def execute(ptx: str, registers: dict[str, int]) -> dict[str, int]:
    """Runs the PTX on the given input registers; returns every register it wrote or read."""
    registers = dict(registers)
    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        if line.startswith("mov.b32 {"):  # mov.b32 {$0, $1}, a: the low and high halves of a
            pair, source = line[len("mov.b32 {"):].split("},")
            low, high = (name.strip() for name in pair.split(","))
            registers[low], registers[high] = registers[source.strip()] & 0xFFFF, registers[source.strip()] >> 16
            continue
        op, operands = line.split(None, 1)
        target, *sources = [operand.strip() for operand in operands.split(",")]
        values = [int(source, 0) if source[0].isdigit() else registers[source] for source in sources]
        registers[target] = OPS[op](*values) & MASK
    return registers


def lookup_words(ptx: str, form: str, packed_codes: int) -> tuple[int, int]:
    """Runs the quads or pairs form on four codes, one per byte; returns the two words of level pairs (codes 0, 1
    and 2, 3)."""
    if form == "pairs":  # codes in $2, level pairs in $0, $1
        registers = execute(ptx, {"$2": packed_codes})
        return registers["$0"], registers["$1"]
    registers = execute(ptx, {"$4": packed_codes})  # codes in $4, 16-bit $0-$3
    return registers["$0"] | registers["$1"] << 16, registers["$2"] | registers["$3"] << 16


def lookup_levels(ptx: str, codes: list[int], dtype: torch.dtype, form: str = "quads") -> torch.Tensor:
    low, high = lookup_words(ptx, form, sum(code << (8 * k) for k, code in enumerate(codes)))
    halves = torch.tensor([low & 0xFFFF, low >> 16, high & 0xFFFF, high >> 16], dtype=torch.int32)
    return halves.to(torch.int16).view(dtype)


def table_levels(codebook: torch.Tensor, lookup) -> torch.Tensor:
    """What the register lookup should give: the levels over the kernel's output scale (on the GPU the lookup holds
    no tensor of them, so that none is made at first use)."""
    levels = codebook.double() / lookup.scale
    return levels.round() if lookup.integer else levels


@pytest.mark.parametrize("form", ["quads", "pairs"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["nf", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_register_lookup_returns_the_levels(monkeypatch, kind, bits, dtype, form):
    monkeypatch.setattr(kernel_codes, "INTERPRET", False)
    codebook = get_codebook(kind, bits)
    lookup = kernel_codes.level_lookup(codebook, dtype, form)
    assert lookup.dtype == dtype
    # the kernel's levels times its output scale are the codebook; the integer form (int codebooks) has levels
    # code - 2^(bits-1), exact in both dtypes, and scale 1 / (2^(bits-1) - 1)
    integer = kind == "int"
    half = 2 ** (bits - 1)
    assert lookup.scale == (pytest.approx(1 / (half - 1), rel=1e-6) if integer else 1.0)  # float32: 3.6e-7 measured
    assert lookup.levels.data_ptr() == codebook.data_ptr()  # no tensor made at first use (CUDA-graph trees)
    levels = table_levels(codebook, lookup)
    torch.testing.assert_close(levels * lookup.scale, codebook.double(), rtol=1e-6, atol=0)  # 3.6e-7 measured
    if integer:
        assert torch.equal(levels, torch.arange(2**bits) - float(half))
    generator = torch.Generator().manual_seed(bits)
    for _ in range(200):
        codes = torch.randint(0, 2**bits, (4,), generator=generator).tolist()
        assert torch.equal(lookup_levels(lookup.table, codes, dtype, form), levels.to(dtype)[codes])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["nf", "int"])
def test_nibble_lookup_gives_the_levels_of_eight_codes(monkeypatch, kind, dtype):
    """The Gluon kernel's form: the bytes of $8 hold eight 4-bit codes; $0-$3 are the levels of the low nibbles of
    bytes 0-3, $4-$7 those of the high nibbles."""
    monkeypatch.setattr(kernel_codes, "INTERPRET", False)
    codebook = get_codebook(kind, 4)
    lookup = kernel_codes.level_lookup(codebook, dtype, "nibbles")
    assert len(lookup.words) == (0 if kind == "int" else 8)  # a table's words are operands, not immediates
    levels = table_levels(codebook, lookup).to(dtype)
    generator = torch.Generator().manual_seed(7)
    for _ in range(200):
        codes = torch.randint(0, 16, (2, 4), generator=generator)  # (low, high nibble) x byte
        packed = sum(int(codes[0, k] | codes[1, k] << 4) << (8 * k) for k in range(4))
        words = {f"${9 + index}": word & 0xFFFFFFFF for index, word in enumerate(lookup.words)}
        registers = execute(lookup.table, {"$8": packed, **words})
        out = torch.tensor([registers[f"${index}"] for index in range(8)], dtype=torch.int32).to(torch.int16)
        assert torch.equal(out.view(dtype).reshape(2, 4), levels[codes])


@pytest.mark.parametrize("levels,kind", [(16, "table"), (8, "table"), (16, "int")])
def test_register_lookup_covers_every_code_in_every_position(monkeypatch, levels, kind):
    """Every code at each of the four byte positions: the table's selector and bit-3 mask of every lane (the
    8-level table has no mask), and the integer form's byte placement."""
    monkeypatch.setattr(kernel_codes, "INTERPRET", False)
    codebook = torch.linspace(-1, 1, levels) if kind == "table" else get_codebook("int", 4)
    lookup = kernel_codes.level_lookup(codebook, torch.bfloat16)
    if kind == "table":  # 8 levels: one pick per byte plane, no choice between two by bit 3
        assert ("lop3" in lookup.table) == (levels == 16)
    for code in range(levels):
        for position in range(4):
            codes = [(code + 5 * lane) % levels if lane != position else code for lane in range(4)]
            assert torch.equal(lookup_levels(lookup.table, codes, torch.bfloat16),
                               table_levels(codebook, lookup).bfloat16()[codes])


def test_integer_levels_are_found_only_where_exact():
    # float32 scales: 3.6e-7 and 1.2e-7 relative measured
    assert kernel_codes.integer_levels(get_codebook("int", 4)) == (-8, pytest.approx(1 / 7, rel=1e-6))
    assert kernel_codes.integer_levels(get_codebook("int", 2)) == (-2, 1.0)
    assert kernel_codes.integer_levels(0.25 * get_codebook("int", 3)) == (-4, pytest.approx(0.25 / 3, rel=5e-7))
    assert kernel_codes.integer_levels(get_codebook("nf", 4)) is None
    assert kernel_codes.integer_levels(torch.linspace(-1, 1, 16)) is None  # offset -7.5: not an integer
    assert kernel_codes.integer_levels(get_codebook("int", 4).flip(0)) is None  # descending


def test_lookup_follows_writes_to_the_codebook(monkeypatch):
    monkeypatch.setattr(kernel_codes, "INTERPRET", False)
    codebook = get_codebook("nf", 4).clone()
    before = kernel_codes.level_lookup(codebook)
    assert kernel_codes.level_lookup(codebook) is before  # cached: no read-back from the GPU on later calls
    codebook.mul_(0.5)
    after = kernel_codes.level_lookup(codebook)
    assert after.table != before.table
    assert lookup_levels(after.table, [0, 0, 0, 15], torch.float16)[3].item() == codebook[15].item()  # 0.5: exact


def test_no_table_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernel_codes, "INTERPRET", True)
    for kind in ("nf", "int"):
        lookup = kernel_codes.level_lookup(get_codebook(kind, 4))
        assert lookup.table is None
        # the float32 scale of int: 3.6e-7 measured
        torch.testing.assert_close(lookup.levels * lookup.scale, get_codebook(kind, 4), rtol=1e-6, atol=0)
