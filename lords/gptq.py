"""Error-feedback code assignment (GPTQ, Frantar et al. 2022) on fixed per-weight scales, on plain tensors.

Nearest rounding minimises the weight error; GPTQ minimises the output error ||X W^T - X W_hat^T|| for calibration
inputs X, through H = E[x x^T]: columns are quantized one at a time and the rounding error of each is spread over the
columns not yet quantized, along H^-1 (the Optimal Brain Surgeon update). Here the scale of every weight is given
(LoRDS' B A, or block-wise absmax scales for the GPTQ baseline) and only the codes are chosen.

Like lords.factorize, every function takes one weight (n, m) or a stack of same-shaped weights (L, n, m) with one H
per layer (m, m) or (L, m, m); arithmetic is float32 (float64 if given float64).
"""

import torch

from .blockwise import compute_dtype, safe_divide
from .codebooks import level_grid
from .factorize import LoRDSFactors, check_weight, lords_quantize, reconstruct

DAMP = 0.01  # GPTQ's default: H + 0.01 mean(diag H) I keeps the Cholesky factorization stable
COLUMN_BLOCK = 128  # GPTQ's lazy batch: columns updated together before the rest of W sees their errors


def _stack(tensor: torch.Tensor, dims: int) -> torch.Tensor:
    return tensor if tensor.dim() == dims + 1 else tensor.unsqueeze(0)


def check_hessian(hessian: torch.Tensor, in_features: int, layers: int) -> torch.Tensor:
    """H as a stack (L, m, m); a clear error for a wrong shape or non-finite values."""
    stack = _stack(hessian, 2)
    if stack.dim() != 3 or stack.shape[-2:] != (in_features, in_features) or stack.shape[0] not in (1, layers):
        raise ValueError(f"hessian must be ({in_features}, {in_features}) or ({layers}, {in_features}, "
                         f"{in_features}) for the weight given, got shape {tuple(hessian.shape)}")
    if not torch.isfinite(stack).all():
        raise ValueError("hessian contains NaN or Inf values")
    return stack.expand(layers, -1, -1)


def _columns(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """tensor (L, n, m) with its columns reordered per layer by order (L, m)."""
    return tensor.gather(-1, order[:, None, :].expand_as(tensor))


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp mean(diag H) I)^-1 (L, m, m): row j of U, divided by U[j, j], is the
    update that column j's rounding error makes to the columns after it (GPTQ's Cholesky reformulation).

    With J the reversal of rows and columns, J H J = K K^T (K lower) gives H = R R^T with R = J K J upper, so
    H^-1 = (R^-1)^T R^-1 and U = R^-1 = J K^-1 J: one Cholesky and one triangular solve, where GPTQ's
    cholesky_inverse and second Cholesky took 6 s for a 576 x 576 H on a loaded 2-core CPU."""
    hessian = hessian.clone()
    diagonal = hessian.diagonal(dim1=-2, dim2=-1)
    # a channel that no calibration input reached has no effect on the output: rounding it cannot matter
    diagonal.masked_fill_(diagonal == 0, 1.0)
    diagonal.add_(damp * diagonal.mean(dim=-1, keepdim=True))
    lower = torch.linalg.cholesky(hessian.flip(-2, -1))
    identity = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device).expand_as(hessian)
    return torch.linalg.solve_triangular(lower, identity, upper=False).flip(-2, -1)


def gptq_codes(
    weight: torch.Tensor,
    scale: torch.Tensor,
    codebook: torch.Tensor,
    hessian: torch.Tensor,
    act_order: bool = True,
    damp: float = DAMP,
    column_block: int = COLUMN_BLOCK,
) -> torch.Tensor:
    """Codes (uint8, weight's shape) for W ~= S * C[codes] that minimise the output error under H, column by column.

    act_order: columns in decreasing order of H's diagonal (the most active inputs first, while the most columns
    remain to absorb their error). column_block: columns whose updates are applied to the rest of W in one matmul.
    With H = I every update is zero and the codes are the nearest ones.
    """
    check_weight(weight)
    if scale.shape != weight.shape:
        raise ValueError(f"scale must have the weight's shape {tuple(weight.shape)}, got {tuple(scale.shape)}")
    dtype = compute_dtype(weight)
    work = _stack(weight, 2).to(dtype).clone()
    scale = _stack(scale, 2).to(dtype)
    layers, _, in_features = work.shape
    hessian = check_hessian(hessian, in_features, layers).to(device=work.device, dtype=dtype)
    levels = codebook.to(device=work.device, dtype=dtype)
    grid = level_grid(levels)
    if act_order:
        order = hessian.diagonal(dim1=-2, dim2=-1).argsort(dim=-1, descending=True, stable=True)
        work, scale = _columns(work, order), _columns(scale, order)
        hessian = _columns(hessian, order).gather(-2, order[:, :, None].expand_as(hessian))
    factor = inverse_hessian_factor(hessian, damp)
    # Columns as rows (L, m, n): each step reads contiguous vectors. A column's value when its turn comes is its
    # value at the block's start minus the block's earlier errors along U (one small matmul): GPTQ's in-block update
    # done lazily. Updating the block's remaining columns after every column cost 10x more on a loaded 2-core CPU.
    work, scale = work.transpose(-1, -2).contiguous(), scale.transpose(-1, -2).contiguous()
    codes = torch.empty_like(work, dtype=torch.int32)
    ratio, scratch = torch.empty_like(work[:, 0]), grid.scratch(work[:, 0])
    column_codes = torch.empty_like(ratio, dtype=torch.int32)
    for start in range(0, in_features, column_block):
        end = min(start + column_block, in_features)
        errors = torch.zeros_like(work[:, start:end])
        for j in range(start, end):
            column = work[:, j] - (factor[:, None, start:j, j] @ errors[:, : j - start]).squeeze(1)
            code = grid.codes(safe_divide(column, scale[:, j], out=ratio), column_codes, scratch)
            codes[:, j] = code
            errors[:, j - start] = (column - scale[:, j] * levels[code.long()]) / factor[:, j, j, None]
        work[:, end:] -= factor[:, start:end, end:].transpose(-1, -2) @ errors
    codes = codes.transpose(-1, -2)
    if act_order:
        codes = codes.scatter(-1, order[:, None, :].expand_as(codes), codes.clone())
    codes = codes.to(torch.uint8)
    return codes[0] if weight.dim() == 2 else codes


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """sqrt(tr(E H E^T) / tr(W H W^T)) per layer, E = W - W_hat: ||X W^T - X W_hat^T|| / ||X W^T|| for H = X^T X."""
    diff = weight - approx
    ref = (weight @ hessian * weight).sum(dim=(-2, -1))
    return ((diff @ hessian * diff).sum(dim=(-2, -1)) / ref.clamp_min(1e-30)).sqrt()


def refit_scales(
    weight: torch.Tensor,
    scale_b: torch.Tensor,
    scale_a: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    hessian: torch.Tensor,
    steps: int,
    lr: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B, A refitted to the output error under the full H with the codes held fixed: `steps` Adam steps (lr relative
    to each tensor's RMS, as lords.factorize.refine_scales), keeping the best iterate. Stacks (L, ...) only."""
    levels = codebook.to(weight)[codes.long()]
    params = [scale_b.detach().to(weight), scale_a.detach().to(weight)]
    units = [p.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-30) for p in params]
    normalized = [(p / unit).requires_grad_(True) for p, unit in zip(params, units)]
    optimizer = torch.optim.Adam(normalized, lr=lr)
    best, best_loss = [p.clone() for p in params], None
    for step in range(steps + 1):
        with torch.enable_grad():  # the model walks run under no_grad
            current = [p * unit for p, unit in zip(normalized, units)]
            loss = output_error(weight, (current[0] @ current[1]) * levels, hessian).pow(2)
            if step < steps:
                optimizer.zero_grad()
                loss.sum().backward()
        with torch.no_grad():
            improved = torch.ones_like(loss, dtype=torch.bool) if best_loss is None else loss < best_loss
            best_loss = loss.detach() if best_loss is None else torch.where(improved, loss, best_loss)
            for p, b in zip(current, best):
                b.copy_(torch.where(improved[:, None, None], p, b))
        if step < steps:
            optimizer.step()
    return best[0], best[1]


def lords_gptq_quantize(
    weight: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
    rank: int,
    hessian: torch.Tensor,
    steps: int = 500,
    lr: float = 0.1,
    refit_rounds: int = 0,
    exact_init: bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    progress=None,
) -> LoRDSFactors:
    """LoRDS with error-feedback codes: B, A refined against diag(H) (lords_quantize, activation-aware), then GPTQ
    codes for the stored scales; each refit round refits B, A to the full H with those codes and assigns GPTQ codes
    again, and the best round is kept. error_init is the output error under H with nearest codes, error with the
    codes returned (factors' error fields here are output errors, not the diag-weighted objective)."""
    check_weight(weight)
    dtype = compute_dtype(weight)
    stack = _stack(weight, 2).to(dtype)
    hessian = check_hessian(hessian, stack.shape[-1], stack.shape[0]).to(device=stack.device, dtype=dtype)
    codebook = codebook.to(device=stack.device, dtype=dtype)
    factors = lords_quantize(stack, codebook, block_size, rank, steps, lr, hessian.diagonal(dim1=-2, dim2=-1),
                             exact_init, scale_dtype, seed, progress)
    scale_b, scale_a = factors.scale_b, factors.scale_a
    scale = scale_b.to(dtype) @ scale_a.to(dtype)
    error_init = output_error(stack, reconstruct(scale, factors.codes, codebook), hessian)
    codes = gptq_codes(stack, scale, codebook, hessian)
    error = output_error(stack, reconstruct(scale, codes, codebook), hessian)
    for _ in range(refit_rounds):
        new_b, new_a = refit_scales(stack, scale_b, scale_a, codes, codebook, hessian, steps, lr)
        new_b, new_a = new_b.to(scale_dtype), new_a.to(scale_dtype)
        new_scale = new_b.to(dtype) @ new_a.to(dtype)
        new_codes = gptq_codes(stack, new_scale, codebook, hessian)
        new_error = output_error(stack, reconstruct(new_scale, new_codes, codebook), hessian)
        better = new_error < error
        scale_b = torch.where(better[:, None, None], new_b, scale_b)
        scale_a = torch.where(better[:, None, None], new_a, scale_a)
        codes = torch.where(better[:, None, None], new_codes, codes)
        error = torch.minimum(new_error, error)
    if weight.dim() == 2:
        return LoRDSFactors(scale_b[0], scale_a[0], codes[0], error_init[0], error[0])
    return LoRDSFactors(scale_b, scale_a, codes, error_init, error)
