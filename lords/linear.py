"""LoRDSLinear: a linear layer stored as packed codes, a codebook and low-rank scales B (n x r), A (r x m)."""

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .codebooks import check_bits, get_codebook
from .factorize import LoRDSFactors, bits_per_weight
from .packing import pack_codes, row_bytes, unpack_codes, unpack_levels

# "auto": "triton" for CUDA inputs when Triton is installed, "torch" otherwise.
# "torch": the reference, dequantize in torch + matmul. "triton": lords.kernels.lords_matmul, which picks the
# decode, tiled or dequantize + cuBLAS kernel by the number of rows (results/kernels_h100.md). "fused": Triton kernels
# that never hold the dense weight, at any number of rows. Both Triton paths call lords.kernels.ops, torch operators
# while torch.compile traces, so a model with LoRDS layers compiles.
BACKENDS = ("auto", "torch", "triton", "fused")

# a constant, not a call: torch.compile traces forward() and would stop at a cached function
_TRITON = importlib.util.find_spec("triton") is not None


def _levels(codes, codebook, bits: int, scale_b, scale_a) -> torch.Tensor:
    """C[codes], the (n, m) float32 levels of the packed codes."""
    return unpack_levels(codes, bits, (scale_b.shape[0], scale_a.shape[1]), codebook)


def reference_weight(codes, codebook, scale_b, scale_a, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight (B A) * C[codes] in torch, the reference for the kernels; scales multiply in float32 before
    the cast."""
    return (scale_b.float() @ scale_a.float()).mul_(_levels(codes, codebook, bits, scale_b, scale_a)).to(dtype)


def _scale_grads_torch(grad_out, x, codes, codebook, scale_b, scale_a, bits):
    """Reference for lords.kernels.scale_grads: the dense n x m weight gradient G, then (G * C) A^T and B^T (G * C)."""
    grad_scale = (grad_out.reshape(-1, grad_out.shape[-1]).T.float() @ x.reshape(-1, x.shape[-1]).float()
                  * _levels(codes, codebook, bits, scale_b, scale_a))
    return grad_scale @ scale_a.float().T, scale_b.float().T @ grad_scale


def _dense_weight(path: str, codes, codebook, scale_b, scale_a, bits: int, dtype: torch.dtype) -> torch.Tensor:
    if path == "torch":
        return reference_weight(codes, codebook, scale_b, scale_a, bits, dtype)
    from .kernels import ops

    return ops.dequantize(codes, codebook, scale_b, scale_a, bits, dtype)


def lords_linear(x, codes, codebook, scale_b, scale_a, bits: int, bias, path: str) -> torch.Tensor:
    """x @ W^T + bias with W = (B A) * C[codes], without autograd; path "torch" (the reference), "triton" or
    "fused" (BACKENDS)."""
    if path == "torch":
        return F.linear(x, reference_weight(codes, codebook, scale_b, scale_a, bits, x.dtype), bias)
    from .kernels import ops

    return ops.matmul(x, codes, codebook, scale_b, scale_a, bits, bias, path == "fused")


class _LoRDSFunction(torch.autograd.Function):
    """lords_linear with a backward that never forms the n x m weight gradient on the Triton paths: dX = dY W (the
    dequantize + matmul path again), dB and dA from lords.kernels.scale_grads."""

    @staticmethod
    def forward(ctx, x, scale_b, scale_a, bias, codes, codebook, bits, path):
        # scale_b, scale_a are the layer's own parameters, passed so that autograd routes their gradients here.
        ctx.save_for_backward(x, scale_b, scale_a, codes, codebook)
        ctx.bits, ctx.path, ctx.has_bias = bits, path, bias is not None
        return lords_linear(x, codes, codebook, scale_b, scale_a, bits, bias, path)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale_b, scale_a, codes, codebook = ctx.saved_tensors
        bits, path = ctx.bits, ctx.path
        grad_x = grad_b = grad_a = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _dense_weight(path, codes, codebook, scale_b, scale_a, bits, grad_out.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if path == "torch":
                grad_b, grad_a = _scale_grads_torch(grad_out, x, codes, codebook, scale_b, scale_a, bits)
            else:
                from .kernels import ops

                grad_b, grad_a = ops.scale_grads(grad_out, x, codes, codebook, scale_b, scale_a, bits)
            grad_b, grad_a = grad_b.to(scale_b.dtype), grad_a.to(scale_a.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_b, grad_a, grad_bias, None, None, None, None


def kernel_path(backend: str, x: torch.Tensor) -> str:
    """What a backend (BACKENDS) runs for input x: "auto" is the Triton kernels on CUDA, the torch reference
    elsewhere."""
    return backend if backend != "auto" else "triton" if x.is_cuda and _TRITON else "torch"


def lords_forward(x, codes, codebook, scale_b, scale_a, bits: int, bias, backend: str, dense_weight=None):
    """x @ W^T + bias for one LoRDS matrix (a LoRDSLinear, or one expert of a lords.experts stack), with autograd to
    the scales when they need it; dense_weight: W already dequantized (dense_weights), used for inference."""
    # The single dispatch point between the torch reference and the Triton kernels, forward and backward.
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if not x.is_floating_point():  # the weight would be cast to the input's dtype: integers give zeros
        raise TypeError(f"LoRDSLinear takes floating inputs, got {x.dtype}")
    path = kernel_path(backend, x)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or scale_b.requires_grad or scale_a.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad and dense_weight is not None and dense_weight.dtype == x.dtype:
        return F.linear(x, dense_weight, bias)
    if not needs_grad:  # inference: no autograd node, whose bookkeeping costs host time on every call
        return lords_linear(x, codes, codebook, scale_b, scale_a, bits, bias, path)
    return _LoRDSFunction.apply(x, scale_b, scale_a, bias, codes, codebook, bits, path)


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
        self.dense_weight = None  # set by dense_weights() for a run of CPU inference

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
        return reference_weight(self.codes, self.codebook, self.scale_b, self.scale_a, self.bits, dtype)

    @property
    def bits_per_weight(self) -> float:
        scale_bits = torch.finfo(self.scale_b.dtype).bits
        return bits_per_weight(self.out_features, self.in_features, self.bits, self.rank, scale_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return lords_forward(x, self.codes, self.codebook, self.scale_b, self.scale_a, self.bits, bias, self.backend,
                             self.dense_weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"rank={self.rank}, codebook={self.codebook_kind}, bias={self.bias is not None}"
        )


@contextmanager
def dense_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """Within the block, the model's LoRDSLinear layers (and lords.experts' expert stacks) on the CPU run inference
    from their weight dequantized once (in dtype, default the model's dtype) instead of dequantizing it again on every
    forward; the dense copies are released on exit.

    On the CPU the torch path dequantizes every layer at every call, which made evaluating the 4-bit default model
    take several times the dense model's time. The copies cost the dense model's memory for the layers (0.42 GB for
    the default model in float32). Layers on a GPU keep their kernels, which never hold the dense weight.

    Example::

        with lords.dense_weights(model):
            print(perplexity(model, tokens))
    """
    # expert stacks by their dense_weight slot: lords.experts imports this module, not the other way round
    layers = [module for module in model.modules()
              if hasattr(module, "dense_weight") and hasattr(module, "codes") and module.codes.device.type == "cpu"]
    dtype = dtype or getattr(model, "dtype", torch.float32)
    try:
        for layer in layers:
            layer.dense_weight = layer.dequantize(dtype)
        yield model
    finally:
        for layer in layers:
            layer.dense_weight = None
