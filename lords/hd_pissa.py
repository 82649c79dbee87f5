"""HD-PiSSA (spec: hd_pissa_past.md): each of K devices adapts a different slice of every weight's singular spectrum,
and the sum of all devices' updates goes into one shared full weight every step.

Per target linear, slice k of the fp32 SVD W = U diag(s) V^T gives fixed factors A_k = diag(sqrt s) V^T[k] (r x m)
and B_k = U[:, k] diag(sqrt s) (n x r). The forward uses W alone; the adapter adds zero to the output but has the
live gradients of x A_k^T B_k^T (PiSSA's gradient at its init point). Each device takes an Adam step on its own
(A_k, B_k) from its own data shard (no gradient all-reduce), turns it into deltas dA_k, dB_k, puts the factors back
to their fixed values (Adam's moments persist) and all-gathers the deltas. Every device then adds the same
    dW = sum_k [(B_k - dB_k)(A_k - dA_k) - B_k A_k]
to an fp32 master copy of W, in the same order, so replicas stay identical without broadcasts. With K processes
each owns slice `rank`; in one process, K virtual slices train one after the other on K chunks of the batch.
"""

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .model import set_submodule
from .train import cosine_schedule, process_and_world

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _ZeroValueAdapter(torch.autograd.Function):
    """Output zeros; gradients of y = x A^T B^T for A and B; no gradient for x (the dense path already has it)."""

    @staticmethod
    def forward(ctx, x, adapter_a, adapter_b):
        ctx.save_for_backward(x, adapter_a, adapter_b)
        return x.new_zeros(*x.shape[:-1], adapter_b.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, adapter_a, adapter_b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1]).float()
        dy = grad_out.reshape(-1, grad_out.shape[-1]).float()
        grad_a = (dy @ adapter_b).T @ x2  # B^T G with G = dY^T X, never formed
        grad_b = dy.T @ (x2 @ adapter_a.T)  # G A^T
        return None, grad_a, grad_b


class HDPiSSALinear(nn.Module):
    """A frozen dense linear with an fp32 master weight and the fixed SVD slices of all K devices."""

    def __init__(self, linear: nn.Linear, rank: int, slices: int):
        super().__init__()
        n, m = linear.weight.shape
        if rank * slices > min(n, m):
            raise ValueError(f"{slices} slices of rank {rank} need {rank * slices} singular values; the layer "
                             f"({n}x{m}) has {min(n, m)}")
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_buffer("master", linear.weight.detach().float().clone(), persistent=False)
        u, s, vh = torch.linalg.svd(self.master, full_matrices=False)
        root = s[: rank * slices].sqrt()
        # fixed_a[k] = A_k (r x m), fixed_b[k] = B_k (n x r)
        self.register_buffer("fixed_a", (root[:, None] * vh[: rank * slices]).view(slices, rank, m), persistent=False)
        self.register_buffer("fixed_b", (u[:, : rank * slices] * root).T.reshape(slices, rank, n).transpose(1, 2),
                             persistent=False)
        self.active: tuple[torch.Tensor, torch.Tensor] | None = None  # the (A_k, B_k) being trained now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight, self.bias)
        if self.active is None:
            return out
        return out + _ZeroValueAdapter.apply(x, *self.active).to(out.dtype)

    @torch.no_grad()
    def apply_deltas(self, delta_a: torch.Tensor, delta_b: torch.Tensor) -> None:
        """delta_a (K, r, m), delta_b (K, n, r), every slice in order: W += sum_k (B_k - dB_k)(A_k - dA_k) - B_k A_k."""
        slices, rank, m = self.fixed_a.shape
        fixed_a = self.fixed_a.reshape(slices * rank, m)
        fixed_b = self.fixed_b.transpose(0, 1).reshape(-1, slices * rank)
        new_a = fixed_a - delta_a.reshape(slices * rank, m)
        new_b = fixed_b - delta_b.transpose(0, 1).reshape(-1, slices * rank)
        self.master += new_b @ new_a - fixed_b @ fixed_a
        self.weight.copy_(self.master.to(self.weight.dtype))


def wrap(model: nn.Module, rank: int, slices: int, targets=TARGETS) -> dict[str, HDPiSSALinear]:
    """Replace the target nn.Linear modules by HDPiSSALinear, in place; freeze everything else."""
    for param in model.parameters():
        param.requires_grad_(False)
    layers = {}
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
            layers[name] = HDPiSSALinear(module, rank, slices)
            set_submodule(model, name, layers[name])
    if not layers:
        raise ValueError(f"no nn.Linear named one of {targets} in the model")
    return layers


def hd_pissa_finetune(
    model: nn.Module,
    tokens: torch.Tensor,
    steps: int,
    rank: int = 8,
    lr: float = 2e-5,
    batch_size: int = 8,
    seq_len: int = 256,
    slices: int | None = None,
    seed: int = 0,
    progress: bool = True,
    updates_of: tuple[str, ...] = (),
) -> dict:
    """Train with HD-PiSSA; the model ends as a plain dense model (nothing to merge).

    slices: K. Under torch.distributed it is the world size and this process owns slice `rank`; in one process it
    defaults to 1 and the K virtual slices take turns on K chunks of each batch. Returns the losses (mean over
    slices), the values this process sent per step, K, and the float32 accumulated update W - W_0 of the layers named
    in `updates_of` (the exported weights are rounded to the model's dtype, which hides small updates).
    """
    process, world = process_and_world()
    if world > 1 and slices not in (None, world):
        raise ValueError(f"under torch.distributed the slices are the {world} processes; got slices={slices}")
    slices = world if world > 1 else (slices or 1)
    owned = [process] if world > 1 else list(range(slices))
    if batch_size % slices:
        raise ValueError(f"batch_size={batch_size} must split evenly into {slices} slices")
    if tokens.numel() <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} training tokens, got {tokens.numel()}")
    layers = wrap(model, rank, slices)
    starts_of = {name: layers[name].master.clone() for name in updates_of}
    adapters = {k: [(nn.Parameter(layer.fixed_a[k].clone()), nn.Parameter(layer.fixed_b[k].clone()))
                    for layer in layers.values()] for k in owned}
    optimizers = {k: torch.optim.Adam([p for pair in adapters[k] for p in pair], lr=lr) for k in owned}
    schedules = {k: cosine_schedule(optimizers[k], steps) for k in owned}
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    sent_per_step = rank * sum(sum(layer.master.shape) for layer in layers.values())
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="HD-PiSSA", disable=not progress or process != 0):
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator).tolist()
        chunk = batch_size // slices
        deltas, step_loss = {}, 0.0
        for k in owned:
            for layer, pair in zip(layers.values(), adapters[k]):
                layer.active = pair
            batch = torch.stack([tokens[s : s + seq_len] for s in starts[k * chunk : (k + 1) * chunk]]).to(device)
            loss = model(batch, labels=batch, use_cache=False).loss
            optimizers[k].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[k].step()
            schedules[k].step()
            with torch.no_grad():
                deltas[k] = []
                for layer, (adapter_a, adapter_b) in zip(layers.values(), adapters[k]):
                    deltas[k] += [layer.fixed_a[k] - adapter_a, layer.fixed_b[k] - adapter_b]
                    adapter_a.copy_(layer.fixed_a[k])
                    adapter_b.copy_(layer.fixed_b[k])
            step_loss += loss.item()
        flat = {k: torch.cat([d.reshape(-1) for d in deltas[k]]) for k in owned}
        if world > 1:
            gathered = [torch.empty_like(flat[process]) for _ in range(world)]
            dist.all_gather(gathered, flat[process])
            loss_total = torch.tensor([step_loss], device=device)
            dist.all_reduce(loss_total)
            step_loss = loss_total.item()
        else:
            gathered = [flat[k] for k in range(slices)]
        offsets = 0
        for layer in layers.values():
            _, r, m = layer.fixed_a.shape
            n = layer.fixed_b.shape[1]
            delta_a = torch.stack([g[offsets : offsets + r * m].view(r, m) for g in gathered])
            delta_b = torch.stack([g[offsets + r * m : offsets + r * m + n * r].view(n, r) for g in gathered])
            offsets += r * m + n * r
            layer.apply_deltas(delta_a, delta_b)
        losses.append(step_loss / slices)
    model.eval()
    updates = {name: layers[name].master - start for name, start in starts_of.items()}
    unwrap(model)
    return {"losses": losses, "sent_values_per_step": sent_per_step, "slices": slices, "updates": updates}


def unwrap(model: nn.Module) -> nn.Module:
    """Back to plain nn.Linear modules holding the trained weights (the dense export)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, HDPiSSALinear):
            linear = nn.Linear(module.weight.shape[1], module.weight.shape[0], bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)
            linear.weight = nn.Parameter(module.weight.detach(), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
            set_submodule(model, name, linear)
    return model
