"""Gated activations for gated MLPs (forward and backward kernels).

SwiGLU (Llama, Qwen2, Mistral): silu(gate) * up. GeGLU (Gemma): gelu_tanh(gate) * up, with
gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))). `*_and_mul` take the fused gate_up
projection output x [..., 2d] (gate = x[..., :d], up = x[..., d:], vLLM's layout); `*_mul` take gate and
up as separate tensors of one shape (transformers' LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkern._ext import available, ops
from llmkern.ops._common import acc_dtype, check_same_device

ACTIVATIONS = ("silu", "gelu_tanh")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


# ---- pure-PyTorch references (the definition; tests run them in float64) ----


def act_mul_ref(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    _check_activation(activation)
    acc = acc_dtype(gate.dtype)
    g = gate.to(acc)
    a = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    return (a * up.to(acc)).to(gate.dtype)


def act_and_mul_ref(x: Tensor, activation: str) -> Tensor:
    d = x.shape[-1] // 2
    return act_mul_ref(x[..., :d], x[..., d:], activation)


# ---- public ops ----


def _act_and_mul(x: Tensor, activation: str, out: Tensor | None) -> Tensor:
    if out is not None:
        ops().act_and_mul_out(out, x, activation)
        return out
    return ops().act_and_mul(x, activation)


def silu_and_mul(x: Tensor, *, out: Tensor | None = None) -> Tensor:
    """SwiGLU on a fused gate-up tensor: silu(x[..., :d]) * x[..., d:] for x [..., 2d] -> [..., d].

    Differentiable in x. With `out` [..., d] (rows may be strided), writes into it (inference; no autograd)."""
    return _act_and_mul(x, "silu", out)


def gelu_and_mul(x: Tensor, *, out: Tensor | None = None) -> Tensor:
    """GeGLU (tanh approximation) on a fused gate-up tensor: gelu_tanh(x[..., :d]) * x[..., d:].

    Same contract as silu_and_mul."""
    return _act_and_mul(x, "gelu_tanh", out)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for gate and up of one shape [..., d]. Differentiable in both."""
    return ops().act_mul(gate, up, "silu")


def gelu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """gelu_tanh(gate) * up for gate and up of one shape [..., d]. Differentiable in both."""
    return ops().act_mul(gate, up, "gelu_tanh")


# ---- torch.compile and autograd registration ----


def _register() -> None:
    def halved(x: Tensor) -> Tensor:
        torch._check(x.shape[-1] % 2 == 0, lambda: f"x: expected an even last dim, got sizes {tuple(x.shape)}")
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.register_fake("llmkern::act_and_mul")
    def _(x, activation):
        return halved(x)

    @torch.library.register_fake("llmkern::act_and_mul_out")
    def _(out, x, activation):
        check_same_device("x", x, out=out)
        return None

    @torch.library.register_fake("llmkern::act_and_mul_bwd")
    def _(dy, x, activation):
        check_same_device("x", x, dy=dy)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llmkern::act_and_mul_bwd_out")
    def _(dx, dy, x, activation):
        check_same_device("x", x, dy=dy, dx=dx)
        return None

    @torch.library.register_fake("llmkern::act_mul")
    def _(gate, up, activation):
        check_same_device("gate", gate, up=up)
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llmkern::act_mul_bwd")
    def _(dy, gate, up, activation):
        check_same_device("gate", gate, up=up, dy=dy)
        like = torch.empty_like(gate, memory_format=torch.contiguous_format)
        return like, torch.empty_like(like)

    @torch.library.register_fake("llmkern::act_mul_bwd_out")
    def _(dgate, dup, dy, gate, up, activation):
        check_same_device("gate", gate, up=up, dy=dy, dgate=dgate, dup=dup)
        return None

    def and_mul_setup(ctx, inputs, output):
        x, activation = inputs
        ctx.save_for_backward(x)
        ctx.activation = activation

    def and_mul_backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return ops().act_and_mul_bwd(dy, x, ctx.activation), None

    torch.library.register_autograd("llmkern::act_and_mul", and_mul_backward, setup_context=and_mul_setup)

    def mul_setup(ctx, inputs, output):
        gate, up, activation = inputs
        ctx.save_for_backward(gate, up)
        ctx.activation = activation

    def mul_backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = ops().act_mul_bwd(dy, gate, up, ctx.activation)
        return dgate, dup, None

    torch.library.register_autograd("llmkern::act_mul", mul_backward, setup_context=mul_setup)


if available():
    _register()
