"""A CUDA kernel for one row of activations at 4 bits (gemv4.cu): the weight tile, converted in registers, feeds
Hopper's wgmma with the x-scaled A factor from shared memory.

GPU-only, like the Gluon kernels: the CPU interpreter cannot run it, so tests/gpu/ tests it on the H200 and
results/gpu_tests.md records the run. It is offered to lords_matmul (which times it against the Triton kernels and
keeps the faster) where it was built and tested: a CUDA device of compute capability 9.0, an nvcc
(torch.utils.cpp_extension's CUDA_HOME, or on the PATH), bfloat16 inputs and scales, 4-bit codes, K a multiple of
128 and N of 16, rank at most 128. LORDS_CUDA=0 turns it off.

Each configuration (rank tiles, table or integer codebook) is compiled with nvcc the first time a layer needs it, in
about 5 s, and kept in LORDS_CUDA_CACHE (default ~/.cache/lords/cuda) under a hash of the source and flags, so later
processes load it at once. The library is called through ctypes on torch's current stream, so the launch is captured
by CUDA graphs like any kernel.
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
SOURCE = Path(__file__).with_name("gemv4.cu")
CACHE = Path(os.environ.get("LORDS_CUDA_CACHE", Path.home() / ".cache" / "lords" / "cuda"))
MAX_RANK = 128
STEP_COLS = 128  # columns of K per step of the kernel
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


def _library(rank_tiles: int, table: bool) -> ctypes.CDLL:
    # -arch=sm_90a with -shared emits compute_90 PTX, which has no wgmma: name the architecture-specific target
    flags = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC",
             f"-DLORDS_RANK_TILES={rank_tiles}", f"-DLORDS_TABLE={int(table)}"]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    path = CACHE / f"gemv4_{rank_tiles}_{int(table)}_{digest}.so"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
            built = Path(scratch, path.name)
            result = subprocess.run([_nvcc(), *flags, "-o", str(built), str(SOURCE)], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"nvcc failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
            os.replace(built, path)  # atomic: a process running alongside sees all of it or none
    library = ctypes.CDLL(str(path))
    library.lords_gemv4.restype = ctypes.c_int
    library.lords_gemv4.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int] * 5 + [
        ctypes.POINTER(ctypes.c_float), ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return library


# Threads may build configurations at once (benchmarks do): each build writes its own temporary folder and renames
# the library into place, so two builds of one configuration both end with the same file.
library = functools.cache(_library)


def gemv4_ready(x: torch.Tensor, bits: int, codes: torch.Tensor, scale_b: torch.Tensor,
                scale_a: torch.Tensor) -> bool:
    """Whether gemv4_matmul takes these inputs on this device."""
    if not (ENABLED and not INTERPRET and x.is_cuda and bits == 4 and x.numel() == x.shape[-1]):
        return False
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    if not (x.dtype == scale_b.dtype == scale_a.dtype == torch.bfloat16 and rank <= MAX_RANK
            and in_features % STEP_COLS == 0 and out_features % 16 == 0 and codes.is_contiguous()
            and scale_a.is_contiguous() and scale_b.is_contiguous() and x.is_contiguous()):
        return False
    if not _hopper(x.device.index if x.device.index is not None else torch.cuda.current_device()):
        return False
    launch = config(out_features, in_features, rank, processors(x.device))
    sums, counts = workspace(x.device)
    return launch["rank_tiles"] not in _failed and (
        launch["splits"] == 1 or (launch["splits"] * out_features <= sums.numel()
                                  and launch["row_blocks"] <= counts.numel()))


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
        _failed.add(launch["rank_tiles"])
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
