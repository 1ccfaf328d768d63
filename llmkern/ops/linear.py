"""Dense linear, y = x @ weight.T (+ bias), with fp32 accumulation (CPU).

Made for decoding, where a bf16 weight is read from memory for a handful of rows of x: torch's CPU bf16
matmul runs that at a fraction of the read bandwidth on CPUs without AVX512_BF16; this kernel reads each
weight element once per call. From 32 rows of x (16 with K <= 512: batched decoding, verification,
prefill) the product runs in outer-product form, compute-bound near the fp32 FMA rate (see
csrc/kernels/linear.cpp). The backward (dx = dy @ W, dW = dy^T x, dbias) is torch's matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkern._ext import available, ops
from llmkern.ops._common import acc_dtype, check_same_device


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    acc = acc_dtype(x.dtype)
    y = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N], every tensor of x's dtype (fp32, bf16, fp16;
    fp64 for gradcheck) on the CPU. Differentiable in x, weight and bias."""
    return ops().linear(x, weight, bias)


def _register() -> None:
    @torch.library.register_fake("llmkern::linear")
    def _(x, weight, bias=None):
        check_same_device("x", x, weight=weight, bias=bias)
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def setup(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)

    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        rows = dy.reshape(-1, dy.shape[-1])
        dweight = rows.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        dbias = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias

    torch.library.register_autograd("llmkern::linear", backward, setup_context=setup)


if available():
    _register()
