"""Quantization-aware training (spec §5): train W, B and A jointly through the quantizer, then export LoRDSLinear.

Forward: S = B A, q = clamp(W / S, c_min, c_max), W_hat = S * (q + stopgrad(C[codes] - q)) with codes the nearest
levels of W / S. So dW_hat/dW = 1 inside the codebook's range and 0 outside (straight-through), and
dW_hat/dS = C[codes] - W / S inside, C[codes] outside (the LSQ gradient).
"""

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .blockwise import safe_divide
from .codebooks import get_codebook, nearest_codes
from .config import LoRDSConfig
from .experts import LoRDSExpertWeights
from .factorize import LoRDSFactors
from .linear import LoRDSLinear
from .model import LayerReport, lords_linear_group, set_submodule, walk_blocks


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    ratio = safe_divide(weight, scale)
    clipped = ratio.clamp(codebook[0], codebook[-1])  # codebooks are sorted; tensors avoid a GPU sync per call
    levels = codebook[nearest_codes(ratio.detach(), codebook).long()]
    return scale * (clipped + (levels - clipped).detach())


class QATLinear(nn.Module):
    """A linear layer trained through LoRDS quantization: float weight, scales B (n x r), A (r x m), codebook."""

    def __init__(self, weight, bias, scale_b: torch.Tensor, scale_a: torch.Tensor, bits: int, codebook: str):
        super().__init__()
        self.bits, self.codebook_kind = bits, codebook
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.scale_b = nn.Parameter(scale_b.detach().float().clone())
        self.scale_a = nn.Parameter(scale_a.detach().float().clone())
        self.register_buffer("codebook", get_codebook(codebook, bits).to(weight.device))

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.scale_b @ self.scale_a, self.codebook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)

    def to_lords(self, scale_dtype: torch.dtype = torch.bfloat16) -> LoRDSLinear:
        """The servable layer: scales rounded to scale_dtype, codes assigned for the rounded scales."""
        with torch.no_grad():
            scale_b, scale_a = self.scale_b.to(scale_dtype), self.scale_a.to(scale_dtype)
            codes = nearest_codes(safe_divide(self.weight, scale_b.float() @ scale_a.float()), self.codebook)
            factors = LoRDSFactors(scale_b, scale_a, codes, torch.tensor(float("nan")), torch.tensor(float("nan")))
            return LoRDSLinear.from_factors(factors, self.bits, self.codebook_kind, self.bias)


class QATExpertWeights(nn.Module):
    """The QAT form of lords.experts.LoRDSExpertWeights, inside a LoRDSExperts while training: float weights
    (E, n, m), scales (E, n, r) and (E, r, m); called with an expert index as that stack is."""

    def __init__(self, layers: list[QATLinear]):
        super().__init__()
        self.bits, self.codebook_kind = layers[0].bits, layers[0].codebook_kind
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.scale_b = nn.Parameter(torch.stack([layer.scale_b.detach() for layer in layers]))
        self.scale_a = nn.Parameter(torch.stack([layer.scale_a.detach() for layer in layers]))
        self.register_buffer("codebook", layers[0].codebook.clone())

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        weight = fake_quantize(self.weight[expert], self.scale_b[expert] @ self.scale_a[expert], self.codebook)
        return F.linear(x, weight.to(x.dtype))

    def to_lords(self, scale_dtype: torch.dtype = torch.bfloat16) -> LoRDSExpertWeights:
        """As QATLinear.to_lords, for every expert."""
        num_experts, out_features, in_features = self.weight.shape
        stack = LoRDSExpertWeights(num_experts, in_features, out_features, self.bits, self.scale_b.shape[-1],
                                   self.codebook_kind, scale_dtype, self.weight.device)
        with torch.no_grad():
            scale_b, scale_a = self.scale_b.to(scale_dtype), self.scale_a.to(scale_dtype)
            stack.set_factors(scale_b, scale_a,
                              nearest_codes(safe_divide(self.weight, scale_b.float() @ scale_a.float()), self.codebook))
        return stack


def _qat_group(names, linears, config, channel_weights, device) -> list[tuple[QATLinear, LayerReport]]:
    """LoRDS PTQ of a stack (fp32 scales) gives each QATLinear its starting scales."""
    results = lords_linear_group(names, linears, replace(config, scale_dtype="float32"), channel_weights, device)
    return [
        (QATLinear(linear.weight, linear.bias, module.scale_b, module.scale_a, config.bits, config.codebook), report)
        for linear, (module, report) in zip(linears, results)
    ]


def prepare_qat(
    model: nn.Module,
    config: LoRDSConfig,
    calibration: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[LayerReport]:
    """Replace the targeted linears of the decoder blocks by QATLinear, in place, with scales initialised by LoRDS
    PTQ (config.steps refinement steps, activation-aware when calibration is given; 0 = SVD init); the experts of MoE
    blocks become lords.experts.LoRDSExperts of QATExpertWeights."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return walk_blocks(model, config, partial(_qat_group, device=device), calibration, progress=progress,
                       stack_experts=QATExpertWeights)


def qat_parameter_groups(model: nn.Module, lr: float, scale_lr_multiplier: float = 4.0) -> list[dict]:
    """AdamW groups: the QAT weights at lr, their scales at lr * multiplier (the paper trains scales ~4x faster)."""
    weights, scales = [], []
    for module in model.modules():
        if isinstance(module, (QATLinear, QATExpertWeights)):
            weights.append(module.weight)
            scales += [module.scale_b, module.scale_a]
    if not weights:
        raise ValueError("the model has no QATLinear layers; call prepare_qat first")
    return [{"params": weights, "lr": lr}, {"params": scales, "lr": lr * scale_lr_multiplier}]


def export_qat(model: nn.Module, scale_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every QATLinear by its LoRDSLinear (and QATExpertWeights by LoRDSExpertWeights), in place: the result
    saves and serves like a PTQ model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (QATLinear, QATExpertWeights)):
            set_submodule(model, name, module.to_lords(scale_dtype))
    return model
