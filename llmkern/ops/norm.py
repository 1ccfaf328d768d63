"""RMSNorm and fused residual-add RMSNorm (forward and backward kernels).

y = x / sqrt(mean(x^2, -1) + eps) * w', where w' is `weight`, `1 + weight` (Gemma, weight_offset=True)
or 1 (weight=None). Applied per head ([..., heads, head_dim] with a [head_dim] weight) it is QK-Norm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkern._ext import available, ops
from llmkern.ops._common import acc_dtype, check_same_device


# ---- pure-PyTorch references (the definition; tests run them in float64) ----


def rms_norm_ref(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, weight_offset: bool = False) -> Tensor:
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        w = weight.to(acc)
        y = y * (1 + w if weight_offset else w)
    return y.to(x.dtype)


def fused_add_rms_norm_ref(
    x: Tensor, residual: Tensor, weight: Tensor | None = None, eps: float = 1e-6, weight_offset: bool = False
) -> tuple[Tensor, Tensor]:
    s = x + residual
    return rms_norm_ref(s, weight, eps, weight_offset), s


# ---- public ops ----


def rms_norm(
    x: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-6,
    *,
    weight_offset: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """RMSNorm over the last dim of x [..., hidden] with weight [hidden] (or None).

    Differentiable in x and weight. With `out`, writes into it (inference; no autograd)."""
    if out is not None:
        ops().rms_norm_out(out, x, weight, eps, weight_offset)
        return out
    return ops().rms_norm(x, weight, eps, weight_offset)[0]


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor | None = None, eps: float = 1e-6, *, weight_offset: bool = False
) -> tuple[Tensor, Tensor]:
    """s = x + residual; returns (rms_norm(s), s) in one pass. Differentiable."""
    out, s, _ = ops().fused_add_rms_norm(x, residual, weight, eps, weight_offset)
    return out, s


def fused_add_rms_norm_(
    x: Tensor, residual: Tensor, weight: Tensor | None = None, eps: float = 1e-6, *, weight_offset: bool = False
) -> None:
    """In place, for inference (vLLM's contract): residual += x, then x = rms_norm(residual)."""
    ops().fused_add_rms_norm_(x, residual, weight, eps, weight_offset)


# ---- torch.compile and autograd registration ----


def _register() -> None:
    def rows(x: Tensor) -> int:
        return x.numel() // x.shape[-1] if x.shape[-1] else 0

    @torch.library.register_fake("llmkern::rms_norm")
    def _(x, weight, eps, weight_offset):
        check_same_device("x", x, weight=weight)
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
            rows(x), dtype=acc_dtype(x.dtype)
        )

    @torch.library.register_fake("llmkern::rms_norm_out")
    def _(out, x, weight, eps, weight_offset):
        return None

    @torch.library.register_fake("llmkern::fused_add_rms_norm")
    def _(x, residual, weight, eps, weight_offset):
        check_same_device("x", x, residual=residual, weight=weight)
        like = torch.empty_like(x, memory_format=torch.contiguous_format)
        return like, torch.empty_like(like), x.new_empty(rows(x), dtype=acc_dtype(x.dtype))

    @torch.library.register_fake("llmkern::fused_add_rms_norm_")
    def _(x, residual, weight, eps, weight_offset):
        return None

    @torch.library.register_fake("llmkern::rms_norm_bwd")
    def _(dy, x, weight, rstd, weight_offset, dresidual):
        dweight = x.new_empty(x.shape[-1] if weight is not None else 0)
        return torch.empty_like(x, memory_format=torch.contiguous_format), dweight

    @torch.library.register_fake("llmkern::rms_norm_bwd_out")
    def _(dx, dweight, dy, x, weight, rstd, weight_offset, dresidual):
        return None

    def save(ctx, x_normed, weight, rstd, weight_offset):
        ctx.save_for_backward(x_normed, weight, rstd)
        ctx.weight_offset = weight_offset

    def grads(ctx, dy, dresidual):
        x_normed, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x_normed)
        dx, dweight = ops().rms_norm_bwd(dy, x_normed, weight, rstd, ctx.weight_offset, dresidual)
        return dx, (dweight if weight is not None else None)

    def rms_norm_setup(ctx, inputs, output):
        x, weight, _, weight_offset = inputs
        save(ctx, x, weight, output[1], weight_offset)

    def rms_norm_backward(ctx, dy, _drstd):
        dx, dweight = grads(ctx, dy, None)
        return dx, dweight, None, None

    torch.library.register_autograd("llmkern::rms_norm", rms_norm_backward, setup_context=rms_norm_setup)

    def fused_setup(ctx, inputs, output):
        _, _, weight, _, weight_offset = inputs
        save(ctx, output[1], weight, output[2], weight_offset)

    def fused_backward(ctx, dy, dsum, _drstd):
        ds, dweight = grads(ctx, dy, dsum)
        return ds, ds, dweight, None, None

    torch.library.register_autograd("llmkern::fused_add_rms_norm", fused_backward, setup_context=fused_setup)

    # Under autocast the norms run in float32, as torch's own layer_norm does: their inputs mix the autocast
    # dtype (a linear's output) with float32 (the gain, the residual stream), and the residual stream stays float32.
    for op in ("llmkern::rms_norm", "llmkern::fused_add_rms_norm"):
        for device in ("cpu", "cuda"):
            torch.library.register_autocast(op, device, torch.float32)


if available():
    _register()
