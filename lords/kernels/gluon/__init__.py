"""GPU-only LoRDS kernels, in Gluon (Triton's explicit-layout language), for Hopper (sm_90).

Triton's CPU interpreter cannot run Gluon, so these kernels are tested on the GPU only (tests/gpu/,
results/gpu_tests.md). They are off unless LORDS_GLUON=1: the gemv kernel gave a wrong output now and then on the
H200 (1024x4096, rank 12, NF: one failed case in two runs of the GPU suite, a race not yet found) and was slower
than the Triton decode kernel on every shape timed (results/kernels.md, docs/kernels.md). Turned on, they are offered
to lords_matmul only where they can run: a CUDA device of compute capability 9.0, a Triton with Gluon's Hopper
module, inputs of the shapes and dtypes a kernel takes (gemv.supported) and room in the stream-K workspace.
Everywhere else the portable Triton kernels serve, and a Gluon kernel that fails to build is dropped with a warning
(a Triton whose Gluon changed, say).
"""

import functools
import os
import warnings

import torch

from ..autotune import INTERPRET, processors
from ..codes import check_input, level_lookup
from ..stream_k import workspace

ENABLED = os.environ.get("LORDS_GLUON") == "1"  # opt-in: see the module docstring
_failed: set[str] = set()


@functools.cache
def _hopper(index: int) -> bool:
    if torch.cuda.get_device_capability(index) != (9, 0):
        return False
    try:
        from . import gemv  # noqa: F401  (Gluon's Hopper module imports)
    except ImportError as error:
        warnings.warn(f"lords: the Gluon kernels are off, Triton's Gluon does not import here: {error}")
        return False
    return True


def gemv_ready(x: torch.Tensor, bits: int, scale_b: torch.Tensor, scale_a: torch.Tensor) -> bool:
    """Whether gemv_matmul takes these inputs on this device."""
    if not (ENABLED and not INTERPRET and x.is_cuda and "gemv" not in _failed):
        return False
    if not _hopper(x.device.index if x.device.index is not None else torch.cuda.current_device()):
        return False
    from .gemv import BLOCK_N, shares, supported

    sums, counts = workspace(x.device)
    (out_features, rank), in_features = scale_b.shape, scale_a.shape[1]
    return (supported(x, bits, scale_b, scale_a) and out_features <= sums.numel()
            and -(-out_features // BLOCK_N) <= counts.numel() and shares(out_features, in_features, rank,
                                                                          processors(x.device)))


def gemv_matmul(x, codes, codebook, scale_b, scale_a, bits, bias=None):
    """x (..., K) with one row -> (..., N): the Gluon gemv kernel (gemv.py), for inputs gemv_ready accepts."""
    check_input(x, scale_a)
    if not gemv_ready(x, bits, scale_b, scale_a):
        raise ValueError("the Gluon gemv kernel does not take these inputs here (see lords.kernels.gluon.gemv_ready)")
    from .gemv import gemv

    out_features = scale_b.shape[0]
    y = torch.empty(out_features, device=x.device, dtype=x.dtype)
    sums, counts = workspace(x.device)
    lookup = level_lookup(codebook, x.dtype, "nibbles")
    try:
        gemv(x.reshape(-1), codes, scale_b.contiguous(), scale_a.contiguous(),
             None if bias is None else bias.to(x.dtype), y, sums, counts, lookup, processors(x.device))
    except Exception as error:  # a compile failure: Triton's errors have no common type
        if torch.cuda.is_current_stream_capturing():
            raise
        _failed.add("gemv")
        warnings.warn(f"lords: the Gluon gemv kernel failed to build and is off for this process: {error}")
        raise RuntimeError("Gluon gemv kernel unavailable") from error
    return y.reshape(*x.shape[:-1], out_features)
