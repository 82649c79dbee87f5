"""Perplexity over non-overlapping windows of a token stream (the WikiText-2 protocol of GPTQ/AWQ papers)."""

import math

import torch
from tqdm.auto import tqdm

from ..linear import dense_weights


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seq_len: int = 512, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token loss) over floor(len / seq_len) windows; a trailing partial window is dropped. LoRDS
    layers on the CPU dequantize once for the whole run (lords.dense_weights)."""
    windows = token_ids.reshape(-1)[: (token_ids.numel() // seq_len) * seq_len].view(-1, seq_len)
    if windows.shape[0] == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens for perplexity, got {token_ids.numel()}")
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    with dense_weights(model):
        for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
            batch = batch.to(device)
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_loss += loss.item()
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_loss / total_tokens)
