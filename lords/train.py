"""The training loop shared by PEFT and QAT: causal-LM loss on random windows of a token stream."""

import math

import torch
from torch import nn
from tqdm.auto import tqdm


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
) -> list[float]:
    """Causal-LM fine-tuning of the parameters that require grad (AdamW, cosine schedule from lr to 0).

    param_groups: AdamW groups with their own lr (e.g. qat_parameter_groups); parameters that do not require grad
    are left out, so a schedule that trains scales first and weights later is two calls. Returns every step's loss.
    """
    groups = param_groups or [{"params": list(model.parameters()), "lr": lr}]
    groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in groups]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad (call mark_trainable or prepare_qat first)")
    if tokens.numel() <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} training tokens, got {tokens.numel()}")
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="fine-tuning", disable=not progress):
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator).tolist()
        batch = torch.stack([tokens[s : s + seq_len] for s in starts]).to(device)
        loss = model(batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
