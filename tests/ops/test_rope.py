import types

import pytest
import torch

from llmkern.ops.rope import (
    apply_rotary_emb,
    rope_cos_sin_cache,
    rope_cos_sin_cache_from_config,
    rope_inv_freq,
    rotary_embedding_,
    rotary_embedding_ref,
)
from tests.helpers import DTYPES, assert_close_derived, poisoned_like, strided

# (head_dim, rotary_dim): full rotary at odd-ish sizes (118 = 59*2, 112 = 111+1), and partial rotary.
HEAD_DIMS = [(64, 64), (128, 128), (118, 118), (112, 112), (128, 32), (118, 64)]
TOKENS = [1, 7, 113]
STYLES = [True, False]  # is_neox: NeoX (rotate_half) or GPT-J (interleaved pairs)
MAX_POS = 1024


def make_positions(shape, max_pos=MAX_POS):
    """Shuffled positions with repeats (as in a batch of sequences)."""
    pos = torch.randint(0, max_pos, shape)
    flat = pos.view(-1)
    if flat.numel() > 2:
        flat[-1] = flat[0]
    return pos


def poisoned_cache(rotary_dim, positions, max_pos=MAX_POS, **kwargs):
    """The real cache with every row that `positions` never uses set to NaN: reading one shows up."""
    cache = rope_cos_sin_cache(rotary_dim, max_pos, **kwargs)
    unused = torch.ones(max_pos, dtype=torch.bool)
    unused[positions.reshape(-1)] = False
    cache[unused] = float("nan")
    return cache


def check(out, x, pos, cache, is_neox, inverse=False, name="out"):
    """out vs the float64 reference under the 2x rule; features past rotary_dim must be bit-exact copies."""
    want = rotary_embedding_ref(x.double(), pos, cache, is_neox, inverse)
    assert_close_derived(out, want, rotary_embedding_ref(x, pos, cache, is_neox, inverse), name=name)
    r = cache.shape[1]
    assert torch.equal(out[..., r:], x[..., r:]), f"{name}: pass-through features changed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", HEAD_DIMS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("is_neox", STYLES)
def test_rope_forward_and_in_place(cpu_isa, dtype, head_dim, rotary_dim, tokens, is_neox):
    pos = make_positions((tokens,))
    cache = poisoned_cache(rotary_dim, pos)
    q = torch.randn(tokens, 4, head_dim, dtype=dtype)
    k = torch.randn(tokens, 2, head_dim, dtype=dtype)
    check(apply_rotary_emb(q, pos, cache, is_neox), q, pos, cache, is_neox)
    q2, k2 = q.clone(), k.clone()
    rotary_embedding_(pos, q2, k2, cache, is_neox)
    check(q2, q, pos, cache, is_neox, name="query")
    check(k2, k, pos, cache, is_neox, name="key")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("is_neox", STYLES)
def test_inverse(cpu_isa, dtype, is_neox):
    pos = make_positions((33,))
    cache = poisoned_cache(64, pos)
    x = torch.randn(33, 3, 118, dtype=dtype)
    out = torch.ops.llmkern.rotary_embedding(pos, x, cache, is_neox, True)
    check(out, x, pos, cache, is_neox, inverse=True)
    if dtype == torch.float64:  # R(-theta) R(theta) = I
        back = torch.ops.llmkern.rotary_embedding(pos, apply_rotary_emb(x, pos, cache, is_neox), cache, is_neox, True)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-6)  # cos^2 + sin^2 = 1 to float32 rounding


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", STYLES)
def test_gqa_views_into_fused_qkv(cpu_isa, dtype, is_neox):
    tokens, hq, hk, hd = 5, 32, 8, 128
    pos = make_positions((tokens,))
    cache = poisoned_cache(hd, pos)
    qkv = torch.randn(tokens, (hq + 2 * hk) * hd, dtype=dtype)
    q_size, kv_size = hq * hd, hk * hd
    q = qkv[:, :q_size].view(tokens, hq, hd)  # token stride (hq + 2 hk) hd, not hq hd: no copy may be made
    k = qkv[:, q_size : q_size + kv_size].view(tokens, hk, hd)
    q0, k0, v0 = q.clone(), k.clone(), qkv[:, q_size + kv_size :].clone()
    rotary_embedding_(pos, q, k, cache, is_neox)
    check(q, q0, pos, cache, is_neox, name="query")
    check(k, k0, pos, cache, is_neox, name="key")
    assert torch.equal(qkv[:, q_size + kv_size :], v0), "v was written"
    check(apply_rotary_emb(k0, pos, cache, is_neox), k0, pos, cache, is_neox)


def test_key_none_and_head_stride(cpu_isa):
    pos = make_positions((7,))
    cache = poisoned_cache(32, pos)
    # [tokens, heads, head_dim] view with a padded head stride (heads 40 apart, head_dim 32).
    buf = torch.randn(7, 4, 40)
    q = buf[..., :32]
    q0, pad0 = q.clone(), buf[..., 32:].clone()
    rotary_embedding_(pos, q, None, cache)
    check(q, q0, pos, cache, True, name="query")
    assert torch.equal(buf[..., 32:], pad0)


@pytest.mark.parametrize("is_neox", STYLES)
def test_leading_dims(cpu_isa, is_neox):
    pos = make_positions((2, 5))  # [batch, seq]
    cache = poisoned_cache(48, pos)
    x = torch.randn(2, 5, 3, 64)
    check(apply_rotary_emb(x, pos, cache, is_neox), x, pos, cache, is_neox)
    x2 = x.clone()
    rotary_embedding_(pos, x2, None, cache, is_neox)
    check(x2, x, pos, cache, is_neox, name="query")
    # Leading dims that no single token stride describes: copied out of place, rejected in place.
    xt = torch.randn(5, 2, 3, 64).transpose(0, 1)
    check(apply_rotary_emb(xt, pos, cache, is_neox), xt, pos, cache, is_neox)
    with pytest.raises(RuntimeError, match="query: written in place"):
        rotary_embedding_(pos, xt, None, cache, is_neox)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,rotary_dim", [(128, 128), (118, 64)])
@pytest.mark.parametrize("is_neox", STYLES)
def test_out_variant(cpu_isa, dtype, head_dim, rotary_dim, is_neox):
    tokens, heads = 37, 3
    pos = make_positions((tokens,))
    cache = poisoned_cache(rotary_dim, pos)
    x = torch.randn(tokens, heads, head_dim, dtype=dtype)
    x0 = x.clone()
    # Contiguous, then a strided view (padded heads) into a NaN buffer: unwritten elements stay NaN.
    for out in (poisoned_like(x), strided(poisoned_like(x))):
        assert apply_rotary_emb(x, pos, cache, is_neox, out=out) is out
        check(out, x, pos, cache, is_neox)  # includes the pass-through features, copied bit-exact
    # The q part of a fused qkv buffer (token stride (hq + 2 hk) hd), inverse; v must stay untouched.
    qkv = torch.full((tokens, (heads + 2) * head_dim), float("nan"), dtype=dtype)
    out = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    torch.ops.llmkern.rotary_embedding_out(out, pos, x, cache, is_neox, True)
    check(out, x, pos, cache, is_neox, inverse=True)
    assert qkv[:, heads * head_dim :].isnan().all(), "out of bounds write"
    assert torch.equal(x, x0), "x was written"
    # out is x: in place.
    y = x.clone()
    apply_rotary_emb(y, pos, cache, is_neox, out=y)
    check(y, x, pos, cache, is_neox)


def test_empty_tokens():
    pos = torch.empty(0, dtype=torch.long)
    cache = rope_cos_sin_cache(64, 16)
    q = torch.randn(0, 4, 64)
    rotary_embedding_(pos, q, torch.randn(0, 2, 64), cache)
    assert apply_rotary_emb(q, pos, cache).shape == (0, 4, 64)


@pytest.mark.parametrize("is_neox", STYLES)
def test_gradcheck_float64(cpu_isa, is_neox):
    pos = make_positions((3,), 32)
    cache = rope_cos_sin_cache(4, 32)  # partial rotary: 4 of 8 features
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    fn = lambda x: apply_rotary_emb(x, pos, cache, is_neox)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def grad(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    fn(x).backward(dy.to(x.dtype))
    return x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", STYLES)
def test_backward_low_precision(cpu_isa, dtype, is_neox):
    pos = make_positions((33,))
    cache = poisoned_cache(64, pos)
    x = torch.randn(33, 4, 118, dtype=dtype)
    dy = torch.randn(33, 4, 118)
    kern = grad(lambda x: apply_rotary_emb(x, pos, cache, is_neox), x, dy)
    ref = grad(lambda x: rotary_embedding_ref(x, pos, cache, is_neox), x.double(), dy)
    torch_same = grad(lambda x: rotary_embedding_ref(x, pos, cache, is_neox), x, dy)
    assert_close_derived(kern, ref, torch_same, name="dx")


def test_backward_expanded_grad():
    # sum()'s gradient is an expanded tensor (all strides 0): the op copies it rather than misread it.
    pos = make_positions((7,))
    cache = poisoned_cache(32, pos)
    x = torch.randn(7, 3, 64, requires_grad=True)
    apply_rotary_emb(x, pos, cache).sum().backward()
    want = rotary_embedding_ref(torch.ones(7, 3, 64, dtype=torch.float64), pos, cache, True, inverse=True)
    torch.testing.assert_close(x.grad, want.float())


# ---- against transformers (Llama's rotary embedding and apply_rotary_pos_emb) ----

HF_ROPE = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("kind", list(HF_ROPE))
def test_matches_transformers_llama(kind):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    heads, kv_heads, head_dim, max_pos = 4, 2, 64, 4096
    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      num_hidden_layers=1, intermediate_size=64, vocab_size=32, max_position_embeddings=max_pos,
                      rope_theta=500000.0, rope_scaling=HF_ROPE[kind])
    hf = LlamaRotaryEmbedding(cfg)
    ours = rope_cos_sin_cache_from_config(cfg)
    assert ours.shape == (max_pos, head_dim) and ours.dtype == torch.float32
    assert torch.equal(rope_inv_freq(head_dim, 500000.0, HF_ROPE[kind]), hf.inv_freq), "inv_freq differs"

    pos = make_positions((2, 9), max_pos)  # [batch, seq]
    q = torch.randn(2, heads, 9, head_dim)  # transformers' layout: [batch, heads, seq, head_dim]
    k = torch.randn(2, kv_heads, 9, head_dim)
    cos, sin = hf(q, pos)  # [batch, seq, head_dim], each half repeated
    half = head_dim // 2
    # transformers rounds the angle to float32: error up to position * 2^-24 rad, plus cos/sin rounding.
    tol = pos[..., None].double() * 2.0**-24 + 2.0**-23
    for theirs, mine in ((cos, ours[pos, :half]), (sin, ours[pos, half:])):
        assert torch.equal(theirs[..., :half], theirs[..., half:])
        assert ((theirs[..., :half].double() - mine.double()).abs() <= tol).all()

    q_embed, k_embed = apply_rotary_pos_emb(q, k, cos, sin)
    scale = 2 * (pos.max().item() * 2.0**-24 + 2.0**-22)
    q_ours = apply_rotary_emb(q.transpose(1, 2), pos, ours)  # [batch, seq, heads, head_dim] view (copied)
    k_ours = k.transpose(1, 2).contiguous()
    rotary_embedding_(pos, q_ours.clone(), k_ours, ours)
    for name, theirs, mine, x in (("q", q_embed, q_ours, q), ("k", k_embed, k_ours, k)):
        torch.testing.assert_close(mine.transpose(1, 2), theirs, rtol=0, atol=scale * x.abs().max().item(), msg=name)


def test_cache_from_old_style_config_and_partial_rotary():
    # transformers 4.x attributes: rope_theta, rope_scaling (with the older key "type"), partial_rotary_factor.
    cfg = types.SimpleNamespace(hidden_size=256, num_attention_heads=2, max_position_embeddings=64,
                                rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0},
                                partial_rotary_factor=0.25)
    want = rope_cos_sin_cache(32, 64, 1e4, {"rope_type": "linear", "factor": 2.0})
    assert torch.equal(rope_cos_sin_cache_from_config(cfg), want)
    assert rope_cos_sin_cache_from_config(cfg, max_position=8).shape == (8, 32)
    # Angles in float64: the last row matches float64 math to float32 rounding.
    inv = 1.0 / 1e4 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32) / 2.0
    torch.testing.assert_close(want[-1, :16].double(), (63 * inv).cos(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rope_scaling,message", [
    ({"rope_type": "yarn", "factor": 4.0}, "rope_scaling: unsupported rope_type 'yarn'"),
    ({"rope_type": "llama3", "factor": 8.0}, "rope_scaling: rope_type 'llama3' needs 'low_freq_factor'"),
    ("dynamic", "rope_scaling: unsupported rope_type 'dynamic'"),
])
def test_cache_bad_rope_scaling(rope_scaling, message):
    with pytest.raises(ValueError, match=message):
        rope_cos_sin_cache(64, 16, rope_scaling=rope_scaling)
    with pytest.raises(ValueError, match="rotary_dim: expected a positive even int"):
        rope_cos_sin_cache(63, 16)


def test_opcheck():
    pos = make_positions((7,), 64)
    cache = rope_cos_sin_cache(32, 64)
    x = torch.randn(7, 4, 48)
    ops = torch.ops.llmkern
    torch.library.opcheck(ops.rotary_embedding, (pos, x.clone().requires_grad_(), cache, True, False))
    torch.library.opcheck(ops.rotary_embedding_, (pos, x.clone(), torch.randn(7, 2, 48), cache, True))
    torch.library.opcheck(ops.rotary_embedding_, (pos, x.clone(), None, cache, False))
    torch.library.opcheck(ops.rotary_embedding_out, (torch.empty_like(x), pos, x, cache, True, False))
    torch.library.opcheck(ops.rotary_embedding_out, (strided(torch.empty_like(x)), pos, x, cache, False, True))


@pytest.mark.parametrize("bad", [64, -1])
def test_out_of_range_position_leaves_query_unchanged(cpu_isa, bad):
    pos = torch.tensor([3, 5, bad, 1])
    cache = rope_cos_sin_cache(32, 64)
    q, k = torch.randn(4, 2, 32), torch.randn(4, 1, 32)
    q0, k0 = q.clone(), k.clone()
    with pytest.raises(IndexError, match=rf"positions: value {bad} at \(flat\) index 2 is outside \[0, max_position=64\)"):
        rotary_embedding_(pos, q, k, cache)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    with pytest.raises(IndexError, match="positions: value"):
        apply_rotary_emb(q, pos, cache)
    out = poisoned_like(q)
    with pytest.raises(IndexError, match="positions: value"):
        apply_rotary_emb(q, pos, cache, out=out)
    assert out.isnan().all(), "out was written before the positions were checked"


POS, CACHE = torch.arange(3), rope_cos_sin_cache(16, 8)
Q, K = torch.randn(3, 2, 16), torch.randn(3, 1, 16)
BAD = [
    ("positions", lambda: rotary_embedding_(POS.int(), Q, K, CACHE), r"positions: expected dtype int64 .*got Int; convert"),
    ("positions", lambda: apply_rotary_emb(Q, POS[:2], CACHE), r"positions: expected shape \[3\]"),
    ("query", lambda: rotary_embedding_(POS, torch.randn(3, 2, 15), None, rope_cos_sin_cache(8, 8)), "query: expected an even head_dim"),
    ("cos_sin_cache", lambda: apply_rotary_emb(torch.randn(3, 2, 8), POS, CACHE), r"cos_sin_cache: expected an even rotary_dim .*head_dim=8\], got 16"),
    ("cos_sin_cache", lambda: rotary_embedding_(POS, Q, K, CACHE.double()), "cos_sin_cache: expected dtype float32"),
    ("cos_sin_cache", lambda: apply_rotary_emb(Q, POS, CACHE.t().contiguous().t()), "cos_sin_cache: expected a contiguous"),
    ("cos_sin_cache", lambda: apply_rotary_emb(Q, POS, CACHE[:, :15]), "cos_sin_cache: expected an even rotary_dim"),
    ("cos_sin_cache", lambda: apply_rotary_emb(Q, POS, CACHE.to("meta")), "cos_sin_cache: expected the device of x"),
    ("positions", lambda: rotary_embedding_(POS.to("meta"), Q, K, CACHE), "positions: expected the device of query"),
    ("key", lambda: rotary_embedding_(POS, Q, K.half(), CACHE), "key: expected the dtype of query"),
    ("key", lambda: rotary_embedding_(POS, Q, torch.randn(2, 1, 16), CACHE), r"key: expected the token dims of query \[3\]"),
    ("x", lambda: apply_rotary_emb(Q.int(), POS, CACHE), "x: expected dtype float32"),
    ("x", lambda: apply_rotary_emb(torch.randn(16), POS, CACHE), r"x: expected \[..., heads, head_dim\]"),
    ("query", lambda: rotary_embedding_(POS, torch.randn(3, 2, 32)[..., ::2], None, CACHE), "query: written in place"),
    ("query", lambda: rotary_embedding_(POS, torch.randn(1, 1, 16).expand(3, 2, 16), None, CACHE), "query: written in place, so its elements must not overlap"),
    ("out", lambda: apply_rotary_emb(Q, POS, CACHE, out=torch.empty(3, 2, 18)), r"out: expected the shape of x \[3, 2, 16\]"),
    ("out", lambda: apply_rotary_emb(Q, POS, CACHE, out=torch.empty_like(Q).half()), "out: expected the dtype of x"),
    ("out", lambda: apply_rotary_emb(Q, POS, CACHE, out=torch.empty_like(Q, device="meta")), "out: expected the device of x"),
    ("out", lambda: apply_rotary_emb(Q, POS, CACHE, out=torch.empty(3, 2, 32)[..., ::2]), "out: written by the kernel, so it needs unit stride"),
    ("out", lambda: apply_rotary_emb(Q[None].expand(2, 3, 2, 16), POS.expand(2, 3), CACHE, out=torch.empty(3, 2, 2, 16).transpose(0, 1)), "out: written by the kernel"),
    ("out", lambda: apply_rotary_emb(Q, POS, CACHE, out=torch.empty(1, 1, 16).expand(3, 2, 16)), "out: its elements must not overlap"),
    ("out", lambda: apply_rotary_emb(Q[:2], POS[:2], CACHE, out=Q[1:]), "out: expected memory disjoint from x.s or exactly the same"),
]


@pytest.mark.parametrize("arg,call,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises(arg, call, message):
    with pytest.raises((RuntimeError, TypeError, ValueError, IndexError), match=message):
        call()
