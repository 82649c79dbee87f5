"""The training loop shared by PEFT and QAT: causal-LM loss on random windows of a token stream.

Under torchrun (torch.distributed initialised) every rank draws the same global batch and trains on its own slice of
it, so K processes take the same steps as one process on the whole batch. The model is either wrapped in
DistributedDataParallel (each rank holds everything) or, with fsdp=True, trained as an FSDP2 copy whose decoder
blocks shard their parameters, gradients and optimizer states over the ranks (for QAT, where every weight trains in
float32 with two Adam moments); the trained values are then gathered back into the caller's model.
"""

import contextlib
import copy
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .model import find_blocks


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate from its initial value down to 0 over `steps`, along half a cosine."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))


def process_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _fully_sharded_copy(model: nn.Module, groups: list[dict]) -> tuple[nn.Module, list[dict]]:
    """FSDP2 on a copy (fully_shard rewrites modules in place, and the caller's model must stay a plain model): each
    decoder block and the root shard their parameters; the optimizer groups are pointed at the copy's parameters."""
    from torch.distributed.fsdp import fully_shard

    names = {id(param): name for name, param in model.named_parameters()}
    sharded = copy.deepcopy(model)
    for block in find_blocks(sharded)[1]:
        fully_shard(block)
    fully_shard(sharded)
    params = dict(sharded.named_parameters())
    return sharded, [{**group, "params": [params[names[id(p)]] for p in group["params"]]} for group in groups]


@torch.no_grad()
def _gather_trained(sharded: nn.Module, model: nn.Module) -> None:
    """Every rank takes part in the all-gathers; every rank's model ends with the full trained values."""
    params = dict(model.named_parameters())
    for name, param in sharded.named_parameters():
        if param.requires_grad:
            params[name].copy_(param.full_tensor())


def finetune(
    model: nn.Module,
    tokens: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    seq_len: int = 256,
    seed: int = 0,
    progress: bool = True,
    param_groups: list[dict] | None = None,
    gradient_checkpointing: bool = False,
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[int, float], None] | None = None,
    fsdp: bool = False,
) -> list[float]:
    """Causal-LM fine-tuning of the parameters that require grad (AdamW, cosine schedule from lr to 0).

    param_groups: AdamW groups with their own lr (e.g. qat_parameter_groups); parameters that do not require grad
    are left out, so a schedule that trains scales first and weights later is two calls.
    gradient_checkpointing: recompute each block's activations in the backward (Hugging Face models).
    autocast_dtype: mixed precision, e.g. torch.bfloat16; trained parameters stay in their own (float32) dtype.
    on_step: called with (step, loss) after every step (the loss is already on the host, so timing it is exact).
    fsdp: under torchrun, shard with FSDP2 instead of replicating with DDP (see the module docstring).
    Returns every step's loss (averaged over ranks when distributed).
    """
    rank, world = process_and_world()
    groups = param_groups or [{"params": list(model.parameters()), "lr": lr}]
    groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in groups]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad (call mark_trainable or prepare_qat first)")
    if tokens.numel() <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} training tokens, got {tokens.numel()}")
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must divide evenly over {world} processes")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = next(model.parameters()).device
    sharded = fsdp and world > 1
    if sharded:
        trained, groups = _fully_sharded_copy(model, groups)
    else:
        trained = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    trained.train()
    losses = []
    for _ in tqdm(range(steps), desc="fine-tuning", disable=not progress or rank != 0):
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator).tolist()
        shard = starts[rank * batch_size // world : (rank + 1) * batch_size // world]
        batch = torch.stack([tokens[s : s + seq_len] for s in shard]).to(device)
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss = trained(batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
            logged /= world
        losses.append(logged.item())
        if on_step is not None:
            on_step(len(losses), losses[-1])
    if sharded:
        _gather_trained(trained, model)
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return losses
