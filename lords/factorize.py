"""The LoRDS factorization on plain tensors: W ~= (B @ A) * C[codes].

Every function accepts a single weight (n, m) or a stack of same-shaped weights (L, n, m); stacks are how layers
are refined together on a GPU. All arithmetic is float32 (float64 if given float64).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .blockwise import block_absmax, check_block_size, compute_dtype, expand_blocks, safe_divide
from .codebooks import level_grid, nearest_codes


def parity_rank(out_features: int, in_features: int, block_size: int) -> int:
    """Rank whose B, A hold as many numbers as the block-wise scales: floor(n*m / (b*(n+m))), at least 1."""
    return max(1, (out_features * in_features) // (block_size * (out_features + in_features)))


def bits_per_weight(out_features: int, in_features: int, bits: int, rank: int, scale_bits: int = 16) -> float:
    return bits + scale_bits * rank * (out_features + in_features) / (out_features * in_features)


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dim() not in (2, 3):
        raise ValueError(f"{name} must be (out, in) or (layers, out, in), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} contains NaN or Inf values; refusing to quantize it")


def _as_stack(weight: torch.Tensor) -> torch.Tensor:
    return weight if weight.dim() == 3 else weight.unsqueeze(0)


def svd_init(
    weight: torch.Tensor, block_size: int, rank: int, exact: bool = False, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """B (.., n, r), A (.., r, m) from block absmax statistics, singular values split evenly (B = U sqrt(S)).

    The block scale matrix is S_blk = s E with E the (g x m) block indicator, and E / sqrt(b) has orthonormal
    rows, so the SVD of S_blk is the SVD of the small (n x g) matrix s*sqrt(b) with V expanded over each block.
    With exact=True the blocks are m/rank wide (r groups), so rank(S_blk) <= r and B A reproduces S_blk exactly.
    If rank exceeds the number of singular values, the extra directions start with B = 0 and small random A, so
    B A still equals the truncated S_blk and gradients can grow them (as in LoRA's init).
    """
    check_weight(weight)
    stack = _as_stack(weight).to(compute_dtype(weight))
    in_features = stack.shape[-1]
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if exact:
        if rank > in_features:
            raise ValueError(f"exact init needs rank <= in_features={in_features}, got rank={rank}")
        sizes = [chunk.numel() for chunk in torch.arange(in_features).tensor_split(rank)]
        block_scale = torch.stack([chunk.abs().amax(dim=-1) for chunk in stack.split(sizes, dim=-1)], dim=-1)
    else:
        check_block_size(in_features, block_size)
        sizes = [block_size] * (in_features // block_size)
        block_scale = block_absmax(stack, block_size)
    root = torch.tensor(sizes, dtype=stack.dtype, device=stack.device).sqrt()
    u, sigma, vh = torch.linalg.svd(block_scale * root, full_matrices=False)
    keep = min(rank, sigma.shape[-1])
    half = sigma[..., :keep].sqrt()
    scale_b = u[..., :keep] * half[..., None, :]
    small_a = half[..., :, None] * vh[..., :keep, :] / root
    scale_a = small_a.repeat_interleave(torch.tensor(sizes, device=stack.device), dim=-1)
    if rank > keep:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        extra_a = torch.randn(*stack.shape[:-2], rank - keep, in_features, generator=generator, dtype=stack.dtype)
        extra_a = extra_a.to(stack.device) * scale_a.pow(2).mean().sqrt() * 1e-2
        scale_b = torch.cat([scale_b, scale_b.new_zeros(*scale_b.shape[:-1], rank - keep)], dim=-1)
        scale_a = torch.cat([scale_a, extra_a], dim=-2)
    if weight.dim() == 2:
        return scale_b[0], scale_a[0]
    return scale_b, scale_a


def assign_codes(weight: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The Q-step: for a fixed scale, the nearest level of W / S is the exact minimiser, element by element."""
    return nearest_codes(safe_divide(weight, scale), codebook)


def reconstruct(scale: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return scale * codebook.to(device=scale.device, dtype=scale.dtype)[codes.long()]


def relative_error(weight: torch.Tensor, approx: torch.Tensor, channel_weight: torch.Tensor | None = None):
    """||W - W_hat|| / ||W|| per layer (last two dims); with channel_weight h, columns weighted by h_k."""
    diff = (weight - approx).pow(2)
    ref = weight.pow(2)
    if channel_weight is not None:
        diff = diff * channel_weight[..., None, :]
        ref = ref * channel_weight[..., None, :]
    return (diff.sum(dim=(-2, -1)) / ref.sum(dim=(-2, -1)).clamp_min(1e-30)).sqrt()


@dataclass(frozen=True)
class ScaleForm:
    """How the scale matrix S (L, n, m) is made from the refined parameters: write(params, out) puts S in out,
    grads(params, grad_scale) turns dLoss/dS into the parameters' gradients."""

    write: Callable[[list[torch.Tensor], torch.Tensor], None]
    grads: Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]]


LOW_RANK = ScaleForm(  # S = B A: params [scale_b (L, n, r), scale_a (L, r, m)]
    write=lambda params, out: torch.matmul(params[0], params[1], out=out),
    grads=lambda params, grad: [grad @ params[1].transpose(-1, -2), params[0].transpose(-1, -2) @ grad],
)


def block_scale_form(block_size: int) -> ScaleForm:
    """S = the block scales repeated over their blocks: params [block_scale (L, n, m / block_size)]."""

    def write(params, out):
        out.view(*params[0].shape, block_size).copy_(params[0].unsqueeze(-1).expand(*params[0].shape, block_size))

    def grads(params, grad):
        return [grad.view(*params[0].shape, block_size).sum(dim=-1)]

    return ScaleForm(write, grads)


def refine_scales(
    weight: torch.Tensor,
    codebook: torch.Tensor,
    params: list[torch.Tensor],
    form: ScaleForm,
    steps: int,
    lr: float = 0.1,
    channel_weight: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Alternate a Q-step (nearest codes) and one Adam step on the scale parameters, keeping the best iterate.

    weight (L, n, m); params have leading dim L, and form makes S (L, n, m) from them. The loss is the
    (channel-weighted) squared error normalised per layer. Learning rates are relative to each parameter's initial
    RMS, so one lr suits scales of any magnitude. Returns (best params, loss at start, best loss), losses (L,).
    Because the starting point is an iterate, the result is never worse than the start. progress(layers) is called
    after each step with the number of layers it refined.

    The gradient is written out by hand (dLoss/dS = -2 h (W - S c) c / ||W||_h^2 with c = C[codes] held fixed, then
    form.grads) into buffers allocated once: autograd's fresh n x m tensors a step cost a third of the CPU time in
    page faults (237M of them for the default model's 100 steps).
    """
    if weight.dim() != 3:
        raise ValueError(f"weight must be a stack (layers, out, in), got shape {tuple(weight.shape)}")
    weight = weight.contiguous()
    layers = weight.shape[0]
    # Optimise each layer's tensors in units of their own initial RMS: Adam then moves every layer by the same
    # relative amount, and a stack of layers gives the same result as refining each alone.
    units = [p.detach().pow(2).mean(dim=tuple(range(1, p.dim())), keepdim=True).sqrt().clamp_min(1e-30) for p in params]
    normalized = [(p.detach() / unit).requires_grad_(True) for p, unit in zip(params, units)]
    optimizer = torch.optim.Adam(normalized, lr=lr)
    best = [p.detach().clone() for p in params]
    channels = None if channel_weight is None else channel_weight.to(weight).reshape(layers, 1, weight.shape[-1])
    norm = (weight.pow(2) if channels is None else weight.pow(2) * channels).sum(dim=(-2, -1)).clamp_min(1e-30)
    level_values = codebook.to(weight)
    grid = level_grid(level_values)
    scale, residual, levels = torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(weight)
    codes, scratch = torch.empty_like(weight, dtype=torch.int32), grid.scratch(weight)
    weighted = scratch[1]  # the lookup's float scratch, free once the codes are known
    best_loss = start_loss = None
    for step in range(steps + 1):
        with torch.no_grad():
            current = [p * unit for p, unit in zip(normalized, units)]
            form.write(current, scale)
            grid.codes(safe_divide(weight, scale, out=residual), codes, scratch)
            torch.index_select(level_values, 0, codes.view(-1), out=levels.view(-1))
            torch.sub(weight, torch.mul(scale, levels, out=residual), out=residual)
            if channels is not None:
                torch.mul(residual, channels, out=weighted)
            h_residual = residual if channels is None else weighted
            # S is not needed again this step: its buffer takes h (W - S c)^2
            loss = torch.mul(h_residual, residual, out=scale).view(layers, -1).sum(dim=-1) / norm
            if best_loss is None:
                start_loss, best_loss = loss.clone(), loss.clone()
            else:
                improved = loss < best_loss
                best_loss = torch.where(improved, loss, best_loss)
                for p, b in zip(current, best):
                    b.copy_(torch.where(improved.view(-1, *[1] * (p.dim() - 1)), p, b))
            if step == steps:
                break
            grad_scale = torch.mul(h_residual, levels, out=levels if channels is None else weighted)
            for p, grad, unit in zip(normalized, form.grads(current, grad_scale), units):
                p.grad = grad * (-2 / norm).view(-1, *[1] * (grad.dim() - 1)) * unit
        optimizer.step()
        if progress is not None:
            progress(layers)
    return best, start_loss.sqrt(), best_loss.sqrt()


@dataclass
class LoRDSFactors:
    scale_b: torch.Tensor  # (.., n, r)
    scale_a: torch.Tensor  # (.., r, m)
    codes: torch.Tensor  # (.., n, m) uint8 indices into the codebook
    error_init: torch.Tensor  # relative (channel-weighted if calibrated) error after the SVD init, per layer
    error: torch.Tensor  # the same after refinement and rounding to the storage dtype


def lords_quantize(
    weight: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
    rank: int,
    steps: int = 500,
    lr: float = 0.1,
    channel_weight: torch.Tensor | None = None,
    exact_init: bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> LoRDSFactors:
    """Quantize one weight (n, m) or a stack (L, n, m): SVD init, `steps` refinement steps, scales rounded to
    scale_dtype (what is stored) and codes re-assigned for the rounded scales. progress: as refine_scales."""
    check_weight(weight)
    if channel_weight is not None and not torch.isfinite(channel_weight).all():
        raise ValueError("channel_weight contains NaN or Inf values")
    single = weight.dim() == 2
    dtype = compute_dtype(weight)
    stack = _as_stack(weight).to(dtype)
    channels = None
    if channel_weight is not None:
        channels = channel_weight.to(device=stack.device, dtype=dtype).reshape(stack.shape[0], stack.shape[-1])
    codebook = codebook.to(device=stack.device, dtype=dtype)
    scale_b, scale_a = svd_init(stack, block_size, rank, exact=exact_init, seed=seed)

    (scale_b, scale_a), error_init, _ = refine_scales(
        stack, codebook, [scale_b, scale_a], LOW_RANK, steps, lr, channels, progress
    )
    scale_b, scale_a = scale_b.to(scale_dtype), scale_a.to(scale_dtype)
    scale = scale_b.to(dtype) @ scale_a.to(dtype)
    codes = assign_codes(stack, scale, codebook)
    error = relative_error(stack, reconstruct(scale, codes, codebook), channels)
    if single:
        return LoRDSFactors(scale_b[0], scale_a[0], codes[0], error_init[0], error[0])
    return LoRDSFactors(scale_b, scale_a, codes, error_init, error)


def blockwise_refine(
    weight: torch.Tensor,
    codebook: torch.Tensor,
    block_size: int,
    steps: int,
    lr: float = 0.1,
    channel_weight: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same refinement budget given to the block-wise baseline: Adam on its absmax block scales.
    weight (n, m) or (L, n, m); returns (codes, block scales rounded to scale_dtype), codes assigned for them."""
    check_weight(weight)
    stack = _as_stack(weight).to(compute_dtype(weight))
    codebook = codebook.to(stack)
    channels = None if channel_weight is None else channel_weight.to(stack).reshape(stack.shape[0], stack.shape[-1])
    (block_scale,), _, _ = refine_scales(
        stack, codebook, [block_absmax(stack, block_size)], block_scale_form(block_size), steps, lr, channels,
    )
    block_scale = block_scale.to(scale_dtype)
    codes = assign_codes(stack, expand_blocks(block_scale.to(stack.dtype), block_size), codebook)
    if weight.dim() == 2:
        return codes[0], block_scale[0]
    return codes, block_scale
