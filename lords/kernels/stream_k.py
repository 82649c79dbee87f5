"""Sharing a grid's work out evenly ("stream-K"), and writing the output tiles that several programs summed.

The decode and tiled kernels launch one wave of programs that split the (output tile, K step) work units into equal,
contiguous shares, so a program may start in the middle of one tile and go on into the next. A tile whose steps
one program ran alone is stored directly. A tile shared by several programs is summed in a float32 slot of a
workspace: each program adds its partial tile there and counts its steps on the slot's counter, and the one whose
steps complete the count (the last to arrive) reads the sum, writes the output tile and sets the slot and the
counter back to zero. So the output needs neither a zero-fill before the kernel nor a float32-to-output conversion
after it (two small kernels a call, about 4 of 47 us at M = 1 on 14336 x 4096), and the workspace is zeroed once,
when it is allocated.

At most one shared tile starts inside each program's share (a tile that starts inside a share and ends in a later
one is the share's last), so a launch needs one slot per program: a shared tile's slot is the program holding its
first unit.
"""

import torch
import triton
import triton.language as tl

from .autotune import processors

# Per multiprocessor, the float32 values and the counters that the largest config of any stream-K kernel needs (each
# kernel declares its configs with reserve_workspace at import), and device -> (float32 sums, int32 counts).
_per_sm = [1, 1]
_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def reserve_workspace(configs, tile_size) -> None:
    """Declare a kernel's autotune configs: a launch of any of them needs a slot of tile_size(config.kwargs) values
    per program of a one-wave grid (PER_SM programs per multiprocessor; PER_SM = 0, one program per tile, shares no
    tile)."""
    _per_sm[0] = max(_per_sm[0], *(c.kwargs["PER_SM"] * tile_size(c.kwargs) for c in configs))
    _per_sm[1] = max(_per_sm[1], *(c.kwargs["PER_SM"] for c in configs))


def workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 sums and int32 counters for the stream-K kernels on `device`. One per device, allocated at the
    first launch there, sized for every declared config and kept (8.7 MB on an H100), so that it is never allocated
    again, least of all inside a CUDA graph: torch.compile's CUDA-graph trees refuse memory of their pool that
    outlives a call (transformers' generate(cache_implementation="static") failed so with one workspace per stream).
    The kernels leave it zero, and kernels on one stream run one after another; LoRDS kernels running at the same
    time on two streams of one device would share it and must not."""
    index = torch.cuda.current_device() if device.type == "cuda" and device.index is None else device.index
    found = _workspaces.get((device.type, index))
    if found is None:
        sms = processors(device)
        # on the default stream, whose memory no CUDA-graph pool claims (CUDA-graph trees give a warmup run's
        # allocations on the current stream to their pool); the current stream waits for the zeros
        default = (torch.cuda.default_stream(device) if device.type == "cuda"
                   and not torch.cuda.is_current_stream_capturing() else None)
        with torch.cuda.stream(default):  # a no-op for None
            found = _workspaces[(device.type, index)] = (
                torch.zeros(sms * _per_sm[0], device=device, dtype=torch.float32),
                torch.zeros(sms * _per_sm[1], device=device, dtype=torch.int32))
        if default is not None:
            torch.cuda.current_stream(device).wait_stream(default)
    return found


def workspace_tensors() -> list[torch.Tensor]:
    """Every workspace's sums and counts, on every device: all zero between launches."""
    return [tensor for pair in _workspaces.values() for tensor in pair]


@triton.jit
def work_share(units):
    """[start, end) of this program's share of `units` work units: equal, contiguous shares over the grid."""
    # in int64: a grouped prefill's millions of units times a program id pass 2^31
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0)
    return (pid * units // programs).to(tl.int32), ((pid + 1) * units // programs).to(tl.int32)


@triton.jit
def tile_steps(tile, start, end, steps):
    """[first, last) of the K steps of `tile` (the units tile * steps ...) that fall in the share [start, end)."""
    return tl.maximum(start - tile * steps, 0), tl.minimum(end - tile * steps, steps)


@triton.jit
def tile_slot(tile, steps, units):
    """The workspace slot of `tile`: the program whose share (work_share) holds the tile's first unit u, the largest
    p with p * units // programs <= u."""
    programs = tl.num_programs(0)
    return (((tile * steps + 1).to(tl.int64) * programs - 1) // units).to(tl.int32)


@triton.jit
def store_tile(out, bias, y_ptrs, mask, sums_ptrs, count_ptr, done, steps):
    """Write the float32 tile `out` (+ bias) to y_ptrs, this program having summed `done` of the tile's `steps` K
    steps into it; a partial tile goes through its workspace slot (sums_ptrs, count_ptr), as the module says."""
    if done == steps:
        tl.store(y_ptrs, (out + bias).to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(sums_ptrs, out, mask=mask, sem="relaxed")
        # Every thread's adds are ordered before the count: a barrier across the program, then the release of the
        # one thread that counts (and the acquire of the last program's count before it reads the sums).
        tl.debug_barrier()
        count = tl.atomic_add(count_ptr, done, sem="acq_rel")
        if count + done == steps:
            tl.debug_barrier()
            total = tl.load(sums_ptrs, mask=mask, other=0.0, cache_modifier=".cg")  # from L2: L1 is not coherent
            tl.store(y_ptrs, (total + bias).to(y_ptrs.dtype.element_ty), mask=mask)
            # The compiler may lay the zeroing store out over the threads differently from the load, and the zeros
            # do not wait on the loaded values: without a barrier a thread can clear sums that another thread has
            # yet to read (seen on the H100 as a few wrong rows now and then, with several programs per SM).
            tl.debug_barrier()
            tl.store(sums_ptrs, tl.zeros_like(total), mask=mask)
            tl.store(count_ptr, 0)
