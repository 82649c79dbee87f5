"""The kernels as torch operators (torch.ops.lords.*), for torch.compile.

A compiled model sees each call as one operator with a known output (the fake functions below) and traces neither
the wrappers' Python (autotuning, the kernel choice, workspaces) nor the Triton launches: traced, Dynamo fails
inside them. Inductor fuses what surrounds the LoRDS layers and calls these kernels between.

`matmul`, `dequantize` and `scale_grads` call the operator only while torch.compile traces; eager calls go to the
functions directly, because the dispatcher's round trip to a Python operator cost about 60 us of host time a call on
the H100 machine (README), a decode step makes 224 of them on an 8B model, and eager decoding is host-bound.
"""

from typing import Optional

import torch
from torch import Tensor

from . import dequantize as _dequantize
from . import fused_matmul, lords_matmul
from . import grouped_matmul as _grouped_matmul
from . import scale_grads as _scale_grads


def _operator(name: str, function, fake):
    operator = torch.library.custom_op(f"lords::{name}", function, mutates_args=())
    operator.register_fake(fake)

    def call(*args):
        return (operator if torch.compiler.is_compiling() else function)(*args)

    call.operator = operator
    call.__doc__ = function.__doc__
    return call


# torch.library reads an operator's schema from its function's type annotations, which the kernel wrappers do not
# carry: these thin functions give them.
def _matmul(x: Tensor, codes: Tensor, codebook: Tensor, scale_b: Tensor, scale_a: Tensor, bits: int,
            bias: Optional[Tensor], fused: bool) -> Tensor:
    """x (..., K) @ ((B @ A) * C[codes])^T + bias: lords_matmul, or fused_matmul (never the dense weight)."""
    kernel = fused_matmul if fused else lords_matmul
    return kernel(x, codes, codebook, scale_b, scale_a, bits, bias)


def _matmul_fake(x, codes, codebook, scale_b, scale_a, bits, bias, fused):
    return x.new_empty(*x.shape[:-1], scale_b.shape[0])


def _dequantize_op(codes: Tensor, codebook: Tensor, scale_b: Tensor, scale_a: Tensor, bits: int,
                   dtype: torch.dtype) -> Tensor:
    """The dense (N, K) weight in `dtype`."""
    return _dequantize(codes, codebook, scale_b, scale_a, bits, dtype)


def _dequantize_fake(codes, codebook, scale_b, scale_a, bits, dtype):
    return codes.new_empty(scale_b.shape[0], scale_a.shape[1], dtype=dtype)


def _scale_grads_op(grad_out: Tensor, x: Tensor, codes: Tensor, codebook: Tensor, scale_b: Tensor, scale_a: Tensor,
                    bits: int) -> tuple[Tensor, Tensor]:
    """(dL/dB, dL/dA) in float32."""
    return _scale_grads(grad_out, x, codes, codebook, scale_b, scale_a, bits)


def _scale_grads_fake(grad_out, x, codes, codebook, scale_b, scale_a, bits):
    return (scale_b.new_empty(scale_b.shape, dtype=torch.float32),
            scale_a.new_empty(scale_a.shape, dtype=torch.float32))


def _grouped_matmul_op(x: Tensor, experts: Tensor, codes: Tensor, codebook: Tensor, scale_b: Tensor,
                       scale_a: Tensor, bits: int, pairs: Optional[Tensor] = None) -> Tensor:
    """Row t of x (T, K) times each of its stacked matrices experts[t] (T, k) -> (T, k, N): lords.kernels'
    grouped_matmul (decode kernel for a few pairs, grouped tiled kernel beyond; pairs from route_pairs)."""
    return _grouped_matmul(x, experts, codes, codebook, scale_b, scale_a, bits, pairs)


def _grouped_matmul_fake(x, experts, codes, codebook, scale_b, scale_a, bits, pairs=None):
    return x.new_empty(*experts.shape, scale_b.shape[1])


matmul = _operator("matmul", _matmul, _matmul_fake)
grouped_matmul = _operator("grouped_matmul", _grouped_matmul_op, _grouped_matmul_fake)
dequantize = _operator("dequantize", _dequantize_op, _dequantize_fake)
scale_grads = _operator("scale_grads", _scale_grads_op, _scale_grads_fake)
