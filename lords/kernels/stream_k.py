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

# (device index, stream) -> (float32 sums, int32 counts). Kernels on one stream run one after another and leave both at
# zero; kernels that may run at the same time are on different streams, so they get different workspaces.
_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace_per_sm(configs, tile_size) -> tuple[int, int]:
    """Float32 values and counters a workspace needs per multiprocessor for a launch of any of these autotune
    configs: a slot of tile_size(config.kwargs) values per program of a one-wave grid (PER_SM programs per
    multiprocessor; PER_SM = 0, one program per tile, shares no tile)."""
    return (max(c.kwargs["PER_SM"] * tile_size(c.kwargs) for c in configs), max(c.kwargs["PER_SM"] for c in configs))


def workspace(device: torch.device, values_per_sm: int, slots_per_sm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 sums and int32 counters for the current stream of `device` (sizes from workspace_per_sm). The
    workspace grows to the largest request and is kept (8.7 MB on an H100 for the tiled kernel's configs). A CUDA
    graph keeps the workspace of the stream it was captured on."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, triton.runtime.driver.active.get_current_stream(index))
    else:
        key = (device.type, 0)
    sms = processors(device)
    values, slots = max(1, sms * values_per_sm), max(1, sms * slots_per_sm)
    found = _workspaces.get(key)
    if found is None or found[0].numel() < values or found[1].numel() < slots:
        if found is not None:
            values, slots = max(found[0].numel(), values), max(found[1].numel(), slots)
        found = _workspaces[key] = (torch.zeros(values, device=device, dtype=torch.float32),
                                    torch.zeros(slots, device=device, dtype=torch.int32))
    return found


def workspace_tensors() -> list[torch.Tensor]:
    """Every workspace's sums and counts, on every device and stream: all zero between launches."""
    return [tensor for pair in _workspaces.values() for tensor in pair]


@triton.jit
def work_share(units):
    """[start, end) of this program's share of `units` work units: equal, contiguous shares over the grid."""
    pid = tl.program_id(0)
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
