"""CUDA kernels for 4-bit codes on Hopper, the weight tile converted in registers and fed to wgmma from there:
gemv4.cu for one row of activations (the x-scaled A factor from shared memory, the rank as wgmma's N), gemm4.cu for
a few rows (the scale tile B A by wgmma, times the levels in registers, then times X; common.cuh holds what they
share).

GPU-only, like the Gluon kernels: the CPU interpreter cannot run them, so tests/gpu/ tests them on the H200 and
results/gpu_tests.md records the run. They are offered to lords_matmul (which times them against the Triton kernels
and keeps the fastest) where they were built and tested: a CUDA device of compute capability 9.0, an nvcc
(torch.utils.cpp_extension's CUDA_HOME, or on the PATH), bfloat16 inputs and scales, 4-bit codes, K a multiple of
128 and N of 16, rank at most 128. LORDS_CUDA=0 turns them off.

Each configuration (rank tiles, M tile, table or integer codebook) is compiled with nvcc the first time a layer needs
it, in about 5 s, and kept in LORDS_CUDA_CACHE (default ~/.cache/lords/cuda) under a hash of the sources and flags,
so later processes load it at once. The libraries are called through ctypes on torch's current stream, so the
launches are captured by CUDA graphs like any kernel.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..autotune import INTERPRET, processors
from ..codes import check_input, level_lookup
from ..stream_k import workspace

ENABLED = os.environ.get("LORDS_CUDA") != "0"
# wgmma's shared-memory descriptor: bytes between XA's core matrices along K and along the rank
DESCRIPTOR_OFFSETS = (128, 256)
SOURCES = Path(__file__).parent
CACHE = Path(os.environ.get("LORDS_CUDA_CACHE", Path.home() / ".cache" / "lords" / "cuda"))
MAX_RANK = 128
STEP_COLS = 128  # columns of K per step of the kernels
# gemm4 takes 2 .. GEMM4_MAX_ROWS rows, in M tiles of 8 .. 64 rows (8 * m_cores)
GEMM4_MAX_ROWS = 128
_failed: set[tuple] = set()


@functools.cache
def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    found = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return str(found) if found and found.exists() else shutil.which("nvcc")


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0) and _nvcc() is not None


def config(out_features: int, in_features: int, rank: int, sms: int, warps: int | None = None,
           splits: int | None = None) -> dict:
    """Launch shape: blocks of 8 warps (two warpgroups of 64 rows; 4 also built), two to a multiprocessor; the K
    steps split so that the grid fills them once."""
    warps = warps or 8
    row_blocks = -(-out_features // (warps * 16))
    splits = splits or max(1, min(in_features // STEP_COLS, 2 * sms // row_blocks))
    return dict(rank_tiles=-(-rank // 8), warps=warps, splits=splits, row_blocks=row_blocks)


def _build(name: str, defines: dict[str, int]) -> ctypes.CDLL:
    """lords/kernels/cuda/<name>.cu compiled with these macros, from the cache or built into it."""
    source = SOURCES / f"{name}.cu"
    # -arch=sm_90a with -shared emits compute_90 PTX, which has no wgmma: name the architecture-specific target
    flags = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC",
             *(f"-D{macro}={value}" for macro, value in defines.items())]
    text = source.read_bytes() + (SOURCES / "common.cuh").read_bytes()
    digest = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    path = CACHE / f"{name}_{'_'.join(str(v) for v in defines.values())}_{digest}.so"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
            built = Path(scratch, path.name)
            result = subprocess.run([_nvcc(), *flags, "-o", str(built), str(source)], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"nvcc failed on {source.name}: {result.stderr.strip()[-2000:]}")
            os.replace(built, path)  # atomic: a process running alongside sees all of it or none
    return ctypes.CDLL(str(path))


# Threads may build configurations at once (benchmarks do): each build writes its own temporary folder and renames
# the library into place, so two builds of one configuration both end with the same file.
@functools.cache
def library(rank_tiles: int, table: bool) -> ctypes.CDLL:
    """The gemv4 build for this many rank tiles of 8, with a level table or for an integer codebook."""
    built = _build("gemv4", {"LORDS_RANK_TILES": rank_tiles, "LORDS_TABLE": int(table)})
    built.lords_gemv4.restype = ctypes.c_int
    built.lords_gemv4.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int] * 5 + [
        ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return built


@functools.cache
def _occupancy(built: ctypes.CDLL) -> int:
    """Blocks of a gemm4 build a multiprocessor holds, 1 or 2 (gemm4_ready checks the workspace for 2)."""
    return min(2, max(1, built.lords_gemm4_blocks_per_sm()))


@functools.cache
def gemm4_library(rank_groups: int, m_cores: int, table: bool) -> ctypes.CDLL:
    """The gemm4 build for a rank padded to rank_groups x 16 and M tiles of m_cores x 8 rows."""
    built = _build("gemm4", {"LORDS_RANK_GROUPS": rank_groups, "LORDS_M_CORES": m_cores, "LORDS_TABLE": int(table)})
    built.lords_gemm4.restype = ctypes.c_int
    built.lords_gemm4.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int] * 5 + [
        ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_float, ctypes.c_void_p]
    return built


def _takes(x: torch.Tensor, bits: int, codes: torch.Tensor, scale_b: torch.Tensor, scale_a: torch.Tensor) -> bool:
    """What both kernels need of their inputs and device."""
    if not (ENABLED and not INTERPRET and x.is_cuda and bits == 4):
        return False
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    if not (x.dtype == scale_b.dtype == scale_a.dtype == torch.bfloat16 and rank <= MAX_RANK
            and in_features % STEP_COLS == 0 and out_features % 16 == 0 and codes.is_contiguous()
            and scale_a.is_contiguous() and scale_b.is_contiguous() and x.is_contiguous()):
        return False
    return _hopper(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _fits_workspace(device: torch.device, splits: int, values: int, counters: int) -> bool:
    """Whether a launch whose splits meet in the workspace (splits x values floats, counters counters) fits it."""
    sums, counts = workspace(device)
    return splits == 1 or (splits * values <= sums.numel() and counters <= counts.numel())


def gemv4_ready(x: torch.Tensor, bits: int, codes: torch.Tensor, scale_b: torch.Tensor,
                scale_a: torch.Tensor) -> bool:
    """Whether gemv4_matmul takes these inputs on this device."""
    if x.numel() != x.shape[-1] or not _takes(x, bits, codes, scale_b, scale_a):
        return False
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    launch = config(out_features, in_features, rank, processors(x.device))
    return ("gemv4", launch["rank_tiles"]) not in _failed and _fits_workspace(
        x.device, launch["splits"], out_features, launch["row_blocks"])


def gemv4_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None, descriptor_offsets=DESCRIPTOR_OFFSETS,
                 **launch_shape):
    """x (..., K) with one row -> (..., N), for inputs gemv4_ready accepts. launch_shape (warps, splits) overrides
    the default launch, for benchmarks."""
    check_input(x, scale_a)
    if not gemv4_ready(x, bits, codes, scale_b, scale_a):
        raise ValueError("the CUDA gemv4 kernel does not take these inputs here (see lords.kernels.cuda.gemv4_ready)")
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    launch = config(out_features, in_features, rank, processors(x.device), **launch_shape)
    if launch["warps"] not in (4, 8):
        raise ValueError(f"the CUDA gemv4 kernel is built for blocks of 4 or 8 warps, not {launch['warps']}")
    lookup = level_lookup(codebook, torch.bfloat16, "pairs")
    try:
        kernel = library(launch["rank_tiles"], not lookup.integer).lords_gemv4
    except (RuntimeError, OSError) as error:
        _failed.add(("gemv4", launch["rank_tiles"]))
        warnings.warn(f"lords: the CUDA gemv4 kernel failed to build and is off for rank tiles "
                      f"{launch['rank_tiles']}: {error}")
        raise RuntimeError("CUDA gemv4 kernel unavailable") from error
    y = torch.empty(out_features, device=x.device, dtype=x.dtype)
    xa = torch.empty(in_features // STEP_COLS * 512 * launch["rank_tiles"], device=x.device, dtype=torch.int32)
    sums, counts = workspace(x.device)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    levels = (ctypes.c_float * 16)(*lookup.values, *[0.0] * (16 - len(lookup.values)))
    error = kernel(codes.data_ptr(), x.data_ptr(), scale_a.data_ptr(), scale_b.data_ptr(),
                   None if bias is None else bias.data_ptr(), y.data_ptr(), sums.data_ptr(), counts.data_ptr(),
                   xa.data_ptr(), out_features, in_features, rank, launch["warps"], launch["splits"], levels,
                   lookup.offset, lookup.scale, *descriptor_offsets,
                   torch.cuda.current_stream(x.device).cuda_stream)
    if error:
        raise RuntimeError(f"the CUDA gemv4 kernel failed to launch: CUDA error {error}")
    return y.reshape(*x.shape[:-1], out_features)


def gemm4_config(rows: int, out_features: int, in_features: int, rank: int, sms: int, blocks_per_sm: int = 2,
                 splits: int | None = None) -> dict:
    """Launch shape of gemm4: blocks of 128 weight rows (two warpgroups), M tiles of 8, 16, 32 or 64 rows, the K steps
    split so that the grid fills the multiprocessors once, at blocks_per_sm blocks each (the build's occupancy:
    gemm4_matmul asks the library; two where registers and shared memory allow)."""
    m_cores = min(8, 1 << (-(-rows // 8) - 1).bit_length())
    m_tiles, row_blocks = -(-rows // (8 * m_cores)), -(-out_features // 128)
    splits = splits or max(1, min(in_features // STEP_COLS, blocks_per_sm * sms // (row_blocks * m_tiles)))
    return dict(rank_groups=-(-rank // 16), m_cores=m_cores, m_tiles=m_tiles, row_blocks=row_blocks, splits=splits)


def gemm4_ready(x: torch.Tensor, bits: int, codes: torch.Tensor, scale_b: torch.Tensor,
                scale_a: torch.Tensor) -> bool:
    """Whether gemm4_matmul takes these inputs on this device."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not (2 <= rows <= GEMM4_MAX_ROWS and _takes(x, bits, codes, scale_b, scale_a)):
        return False
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    launch = gemm4_config(rows, out_features, in_features, rank, processors(x.device))
    return ("gemm4", launch["rank_groups"], launch["m_cores"]) not in _failed and _fits_workspace(
        x.device, launch["splits"], rows * out_features, launch["row_blocks"] * launch["m_tiles"])


def gemm4_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None, **launch_shape):
    """x (..., K) with 2 .. GEMM4_MAX_ROWS rows -> (..., N), for inputs gemm4_ready accepts. launch_shape (splits)
    overrides the default launch, for benchmarks."""
    check_input(x, scale_a)
    if not gemm4_ready(x, bits, codes, scale_b, scale_a):
        raise ValueError("the CUDA gemm4 kernel does not take these inputs here (see lords.kernels.cuda.gemm4_ready)")
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    rows = x.numel() // in_features
    lookup = level_lookup(codebook, torch.bfloat16, "pairs")
    shape = gemm4_config(rows, out_features, in_features, rank, 1)  # the build's parameters, not its launch
    key = (shape["rank_groups"], shape["m_cores"])
    try:
        built = gemm4_library(*key, not lookup.integer)
    except (RuntimeError, OSError) as error:
        _failed.add(("gemm4", *key))
        warnings.warn(f"lords: the CUDA gemm4 kernel failed to build and is off for (rank groups, M cores) {key}: "
                      f"{error}")
        raise RuntimeError("CUDA gemm4 kernel unavailable") from error
    sms = processors(x.device)
    launch = gemm4_config(rows, out_features, in_features, rank, sms, _occupancy(built), **launch_shape)
    if not _fits_workspace(x.device, launch["splits"], rows * out_features, launch["row_blocks"] * launch["m_tiles"]):
        raise ValueError(f"the CUDA gemm4 kernel's {launch['splits']} splits of {rows} x {out_features} outputs do "
                         "not fit the stream-K workspace")
    y = torch.empty(rows, out_features, device=x.device, dtype=x.dtype)
    scratch = torch.empty(built.lords_gemm4_a_words(in_features) + built.lords_gemm4_x_words(in_features, rows),
                          device=x.device, dtype=torch.int32)
    sums, counts = workspace(x.device)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    levels = (ctypes.c_float * 16)(*lookup.values, *[0.0] * (16 - len(lookup.values)))
    error = built.lords_gemm4(codes.data_ptr(), x.data_ptr(), scale_a.data_ptr(), scale_b.data_ptr(),
                              None if bias is None else bias.data_ptr(), y.data_ptr(), sums.data_ptr(),
                              counts.data_ptr(), scratch.data_ptr(), out_features, in_features, rows, rank,
                              launch["splits"], levels, lookup.offset, lookup.scale,
                              torch.cuda.current_stream(x.device).cuda_stream)
    if error:
        raise RuntimeError(f"the CUDA gemm4 kernel failed to launch: CUDA error {error}")
    return y.reshape(*x.shape[:-1], out_features)
