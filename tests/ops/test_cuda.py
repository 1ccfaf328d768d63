"""Every llmkern op on CUDA against its pure-PyTorch reference (float64 on the CPU) with the 2x derived
tolerance, forward and backward, every dtype, odd sizes, strided inputs, poisoned outputs, and RoPE's
CUDA-only contract: out-of-range positions give NaN rows instead of an error."""

import pytest
import torch

import llmkern.ops as lk
from tests.helpers import DTYPES, assert_close_derived, grads, strided

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

DEV = "cuda"
HIDDEN = [8, 769, 4096, 5125]
TOKENS = [1, 7, 33]
WEIGHTS = ["weight", "none", "gemma"]


def _act():
    import llmkern.ops.activation as m  # imported late: collection must not need every family built

    return m


def _rope():
    import llmkern.ops.rope as m

    return m


def close(out, ref64, out_torch, name="out", factor=2.0):
    """assert_close_derived for a CUDA result: compared on the CPU against CPU-computed references."""
    assert out.is_cuda, f"{name}: expected a CUDA result, got {out.device}"
    assert_close_derived(out.cpu(), ref64.cpu(), out_torch.cpu(), factor=factor, name=name)


def poisoned(shape, dtype, pad=0):
    """A NaN-filled CUDA buffer; with pad, a row-strided view (rows pad elements further apart)."""
    return strided(torch.full(shape, float("nan"), dtype=dtype, device=DEV), pad)


# ---------------------------------------------------------------- RMSNorm


def norm_inputs(tokens, hidden, dtype, weight_kind):
    x = torch.randn(tokens, hidden, dtype=dtype)
    w = None if weight_kind == "none" else (torch.rand(hidden) + 0.5).to(dtype)
    return x, w


def cu(t):
    return None if t is None else t.to(DEV)


def dbl(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
def test_rms_norm_forward(dtype, hidden, tokens, weight_kind):
    x, w = norm_inputs(tokens, hidden, dtype, weight_kind)
    off = weight_kind == "gemma"
    out = lk.rms_norm(cu(x), cu(w), 1e-6, weight_offset=off)
    close(out, lk.rms_norm_ref(x.double(), dbl(w), 1e-6, off), lk.rms_norm_ref(x, w, 1e-6, off))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_and_poisoned_out(dtype):
    x, w = norm_inputs(15, 769, dtype, "weight")
    xs = strided(cu(x))  # misaligned rows: the scalar (non-vector) path
    out = poisoned(x.shape, dtype, pad=5)
    assert lk.rms_norm(xs, cu(w), out=out) is out
    close(out, lk.rms_norm_ref(x.double(), w.double()), lk.rms_norm_ref(x, w))
    # Aligned strided rows (pad of 16 bytes worth of elements) keep the vector path.
    xv = strided(cu(x), pad=16 // x.element_size())
    close(lk.rms_norm(xv, cu(w)), lk.rms_norm_ref(x.double(), w.double()), lk.rms_norm_ref(x, w))


def test_qk_norm_per_head():
    q, w = torch.randn(7, 4, 111), torch.randn(111)
    close(lk.rms_norm(cu(q), cu(w)), lk.rms_norm_ref(q.double(), w.double()), lk.rms_norm_ref(q, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [8, 769, 4096])
@pytest.mark.parametrize("weight_kind", WEIGHTS)
def test_fused_add_rms_norm(dtype, hidden, weight_kind):
    x, w = norm_inputs(33, hidden, dtype, weight_kind)
    res = torch.randn(33, hidden, dtype=dtype)
    off = weight_kind == "gemma"
    ref_out, ref_s = lk.fused_add_rms_norm_ref(x.double(), res.double(), dbl(w), 1e-6, off)
    t_out, t_s = lk.fused_add_rms_norm_ref(x, res, w, 1e-6, off)
    out, s = lk.fused_add_rms_norm(cu(x), cu(res), cu(w), 1e-6, weight_offset=off)
    close(s, ref_s, t_s, "residual_out")
    close(out, ref_out, t_out)
    xi, ri = cu(x), cu(res)  # in place: residual += x, x = norm(residual)
    lk.fused_add_rms_norm_(xi, ri, cu(w), 1e-6, weight_offset=off)
    close(ri, ref_s, t_s, "residual")
    close(xi, ref_out, t_out, "x")


@pytest.mark.parametrize("weight_kind", WEIGHTS)
def test_rms_norm_gradcheck_float64(weight_kind):
    x, w = norm_inputs(5, 37, torch.float64, weight_kind)
    off = weight_kind == "gemma"
    inputs = tuple(t.to(DEV).requires_grad_() for t in (x, w) if t is not None)
    fn = lambda *a: lk.rms_norm(a[0], a[1] if len(a) > 1 else None, 1e-6, weight_offset=off)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    res = torch.randn(5, 37, dtype=torch.float64, device=DEV, requires_grad=True)
    fused = lambda x, r, *w: lk.fused_add_rms_norm(x, r, w[0] if w else None, 1e-6, weight_offset=off)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (inputs[0], res, *inputs[1:]))


# 3000 rows exceed 8 groups per SM, so dw groups sum several rows; 16384 fp32 columns overflow the 48 KB
# of shared dw partials, so they accumulate in global memory.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(33, 8), (33, 769), (33, 4096), (3000, 769), (40, 16384)])
@pytest.mark.parametrize("weight_kind", ["weight", "gemma", "none"])
def test_rms_norm_backward(dtype, tokens, hidden, weight_kind):
    x, w = norm_inputs(tokens, hidden, dtype, weight_kind)
    off = weight_kind == "gemma"
    dy = torch.randn(tokens, hidden)
    args = [x] if w is None else [x, w]
    fn = lambda x, w=None: lk.rms_norm(x, w, 1e-6, weight_offset=off)  # noqa: E731
    ref_fn = lambda x, w=None: lk.rms_norm_ref(x, w, 1e-6, off)  # noqa: E731
    kern = grads(fn, [cu(a) for a in args], [dy])
    ref = grads(ref_fn, [a.double() for a in args], [dy])
    same = grads(ref_fn, args, [dy])
    for name, g, r, t in zip(["dx", "dweight"], kern, ref, same):
        close(g, r, t, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_backward(dtype):
    x, w = norm_inputs(7, 769, dtype, "weight")
    res = torch.randn(7, 769, dtype=dtype)
    dy, ds = torch.randn(7, 769), torch.randn(7, 769)
    fn = lambda x, r, w: lk.fused_add_rms_norm(x, r, w, 1e-6)  # noqa: E731
    ref_fn = lambda x, r, w: lk.fused_add_rms_norm_ref(x, r, w, 1e-6)  # noqa: E731
    kern = grads(fn, [cu(x), cu(res), cu(w)], [dy, ds])
    ref = grads(ref_fn, [x.double(), res.double(), w.double()], [dy, ds])
    same = grads(ref_fn, [x, res, w], [dy, ds])
    for name, g, r, t in zip(["dx", "dresidual", "dweight"], kern, ref, same):
        close(g, r, t, name)


def test_norm_opcheck():
    ops = torch.ops.llmkern
    x, w = torch.randn(7, 769, device=DEV), torch.randn(769, device=DEV)
    res = torch.randn(7, 769, device=DEV)
    torch.library.opcheck(ops.rms_norm, (x.clone().requires_grad_(), w.clone().requires_grad_(), 1e-6, False))
    torch.library.opcheck(ops.fused_add_rms_norm_, (x.clone(), res.clone(), w, 1e-6, False))
    _, rstd = ops.rms_norm(x, w, 1e-6, False)
    torch.library.opcheck(ops.rms_norm_bwd, (torch.randn(7, 769, device=DEV), x, w, rstd, False, None))


# ---------------------------------------------------------------- gated activations

ACTS = ["silu", "gelu_tanh"]


def packed_fn(act):
    return _act().silu_and_mul if act == "silu" else _act().gelu_and_mul


def separate_fn(act):
    return _act().silu_mul if act == "silu" else _act().gelu_mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("act", ACTS)
def test_act_and_mul_forward(dtype, d, tokens, act):
    from llmkern.ops.activation import act_and_mul_ref, act_mul_ref

    x = torch.randn(tokens, 2 * d, dtype=dtype)
    close(packed_fn(act)(cu(x)), act_and_mul_ref(x.double(), act), act_and_mul_ref(x, act))
    g, u = torch.randn(tokens, d, dtype=dtype), torch.randn(tokens, d, dtype=dtype)
    close(separate_fn(act)(cu(g), cu(u)), act_mul_ref(g.double(), u.double(), act), act_mul_ref(g, u, act))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
def test_act_and_mul_strided_out(dtype, act):
    from llmkern.ops.activation import act_and_mul_ref

    x = torch.randn(3, 5, 2 * 769, dtype=dtype)
    out = poisoned((3, 5, 769), dtype, pad=5)
    assert packed_fn(act)(strided(cu(x)), out=out) is out
    close(out, act_and_mul_ref(x.double(), act), act_and_mul_ref(x, act))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 769, 4096])
@pytest.mark.parametrize("act", ACTS)
def test_act_backward(dtype, d, act):
    from llmkern.ops.activation import act_and_mul_ref, act_mul_ref

    x, dy = torch.randn(33, 2 * d, dtype=dtype), torch.randn(33, d)
    kern = grads(packed_fn(act), [cu(x)], [dy])
    ref = grads(lambda x: act_and_mul_ref(x, act), [x.double()], [dy])
    same = grads(lambda x: act_and_mul_ref(x, act), [x], [dy])
    close(kern[0], ref[0], same[0], "dx")
    g, u = torch.randn(33, d, dtype=dtype), torch.randn(33, d, dtype=dtype)
    kern = grads(separate_fn(act), [cu(g), cu(u)], [dy])
    ref = grads(lambda g, u: act_mul_ref(g, u, act), [g.double(), u.double()], [dy])
    same = grads(lambda g, u: act_mul_ref(g, u, act), [g, u], [dy])
    for name, k, r, t in zip(["dgate", "dup"], kern, ref, same):
        close(k, r, t, name)


@pytest.mark.parametrize("act", ACTS)
def test_act_gradcheck_float64(act):
    x = torch.randn(5, 2 * 37, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(packed_fn(act), (x,))
    g, u = (torch.randn(5, 37, dtype=torch.float64, device=DEV, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(separate_fn(act), (g, u))


def test_act_opcheck():
    ops = torch.ops.llmkern
    x = torch.randn(7, 2 * 769, device=DEV, requires_grad=True)
    torch.library.opcheck(ops.act_and_mul, (x, "silu"))
    g, u = torch.randn(7, 769, device=DEV), torch.randn(7, 769, device=DEV)
    torch.library.opcheck(ops.act_mul_bwd, (torch.randn(7, 769, device=DEV), g, u, "gelu_tanh"))


# ---------------------------------------------------------------- RoPE

# (heads, kv_heads, head_dim, rotary_dim): full rotary, partial rotary (pass-through copy), odd half.
ROPE_SHAPES = [(4, 2, 128, 128), (4, 1, 64, 32), (3, 3, 110, 110), (2, 1, 96, 40)]
MAX_POS = 2048


def rope_cache(rotary_dim):
    from llmkern.ops.rope import rope_cos_sin_cache

    return rope_cos_sin_cache(rotary_dim, MAX_POS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("tokens", [1, 7, 113])
def test_rope_inplace(dtype, shape, is_neox, tokens):
    from llmkern.ops.rope import rotary_embedding_ref

    heads, kv_heads, hd, rd = shape
    cache, pos = rope_cache(rd), torch.randint(0, MAX_POS, (tokens,))
    q, k = torch.randn(tokens, heads, hd, dtype=dtype), torch.randn(tokens, kv_heads, hd, dtype=dtype)
    qc, kc = cu(q), cu(k)
    _rope().rotary_embedding_(cu(pos), qc, kc, cu(cache), is_neox)
    for name, got, t in [("query", qc, q), ("key", kc, k)]:
        ref = rotary_embedding_ref(t.double(), pos, cache, is_neox)
        close(got, ref, rotary_embedding_ref(t, pos, cache, is_neox), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rope_fused_qkv_views(dtype, is_neox):
    """q and k as views into one [tokens, (h + 2 kv) * hd] buffer: token stride != heads * head_dim."""
    from llmkern.ops.rope import rotary_embedding_ref

    tokens, heads, kv, hd = 33, 8, 2, 128
    qkv = torch.randn(tokens, (heads + 2 * kv) * hd, dtype=dtype)
    cache, pos = rope_cache(hd), torch.randint(0, MAX_POS, (tokens,))
    qkv_c = cu(qkv)
    q = qkv_c[:, : heads * hd].view(tokens, heads, hd)
    k = qkv_c[:, heads * hd : (heads + kv) * hd].view(tokens, kv, hd)
    _rope().rotary_embedding_(cu(pos), q, k, cu(cache), is_neox)
    q0, k0 = qkv[:, : heads * hd].view(tokens, heads, hd), qkv[:, heads * hd : (heads + kv) * hd].view(tokens, kv, hd)
    close(q, rotary_embedding_ref(q0.double(), pos, cache, is_neox), rotary_embedding_ref(q0, pos, cache, is_neox))
    close(k, rotary_embedding_ref(k0.double(), pos, cache, is_neox), rotary_embedding_ref(k0, pos, cache, is_neox))
    assert torch.equal(qkv_c[:, (heads + kv) * hd :].cpu(), qkv[:, (heads + kv) * hd :]), "v was written"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROPE_SHAPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rope_out_of_place_and_backward(dtype, shape, is_neox):
    from llmkern.ops.rope import rotary_embedding_ref

    heads, _, hd, rd = shape
    cache, pos = rope_cache(rd), torch.randint(0, MAX_POS, (33,))
    x, dy = torch.randn(33, heads, hd, dtype=dtype), torch.randn(33, heads, hd)
    fn = lambda x: _rope().apply_rotary_emb(x, cu(pos), cu(cache), is_neox)  # noqa: E731
    ref_fn = lambda x: rotary_embedding_ref(x, pos, cache, is_neox)  # noqa: E731
    close(fn(cu(x)), ref_fn(x.double()), ref_fn(x))
    kern, ref, same = grads(fn, [cu(x)], [dy]), grads(ref_fn, [x.double()], [dy]), grads(ref_fn, [x], [dy])
    close(kern[0], ref[0], same[0], "dx")


def test_rope_gradcheck_float64():
    cache, pos = rope_cache(32), torch.randint(0, MAX_POS, (5,))
    x = torch.randn(5, 2, 64, dtype=torch.float64, device=DEV, requires_grad=True)
    for is_neox in (True, False):
        assert torch.autograd.gradcheck(lambda x: _rope().apply_rotary_emb(x, cu(pos), cu(cache), is_neox), (x,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rope_out_of_range_positions_give_nan_rows(dtype, is_neox):
    """CUDA contract (csrc/cuda/launch.h): no host-side check (it would sync); bad tokens become NaN rows,
    and every other token is still rotated correctly."""
    from llmkern.ops.rope import rotary_embedding_ref

    tokens, heads, hd = 9, 4, 128
    cache = rope_cache(hd)
    pos = torch.randint(0, MAX_POS, (tokens,))
    bad = torch.tensor([1, 4, 8])
    pos[bad] = torch.tensor([MAX_POS, -1, 10**12])
    good = torch.ones(tokens, dtype=torch.bool)
    good[bad] = False
    x = torch.randn(tokens, heads, hd, dtype=dtype)
    out = _rope().apply_rotary_emb(cu(x), cu(pos), cu(cache), is_neox).cpu()
    assert out[bad].isnan().all(), "out-of-range tokens must be NaN rows"
    pg = pos[good]
    close(out[good].to(DEV), rotary_embedding_ref(x[good].double(), pg, cache, is_neox),
          rotary_embedding_ref(x[good], pg, cache, is_neox))
    q = cu(x)
    _rope().rotary_embedding_(cu(pos), q, None, cu(cache), is_neox)
    torch.cuda.synchronize()
    assert q[bad.to(DEV)].isnan().all()
    assert not q[good.to(DEV)].isnan().any()


def test_rope_opcheck():
    ops = torch.ops.llmkern
    cache, pos = cu(rope_cache(64)), torch.randint(0, MAX_POS, (7,), device=DEV)
    x = torch.randn(7, 4, 64, device=DEV, requires_grad=True)
    torch.library.opcheck(ops.rotary_embedding, (pos, x, cache, True, False))
    q, k = torch.randn(7, 4, 64, device=DEV), torch.randn(7, 2, 64, device=DEV)
    torch.library.opcheck(ops.rotary_embedding_, (pos, q, k, cache, False))


# ---------------------------------------------------------------- devices


def test_wrong_device_mix_raises():
    x = torch.randn(4, 64, device=DEV)
    with pytest.raises((RuntimeError, ValueError), match="weight"):
        lk.rms_norm(x, torch.randn(64))
