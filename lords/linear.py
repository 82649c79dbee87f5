"""LoRDSLinear: a linear layer stored as packed codes, a codebook and low-rank scales B (n x r), A (r x m)."""

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from .codebooks import check_bits, get_codebook
from .factorize import LoRDSFactors, bits_per_weight
from .packing import pack_codes, row_bytes, unpack_codes

# "auto": "triton" for CUDA inputs when Triton is installed, "torch" otherwise.
# "torch": the reference, dequantize in torch + matmul. "triton": lords.kernels.lords_matmul, which picks the decode,
# tiled or dequantize + cuBLAS kernel by the number of rows (results/kernels.md). "fused": Triton kernels that never
# hold the dense weight, at any number of rows.
BACKENDS = ("auto", "torch", "triton", "fused")


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _scale_grads_torch(grad_out, x, levels, scale_b, scale_a):
    """Reference for lords.kernels.scale_grads: the dense n x m weight gradient G, then (G * C) A^T and B^T (G * C)."""
    grad_scale = (grad_out.reshape(-1, grad_out.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()) * levels
    return grad_scale @ scale_a.float().T, scale_b.float().T @ grad_scale


class _LoRDSFunction(torch.autograd.Function):
    """Y = X W^T + bias with W = (B A) * C[codes], and a backward that never forms the n x m weight gradient on
    the Triton path: dX = dY W (the dequantize + matmul path again), dB and dA from lords.kernels.scale_grads."""

    @staticmethod
    def forward(ctx, x, scale_b, scale_a, bias, layer, use_triton):
        # scale_b, scale_a are the layer's own parameters, passed so that autograd routes their gradients here.
        ctx.save_for_backward(x, scale_b, scale_a)
        ctx.layer, ctx.use_triton, ctx.has_bias = layer, use_triton, bias is not None
        return layer.matmul(x, bias, use_triton)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale_b, scale_a = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_b = grad_a = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = layer.matmul(grad_out, None, ctx.use_triton, transposed=True)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if ctx.use_triton:
                from .kernels import scale_grads

                grad_b, grad_a = scale_grads(grad_out, x, layer.codes, layer.codebook, scale_b, scale_a, layer.bits)
            else:
                levels = layer.codebook.float()[layer.unpacked_codes().long()]
                grad_b, grad_a = _scale_grads_torch(grad_out, x, levels, scale_b, scale_a)
            grad_b, grad_a = grad_b.to(scale_b.dtype), grad_a.to(scale_a.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_b, grad_a, grad_bias, None, None


class LoRDSLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        rank: int,
        codebook: str = "nf",
        bias: bool = False,
        scale_dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        check_bits(bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.rank, self.codebook_kind = bits, rank, codebook
        self.backend = "auto"
        self.register_buffer(
            "codes", torch.zeros(out_features, row_bytes(in_features, bits), dtype=torch.uint8, device=device)
        )
        self.register_buffer("codebook", get_codebook(codebook, bits).to(device))
        self.scale_b = nn.Parameter(torch.zeros(out_features, rank, dtype=scale_dtype, device=device))
        self.scale_a = nn.Parameter(torch.zeros(rank, in_features, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_factors(
        cls, factors: LoRDSFactors, bits: int, codebook: str = "nf", bias: torch.Tensor | None = None
    ) -> "LoRDSLinear":
        out_features, rank = factors.scale_b.shape
        in_features = factors.scale_a.shape[1]
        layer = cls(
            in_features, out_features, bits, rank, codebook, bias is not None, factors.scale_b.dtype,
            factors.scale_b.device,
        )
        layer.set_factors(factors.scale_b, factors.scale_a, factors.codes)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    @torch.no_grad()
    def set_factors(self, scale_b: torch.Tensor, scale_a: torch.Tensor, codes: torch.Tensor) -> None:
        """Store new scales and (unpacked, n x m) codes of the same shapes."""
        self.codes.copy_(pack_codes(codes, self.bits))
        self.scale_b.copy_(scale_b)
        self.scale_a.copy_(scale_a)

    def unpacked_codes(self) -> torch.Tensor:
        return unpack_codes(self.codes, self.bits, (self.out_features, self.in_features))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (B A) * C[codes]; scales multiply in float32 before the cast."""
        scale = self.scale_b.float() @ self.scale_a.float()
        return (scale * self.codebook.float()[self.unpacked_codes().long()]).to(dtype)

    @property
    def bits_per_weight(self) -> float:
        scale_bits = torch.finfo(self.scale_b.dtype).bits
        return bits_per_weight(self.out_features, self.in_features, self.bits, self.rank, scale_bits)

    def matmul(self, x, bias, use_triton: bool, transposed: bool = False) -> torch.Tensor:
        """x @ W^T + bias, or x @ W when transposed (the input gradient), on the chosen path."""
        if use_triton and not transposed:
            from .kernels import fused_matmul, lords_matmul

            kernel = fused_matmul if self.backend == "fused" else lords_matmul
            return kernel(x, self.codes, self.codebook, self.scale_b, self.scale_a, self.bits, bias)
        if use_triton:
            from .kernels import dequantize

            weight = dequantize(self.codes, self.codebook, self.scale_b, self.scale_a, self.bits, x.dtype)
        else:
            weight = self.dequantize(x.dtype)
        return x @ weight if transposed else F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The single dispatch point between the torch reference and the Triton kernels, forward and backward.
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        use_triton = self.backend in ("triton", "fused") or (
            self.backend == "auto" and x.is_cuda and _triton_available()
        )
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.scale_b.requires_grad or self.scale_a.requires_grad
            or (bias is not None and bias.requires_grad))
        if not needs_grad:  # inference: no autograd node, whose bookkeeping costs host time on every call
            return self.matmul(x, bias, use_triton)
        return _LoRDSFunction.apply(x, self.scale_b, self.scale_a, bias, self, use_triton)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"rank={self.rank}, codebook={self.codebook_kind}, bias={self.bias is not None}"
        )
