"""The fused Triton forward against a float64 reference, run by Triton's interpreter on the CPU."""

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lords.codebooks import get_codebook  # noqa: E402
from lords.kernels import (MAX_ROWS, decode_matmul, decode_xa_matmul, dequant_matmul, dequantize,  # noqa: E402
                           fused_matmul, grouped_decode_matmul, grouped_tiled_matmul, lords_matmul, sort_by_expert,
                           tiled_matmul)
from lords.linear import LoRDSLinear  # noqa: E402
from lords.packing import pack_codes  # noqa: E402

if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("kernel tests run under TRITON_INTERPRET=1", allow_module_level=True)


def reference(x, codes, codebook, scale_b, scale_a, bias):
    weight = (scale_b.double() @ scale_a.double()) * codebook.double()[codes.long()]
    out = x.double() @ weight.T
    return out if bias is None else out + bias.double()


def random_problem(bits, kind, m, n, k, rank, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=generator, dtype=torch.uint8)
    scale_b = torch.rand(n, rank, generator=generator) + 0.1
    scale_a = torch.rand(rank, k, generator=generator) + 0.1
    bias = torch.randn(n, generator=generator) if m % 2 else None
    x = torch.randn(m, k, generator=generator)
    return x, codes, get_codebook(kind, bits), scale_b, scale_a, bias


BITS_AND_CODEBOOKS = [(4, "nf"), (3, "nf"), (2, "nf"), (4, "int"), (3, "int"), (2, "int")]
# Odd sizes, K not a multiple of the tile, rank 1 and ranks that are not multiples of 16.
# K = 37 leaves the last segment short at every bit width; K = 300 takes several BLOCK_J steps, which the interpreter's
# three programs share out so that one program ends a tile and starts the next (M = 20: over two M tiles as well).
SHAPES = [(1, 24, 40, 1), (4, 33, 72, 17), (19, 16, 64, 3), (3, 10, 37, 2), (5, 33, 72, 17), (2, 18, 300, 5),
          (20, 18, 300, 5)]


@pytest.mark.parametrize("kernel", [tiled_matmul, decode_matmul, decode_xa_matmul, fused_matmul, lords_matmul,
                                    dequant_matmul],
                         ids=["tiled", "decode", "decode-xa", "fused", "lords", "dequantize+matmul"])
@pytest.mark.parametrize("bits,kind", BITS_AND_CODEBOOKS)
@pytest.mark.parametrize("m,n,k,rank", SHAPES)
def test_forward_matches_float64(kernel, bits, kind, m, n, k, rank):
    if kernel in (decode_matmul, decode_xa_matmul) and m > MAX_ROWS:
        pytest.skip("the decode kernel takes a few rows only")
    x, codes, codebook, scale_b, scale_a, bias = random_problem(bits, kind, m, n, k, rank, seed=bits * 100 + m)
    out = kernel(x, pack_codes(codes, bits), codebook, scale_b, scale_a, bits, bias)
    expected = reference(x, codes, codebook, scale_b, scale_a, bias)
    assert out.shape == (m, n) and torch.isfinite(out).all()
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-6  # measured up to 4.1e-7 over the cases


@pytest.mark.parametrize("bits,kind", BITS_AND_CODEBOOKS)
# K = 300: several steps a tile, so the interpreter's three programs share tiles across groups
@pytest.mark.parametrize("n,k,rank", [(24, 40, 1), (33, 72, 17), (9, 300, 3)])
def test_grouped_decode_matches_float64(bits, kind, n, k, rank):
    """Row g through stacked matrix experts[g]: experts repeated, one unused, out of order."""
    generator = torch.Generator().manual_seed(bits + n)
    codes = torch.randint(0, 2**bits, (4, n, k), generator=generator, dtype=torch.uint8)
    scale_b, scale_a = torch.rand(4, n, rank, generator=generator) + 0.1, torch.rand(4, rank, k, generator=generator)
    experts, x = torch.tensor([2, 0, 2, 3, 0]), torch.randn(5, k, generator=generator)
    codebook = get_codebook(kind, bits)
    packed = torch.stack([pack_codes(expert_codes, bits) for expert_codes in codes])
    out = grouped_decode_matmul(x, experts, packed, codebook, scale_b, scale_a, bits)
    weights = (scale_b.double() @ scale_a.double()) * codebook.double()[codes.long()]
    expected = torch.einsum("gnk,gk->gn", weights[experts], x.double())
    assert out.shape == (5, n) and out.dtype == torch.float32
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6  # measured 6e-8 to 1.1e-7


def test_grouped_decode_refuses_a_row_count_other_than_the_experts():
    x, experts = torch.randn(3, 16), torch.tensor([0, 1])
    stack = torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 1), torch.zeros(2, 1, 16)
    with pytest.raises(ValueError, match=r"^grouped decoding takes rows \(G, K\) and one expert index per row, "
                                         r"got \(3, 16\) and \(2,\)$"):
        grouped_decode_matmul(x, experts, stack[0], get_codebook("nf", 4), stack[1], stack[2], 4)


def test_sort_by_expert_pads_each_experts_run_to_the_tile():
    rows = sort_by_expert(torch.tensor([2, 0, 2, 3, 0, 2]), num_experts=5, pad_rows=4)
    # expert 0: pairs 1, 4; expert 2: 0, 2, 5; expert 3: 3; experts 1 and 4: none. 6 + 5 * 3 rows: any routing fits
    assert rows.tolist() == [1, 4, -1, -1, 0, 2, 5, -1, 3, -1, -1, -1] + [-1] * 9
    assert sort_by_expert(torch.zeros(6, dtype=torch.long), 5, 4).tolist() == [0, 1, 2, 3, 4, 5] + [-1] * 15


def random_stack_problem(bits, kind, experts, n, k, rank, seed):
    """x, packed codes, codebook, scales of a stack of 4 matrices, and the float64 x[t] W[experts[t, j]]^T."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (4, n, k), generator=generator, dtype=torch.uint8)
    scale_b, scale_a = torch.rand(4, n, rank, generator=generator) + 0.1, torch.rand(4, rank, k, generator=generator)
    x, codebook = torch.randn(experts.shape[0], k, generator=generator), get_codebook(kind, bits)
    packed = torch.stack([pack_codes(expert_codes, bits) for expert_codes in codes])
    weights = (scale_b.double() @ scale_a.double()) * codebook.double()[codes.long()]
    return x, packed, codebook, scale_b, scale_a, torch.einsum("tjnk,tk->tjn", weights[experts], x.double())


# 13 tokens at top-2: expert 0 gets 17 pairs (two M tiles of the interpreter's 16 rows, the second nearly empty),
# expert 1 none, experts 2 and 3 a part of a tile each
ROUTING = torch.tensor([[0, 2]] * 6 + [[3, 0]] * 3 + [[0, 2], [2, 0], [0, 0], [0, 0]])


@pytest.mark.parametrize("bits,kind", BITS_AND_CODEBOOKS)
def test_grouped_tiled_matches_float64(bits, kind):
    x, packed, codebook, scale_b, scale_a, expected = random_stack_problem(bits, kind, ROUTING, 33, 72, 17, bits)
    out = grouped_tiled_matmul(x, ROUTING, packed, codebook, scale_b, scale_a, bits)
    assert out.shape == (13, 2, 33) and out.dtype == torch.float32
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6  # measured 1.0e-7 to 3.7e-7


def test_grouped_tiled_with_every_token_on_one_expert():
    """19 tokens on expert 2 (two M tiles, the second of 3 rows); K = 300: several steps a tile, shared by the
    interpreter's three programs across M and N tiles."""
    experts = torch.full((19, 1), 2)
    x, packed, codebook, scale_b, scale_a, expected = random_stack_problem(4, "nf", experts, 24, 300, 3, 0)
    out = grouped_tiled_matmul(x, experts, packed, codebook, scale_b, scale_a, 4)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-6  # measured 1.1e-7


def test_grouped_tiled_refuses_experts_of_another_row_count():
    x, experts = torch.randn(3, 16), torch.tensor([[0], [1]])
    stack = torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 1), torch.zeros(2, 1, 16)
    with pytest.raises(ValueError, match=r"^a grouped matmul takes rows \(T, K\) and the experts of each row "
                                         r"\(T, k\), got \(3, 16\) and \(2, 1\)$"):
        grouped_tiled_matmul(x, experts, stack[0], get_codebook("nf", 4), stack[1], stack[2], 4)


@pytest.mark.parametrize("bits,kind", BITS_AND_CODEBOOKS)
# k = 300: segments of 75-150 byte columns, split over several programs, the last one's tile partial
@pytest.mark.parametrize("n,k,rank", [(24, 40, 1), (33, 72, 17), (10, 37, 2), (9, 300, 3)])
def test_dequantize_matches_float64(bits, kind, n, k, rank):
    _, codes, codebook, scale_b, scale_a, _ = random_problem(bits, kind, 1, n, k, rank, seed=bits + n)
    weight = dequantize(pack_codes(codes, bits), codebook, scale_b, scale_a, bits, torch.float32)
    expected = (scale_b.double() @ scale_a.double()) * codebook.double()[codes.long()]
    assert weight.shape == (n, k) and weight.dtype == torch.float32
    assert ((weight.double() - expected).norm() / expected.norm()).item() < 1e-6  # measured up to 3.4e-7


@pytest.mark.parametrize("kernel", [fused_matmul, lords_matmul], ids=["fused", "lords"])
@pytest.mark.parametrize("m", [2, 9, 70])
def test_half_precision_activations(kernel, m):
    """fp16 X through every kernel (decode at m = 2, tiled at 9, dequantize + matmul at 70), within fp16 rounding.

    bf16 is checked on the GPU by benchmarks/kernels.py: Triton 3.9's interpreter returns garbage for a bf16 tl.dot.
    """
    x, codes, codebook, scale_b, scale_a, bias = random_problem(4, "nf", m, 40, 64, 5, seed=m)
    out = kernel(x.half(), pack_codes(codes, 4), codebook, scale_b, scale_a, 4, bias)
    expected = reference(x.half(), codes, codebook, scale_b, scale_a, bias)
    assert out.dtype == torch.float16 and out.shape == (m, 40)
    # measured 2.7e-4 to 3.6e-4 (the fp16 output's rounding, unit roundoff 4.9e-4); 2e-3 is 5.5x the largest
    assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-3


def test_layer_dispatch_triton_equals_torch_reference():
    layer = LoRDSLinear(48, 20, bits=3, rank=5, bias=True, scale_dtype=torch.float32)
    with torch.no_grad():
        layer.codes.copy_(pack_codes(torch.randint(0, 8, (20, 48), dtype=torch.uint8), 3))
        layer.scale_b.copy_(torch.rand(20, 5))
        layer.scale_a.copy_(torch.rand(5, 48))
        layer.bias.copy_(torch.randn(20))
    x = torch.randn(2, 3, 48)
    layer.backend = "torch"
    expected = layer(x)
    for backend in ("triton", "fused"):
        layer.backend = backend
        out = layer(x)
        assert out.shape == (2, 3, 20)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5), backend  # measured 3.8e-6 at most


def test_lords_matmul_times_the_candidates_once_per_shape(monkeypatch):
    import lords.kernels as kernels

    timed = []
    fake_times = [3.0, 4.0, 1.0, 2.0]  # decode, decode-xa, tiled, dequant: the tiled kernel "wins"
    monkeypatch.setattr(kernels, "_can_time", lambda x: True)
    monkeypatch.setattr(kernels, "gpu_time",
                        lambda fn: fake_times[(len(timed) - 1) % 4] if not timed.append(fn) else None)
    monkeypatch.setattr(kernels, "_choices", {})
    x, codes, codebook, scale_b, scale_a, bias = random_problem(4, "nf", 2, 24, 40, 2, seed=0)
    for _ in range(2):
        out = lords_matmul(x, pack_codes(codes, 4), codebook, scale_b, scale_a, 4, bias)
        assert len(timed) == 4  # the second call reuses the choice
        assert list(kernels._choices.values()) == ["tiled"]
        expected = reference(x, codes, codebook, scale_b, scale_a, bias)
        assert ((out.double() - expected).norm() / expected.norm()).item() < 5e-7  # measured 6.7e-8
    # an integer codebook decodes without a table: the same shape is timed again for it
    lords_matmul(x, pack_codes(codes, 4), get_codebook("int", 4), scale_b, scale_a, 4, bias)
    assert len(timed) == 8 and len(kernels._choices) == 2
    # X*A once per call is a candidate for one or two rows only
    assert kernels.candidates(3, 49) == ["decode", "tiled", "dequant"] and "decode-xa" in kernels.candidates(2, 49)


def test_lords_matmul_choice_is_kept_on_disk_for_the_next_process(monkeypatch, tmp_path):
    import lords.kernels as kernels
    from lords.kernels import autotune

    monkeypatch.setattr(autotune, "TUNING_CACHE", True)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    timed = []
    fake_times = [3.0, 4.0, 1.0, 2.0]  # decode, decode-xa, tiled, dequant: the tiled kernel "wins"
    monkeypatch.setattr(kernels, "_can_time", lambda x: True)
    monkeypatch.setattr(kernels, "gpu_time", lambda fn: timed.append(fn) or fake_times[(len(timed) - 1) % 4])
    x, codes, codebook, scale_b, scale_a, bias = random_problem(4, "nf", 2, 24, 40, 2, seed=0)
    packed = pack_codes(codes, 4)
    expected = reference(x, codes, codebook, scale_b, scale_a, bias)

    def first_call() -> None:  # as in a new process: no choice in memory
        monkeypatch.setattr(kernels, "_choices", {})
        out = lords_matmul(x, packed, codebook, scale_b, scale_a, 4, bias)
        assert list(kernels._choices.values()) == ["tiled"]
        assert ((out.double() - expected).norm() / expected.norm()).item() < 5e-7  # measured 6.7e-8

    first_call()
    (entry,) = tmp_path.rglob("lords_matmul.json")
    stored = json.loads(entry.read_text())
    assert len(timed) == 4 and stored["choice"] == "tiled" and stored["times_ms"]["dequant"] == 2.0
    first_call()
    assert len(timed) == 4  # read from disk, not timed
    key = (2, 24, 40, 4, x.dtype, False)
    assert autotune.load_choice(key, "cpu") == "tiled" and autotune.load_choice(key, "another GPU") is None
    entry.write_text('{"choice": ')  # damaged: timed again and written whole
    first_call()
    assert len(timed) == 8 and json.loads(entry.read_text())["choice"] == "tiled"
    entry.write_text('{"choice": "no such kernel"}')  # not a candidate: timed again
    first_call()
    assert len(timed) == 12
    monkeypatch.setattr(autotune, "TUNING_CACHE", False)  # LORDS_TUNING_CACHE=0: nothing read
    first_call()
    assert len(timed) == 16


def test_decode_is_no_candidate_where_every_config_spills():
    """Rank 99 (28672 x 8192 at b = 64) pads to 128: at 3-4 rows every decode config holds more than MAX_VALUES a
    thread, which fits_registers would otherwise answer with its smallest, spilling config."""
    from lords.kernels import candidates, decode, default_choice
    from lords.kernels.codes import rank_pad

    def spills_by_pruning(rows, rank):  # what the autotuner's pruning keeps all holds too much a thread
        m_pad = 1 << (rows - 1).bit_length()
        kept = decode.fits_registers(decode.CONFIGS, {}, M_PAD=m_pad, RANK_PAD=rank_pad(rank))
        return all(decode.values_per_thread(config, m_pad, rank_pad(rank)) > decode.MAX_VALUES for config in kept)

    for rows in range(1, decode.MAX_ROWS + 1):
        for rank in (1, 13, 49, 64, 99, 128, 200, 300):
            assert decode.spills(rows, rank) == spills_by_pruning(rows, rank), (rows, rank)
            assert ("decode" in candidates(rows, rank)) == (not decode.spills(rows, rank))
    assert candidates(4, 99) == ["tiled", "dequant"] and candidates(4, 49)[0] == "decode"
    assert candidates(2, 99)[:2] == ["decode", "decode-xa"] and candidates(1, 300) == ["tiled", "dequant"]
    assert default_choice(1, 300) == "tiled" and default_choice(1, 49) == "decode"


def test_lords_matmul_leaves_out_a_kernel_whose_timing_fails(monkeypatch):
    import lords.kernels as kernels

    def fake_time(fn):
        calls.append(fn)
        if len(calls) == 3:  # the tiled kernel, the fastest by the times below, cannot be captured
            raise RuntimeError("operation not permitted when stream is capturing")
        return {1: 3.0, 2: 4.0, 4: 2.0}[len(calls)]

    calls = []
    monkeypatch.setattr(kernels, "_can_time", lambda x: True)
    monkeypatch.setattr(kernels, "gpu_time", fake_time)
    monkeypatch.setattr(kernels, "_choices", {})
    x, codes, codebook, scale_b, scale_a, bias = random_problem(4, "nf", 2, 24, 40, 2, seed=0)
    with pytest.warns(UserWarning, match="tiled kernel left out"):
        out = lords_matmul(x, pack_codes(codes, 4), codebook, scale_b, scale_a, 4, bias)
    assert list(kernels._choices.values()) == ["dequant"]
    expected = reference(x, codes, codebook, scale_b, scale_a, bias)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 5e-7  # measured 7.9e-8


def test_kernels_take_parameters_that_require_grad():
    """LoRDSLinear's scales are Parameters: the kernels compute no gradient but must accept them as they are."""
    x, codes, codebook, scale_b, scale_a, bias = random_problem(4, "nf", 2, 24, 40, 3, seed=0)
    scale_b, scale_a = torch.nn.Parameter(scale_b), torch.nn.Parameter(scale_a)
    expected = reference(x, codes, codebook, scale_b.detach(), scale_a.detach(), bias)
    for kernel in (decode_matmul, decode_xa_matmul, tiled_matmul, dequant_matmul):
        out = kernel(x.requires_grad_(), pack_codes(codes, 4), codebook, scale_b, scale_a, 4, bias)
        assert ((out.double() - expected).norm() / expected.norm()).item() < 5e-7  # measured 7.9e-8


def test_decode_refuses_many_rows():
    with pytest.raises(ValueError, match="decode kernel takes at most 4 rows"):
        decode_matmul(torch.randn(5, 16), torch.zeros(4, 8, dtype=torch.uint8), get_codebook("nf", 4),
                      torch.ones(4, 1), torch.ones(1, 16), 4)


def test_autotune_keys_hold_the_level_lookup():
    """An integer codebook (no table) and a table have different fastest configs: a layer must not reuse the config
    tuned for another codebook of its shape."""
    from lords.kernels import backward, decode, forward

    for kernel in (decode._decode, forward._tiled, forward._dequantize, backward._scale_grad):
        assert "TABLE" in kernel.autotuner.keys and "BITS" in kernel.autotuner.keys
    assert "XA_ONCE" in decode._decode.autotuner.keys  # the two decode variants are tuned apart too


def test_decode_config_pruning_keeps_register_budget():
    import triton

    from lords.kernels.decode import CONFIGS, fits_registers

    def per_thread(config):
        return 4 * 128 * max(config.kwargs["BLOCK_N"], config.kwargs["BLOCK_J"]) / (32 * config.num_warps)

    kept = fits_registers(CONFIGS, {}, M_PAD=4, RANK_PAD=128)
    # within ~128 values a thread, or, where none is, every programs-per-SM choice of the smallest tile
    assert kept and (all(per_thread(c) <= 128 for c in kept)
                     or kept == [c for c in CONFIGS if per_thread(c) == min(map(per_thread, CONFIGS))])
    assert len(fits_registers(CONFIGS, {}, M_PAD=1, RANK_PAD=16)) == len(CONFIGS)
    huge = [triton.Config({"BLOCK_N": 256, "BLOCK_J": 256, "PER_SM": 1}, num_warps=1)]
    assert fits_registers(huge, {}, M_PAD=4, RANK_PAD=128) == huge


@pytest.mark.parametrize("rows", [2, 8])
@pytest.mark.parametrize("matmul", [lords_matmul, fused_matmul])
def test_wrong_input_width_is_named(matmul, rows):
    with pytest.raises(ValueError, match="input has 10 features, the layer expects 16"):
        matmul(torch.randn(rows, 10), torch.zeros(4, 8, dtype=torch.uint8), get_codebook("nf", 4),
               torch.ones(4, 1), torch.ones(1, 16), 4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("matmul", [decode_matmul, decode_xa_matmul, tiled_matmul, dequant_matmul, lords_matmul])
def test_integer_input_is_named(matmul, dtype):
    with pytest.raises(TypeError, match=f"floating-point inputs, got {dtype}"):
        matmul(torch.zeros(2, 16, dtype=dtype), torch.zeros(4, 8, dtype=torch.uint8), get_codebook("nf", 4),
               torch.ones(4, 1), torch.ones(1, 16), 4)


def test_compile_only_runs_nothing_and_restores_launches(monkeypatch):
    from lords.kernels import decode
    from lords.kernels.autotune import compile_only

    runs = []
    run = decode._decode.autotuner.fn.run
    monkeypatch.setattr(decode._decode.autotuner.fn, "run",  # a warmup only compiles
                        lambda *args, **kwargs: runs.append(kwargs.get("warmup", False)) or run(*args, **kwargs))
    x, codes, codebook, scale_b, scale_a, _ = random_problem(4, "nf", 2, 24, 40, 3, seed=0)
    packed = pack_codes(codes, 4)
    with compile_only():
        decode_matmul(x, packed, codebook, scale_b, scale_a, 4)
    assert runs == [True]
    out = decode_matmul(x, packed, codebook, scale_b, scale_a, 4)
    assert runs == [True, False]
    expected = reference(x, codes, codebook, scale_b, scale_a, None)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 5e-7  # measured 7.3e-8


def test_launcher_reuses_a_compiled_launch_only_for_the_same_kind():
    """After a kind's first launch (through Triton: autotuning, compiling), the next of that kind goes to the kept
    compiled kernel with every argument in signature order, the config's included; a different dtype, alignment or
    argument value goes through Triton again. Triton's parts are stand-ins: the interpreter compiles nothing."""
    from types import SimpleNamespace

    import triton
    from triton.compiler import CompiledKernel

    from lords.kernels.autotune import Launcher

    class Compiled(CompiledKernel):
        def __init__(self):  # nothing to load, nothing to unload
            self.launches = []

        def __del__(self):
            pass

        def __getitem__(self, grid):
            return lambda *args: self.launches.append((grid, args))

    class Autotuner:
        fn = SimpleNamespace(arg_names=["x_ptr", "N", "SCALE", "BLOCK"])
        best_config = triton.Config({"BLOCK": 32})
        compiled, runs = Compiled(), 0

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.runs += 1
                return self.compiled

            return run

    autotuner = Autotuner()
    launcher = Launcher(autotuner)

    def grid(meta):
        return (meta["N"] // meta["BLOCK"],)

    x = torch.zeros(65)
    assert launcher[grid](x, 64, SCALE=0.5) is autotuner.compiled and autotuner.runs == 1
    launcher[grid](x, 64, SCALE=0.5)
    assert autotuner.runs == 1 and autotuner.compiled.launches == [((2, 1, 1), (x, 64, 0.5, 32))]
    for other in ((x[1:], 64), (x.double(), 64), (x, 128)):
        launcher[grid](*other, SCALE=0.5)
    assert autotuner.runs == 4 and len(autotuner.compiled.launches) == 1
    launcher[grid](x.clone(), 128, SCALE=0.5)
    assert autotuner.runs == 4 and autotuner.compiled.launches[-1][0] == (4, 1, 1)


@pytest.mark.parametrize("bits,kind", BITS_AND_CODEBOOKS)
@pytest.mark.parametrize("per_sm,w_left", [(0, False), (3, True), (0, True)])
def test_tiled_grid_and_orientation_match_float64(monkeypatch, bits, kind, per_sm, w_left):
    """PER_SM = 0: a grid of whole tiles instead of one wave sharing the K steps. W_LEFT: Y^T = W X^T, the weight
    tile on the left of the dot (the interpreter's own config has it on the right)."""
    import triton

    from lords.kernels import forward

    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_J": 32, "PER_SM": per_sm, "W_LEFT": w_left},
                           num_warps=4, num_stages=1)
    monkeypatch.setattr(forward._tiled.autotuner, "configs", [config])
    for m, n, k, rank in [(21, 18, 300, 5), (1, 33, 72, 17), (3, 10, 37, 2)]:
        x, codes, codebook, scale_b, scale_a, bias = random_problem(bits, kind, m, n, k, rank, seed=bits + m)
        out = tiled_matmul(x, pack_codes(codes, bits), codebook, scale_b, scale_a, bits, bias)
        expected = reference(x, codes, codebook, scale_b, scale_a, bias)
        assert out.shape == (m, n)
        assert ((out.double() - expected).norm() / expected.norm()).item() < 2e-6  # measured up to 3.7e-7


def test_precompile_launches_are_what_lords_matmul_runs():
    from lords.kernels.precompile import compile_launches
    from lords.model import kernel_launches

    model = torch.nn.Sequential(LoRDSLinear(40, 24, 4, 3), torch.nn.ReLU(), LoRDSLinear(24, 33, 3, 5, bias=True))
    launches = kernel_launches(model, rows=(1, 16, 300), dtype=torch.float32)
    # decode up to MAX_ROWS rows, tiled up to 256, dequantize + cuBLAS always; per layer
    assert [(name, n, m) for name, n, _, m, *_ in launches] == [
        (name, n, m) for n in (24, 33)
        for name, m in [("decode", 1), ("decode-xa", 1), ("tiled", 1), ("dequant", 1), ("tiled", 16), ("dequant", 16),
                        ("dequant", 300)]]
    name, n, k, m, bits, rank, levels, dtype, scale_dtype, bias = launches[-1]
    assert (k, bits, rank, dtype, scale_dtype, bias) == (24, 3, 5, torch.float32, torch.bfloat16, True)
    assert levels == (tuple(get_codebook("nf", 3).tolist()), torch.float32)
    # a codebook cast with its model keeps its dtype in the launch: on the GPU the kernels take it as it is
    model.to(torch.bfloat16)
    assert kernel_launches(model, rows=(1,))[-1][6][1] == torch.bfloat16
    # every launch's tensors pass the wrappers' checks (widths, row limits)
    compile_launches(launches, device="cpu")


def test_precompile_runs_from_a_script_without_a_main_guard(tmp_path):
    # A spawned multiprocessing pool re-runs the calling script in each worker: without the guard the workers started
    # pools of their own and the call never returned (seen on the H200 with a benchmark script, 2026-12-03).
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        import torch
        from lords.linear import LoRDSLinear
        from lords.model import kernel_launches
        from lords.kernels.precompile import precompile

        model = torch.nn.Sequential(LoRDSLinear(40, 24, 4, 3), LoRDSLinear(24, 33, 3, 5, bias=True))
        seconds = precompile(kernel_launches(model, rows=(1, 16), dtype=torch.float32), workers=2, device="cpu")
        print("compiled", seconds > 0)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert (done.returncode, done.stdout) == (0, "compiled True\n"), done.stderr[-2000:]


def test_precompile_names_a_failed_worker():
    from lords.kernels.precompile import precompile

    launch = ("no-such-kernel", 24, 40, 1, 4, 3, ((0.0,), torch.float32), torch.float32, torch.float32, False)
    with pytest.raises(RuntimeError, match=r"^precompiling the LoRDS kernels failed in a worker process: "
                                           r"KeyError: 'no-such-kernel'$"):
        precompile([launch], workers=1, device="cpu")


def test_w_left_configs_serve_small_row_counts_only():
    from lords.kernels import forward

    kept = {m: forward.w_left_small_m(forward.TILED_CONFIGS, {}, M_BUCKET=m) for m in (1, 32, 64, 2048)}
    assert any(c.kwargs["W_LEFT"] for c in kept[1]) and any(c.kwargs["W_LEFT"] for c in kept[32])
    assert kept[64] and not any(c.kwargs["W_LEFT"] for c in kept[64] + kept[2048])
    assert len(kept[1]) == len(forward.TILED_CONFIGS)


@pytest.mark.parametrize("n,k,rank", [(14336, 4096, 49), (4096, 14336, 49), (4096, 4096, 32), (1024, 4096, 12),
                                      (28672, 8192, 99), (16, 128, 1), (2048, 1024, 128)])
def test_gemv4_launch_fits_the_kernel_and_one_wave(n, k, rank):
    """The CUDA kernel's launch shape (lords.kernels.cuda.config): 16 rows a warp, at most two blocks per
    multiprocessor unless the row blocks alone exceed them, and every split at least one 128-column step."""
    from lords.kernels.cuda import config

    launch = config(n, k, rank, 132)
    assert launch["rank_tiles"] == -(-rank // 8)
    assert launch["row_blocks"] == -(-n // (launch["warps"] * 16))
    assert 1 <= launch["splits"] <= k // 128
    assert launch["row_blocks"] * launch["splits"] <= max(2 * 132, launch["row_blocks"])


@pytest.mark.parametrize("rows", [2, 8, 9, 16, 17, 33, 64, 65, 128])
@pytest.mark.parametrize("n,k,rank", [(14336, 4096, 49), (4096, 14336, 49), (28672, 8192, 99), (384, 128, 1),
                                      (2048, 1024, 128)])
def test_gemm4_launch_covers_the_rows_once_and_fills_one_wave(n, k, rank, rows):
    """gemm4's launch shape (lords.kernels.cuda.gemm4_config): the smallest M tile of 8-64 rows that holds the rows
    (64-row tiles beyond), 128 weight rows a block, a rank group per 16, and splits of at least one 128-column step
    that fill two blocks a multiprocessor at most once."""
    from lords.kernels.cuda import gemm4_config

    launch = gemm4_config(rows, n, k, rank, 132)
    tile = 8 * launch["m_cores"]
    assert launch["m_cores"] in (1, 2, 4, 8) and launch["m_tiles"] == -(-rows // tile)
    assert tile >= rows or tile == 64
    assert tile == 8 or tile // 2 < rows  # no smaller tile would do
    assert launch["rank_groups"] == -(-rank // 16) and launch["row_blocks"] == -(-n // 128)
    assert 1 <= launch["splits"] <= k // 128
    blocks = launch["row_blocks"] * launch["m_tiles"]
    assert blocks * launch["splits"] <= max(2 * 132, blocks)


def test_gemm4_is_not_offered_off_the_gpu():
    from lords.kernels.cuda import gemm4_ready

    x = torch.randn(16, 256, dtype=torch.bfloat16)
    scale_b, scale_a = torch.ones(64, 8, dtype=torch.bfloat16), torch.ones(8, 256, dtype=torch.bfloat16)
    assert not gemm4_ready(x, 4, torch.zeros(64, 128, dtype=torch.uint8), scale_b, scale_a)


def test_gemv4_is_not_offered_off_the_gpu():
    from lords.kernels.cuda import gemv4_ready

    x = torch.randn(1, 256, dtype=torch.bfloat16)
    scale_b, scale_a = torch.ones(64, 8, dtype=torch.bfloat16), torch.ones(8, 256, dtype=torch.bfloat16)
    assert not gemv4_ready(x, 4, torch.zeros(64, 128, dtype=torch.uint8), scale_b, scale_a)
