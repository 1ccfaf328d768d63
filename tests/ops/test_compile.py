"""A small transformer block (norm, rope, QK-norm, SwiGLU) under torch.compile(fullgraph=True)."""

import pytest
import torch

import llmkern.ops as lk

T, H, KV, D, HIDDEN, FFN = 7, 4, 2, 16, 64, 96


def params(requires_grad):
    g = torch.Generator().manual_seed(1)

    def p(*shape):
        return (torch.randn(*shape, generator=g) / shape[0] ** 0.5).requires_grad_(requires_grad)

    return dict(
        w_norm=p(HIDDEN), w_q=p(HIDDEN, H * D), w_k=p(HIDDEN, KV * D), w_qnorm=p(D), w_gate_up=p(HIDDEN, 2 * FFN)
    )


def train_block(x, residual, positions, cache, w_norm, w_q, w_k, w_qnorm, w_gate_up):
    h, residual = lk.fused_add_rms_norm(x, residual, w_norm, 1e-6)
    q = lk.rms_norm((h @ w_q).view(T, H, D), w_qnorm, 1e-6)  # QK-norm: per-head RMSNorm
    k = (h @ w_k).view(T, KV, D)
    q = lk.apply_rotary_emb(q, positions, cache)
    k = lk.apply_rotary_emb(k, positions, cache, is_neox=False)
    a = lk.silu_and_mul(h @ w_gate_up) + lk.gelu_mul(h, h)[:, :1]
    return q, k, a, residual


def decode_block(x, residual, positions, cache, w_norm, w_q, w_k, w_qnorm, w_gate_up):
    lk.fused_add_rms_norm_(x, residual, w_norm, 1e-6)
    q = (x @ w_q).view(T, H, D)
    k = (x @ w_k).view(T, KV, D)
    lk.rotary_embedding_(positions, q, k, cache)
    out = torch.empty(T, FFN, dtype=x.dtype)
    lk.silu_and_mul(x @ w_gate_up, out=out)
    return q, k, out, residual


def inputs():
    positions = torch.randperm(64)[:T]
    cache = lk.rope_cos_sin_cache(D, 64)
    return torch.randn(T, HIDDEN), torch.randn(T, HIDDEN), positions, cache


def test_training_block_compiled_matches_eager():
    torch._dynamo.reset()
    x, residual, positions, cache = inputs()
    w = params(True)
    eager = train_block(x, residual, positions, cache, **w)
    compiled_fn = torch.compile(train_block, fullgraph=True)
    compiled = compiled_fn(x, residual, positions, cache, **w)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    grads_e = torch.autograd.grad(sum(t.sum() for t in eager), list(w.values()))
    grads_c = torch.autograd.grad(sum(t.sum() for t in compiled), list(w.values()))
    for name, e, c in zip(w, grads_e, grads_c):
        torch.testing.assert_close(c, e, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_decode_block_compiled_matches_eager(dtype):
    torch._dynamo.reset()
    x, residual, positions, cache = inputs()
    w = {k: v.to(dtype) for k, v in params(False).items()}
    x, residual = x.to(dtype), residual.to(dtype)
    with torch.no_grad():
        eager = decode_block(x.clone(), residual.clone(), positions, cache, **w)
        x_c, res_c = x.clone(), residual.clone()
        compiled = torch.compile(decode_block, fullgraph=True)(x_c, res_c, positions, cache, **w)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.to(dtype), e.to(dtype))
    torch.testing.assert_close(res_c, eager[3])  # the in-place update reached the caller's tensor
