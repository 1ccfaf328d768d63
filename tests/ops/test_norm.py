import pytest
import torch

import llmkern.ops as lk
from tests.helpers import DTYPES, assert_close_derived, grads, poisoned_like, strided

HIDDEN = [8, 769, 4096, 5125]
TOKENS = [1, 7, 33]
WEIGHTS = ["weight", "none", "gemma"]  # weight, weight=None, Gemma's (1 + weight)


def make(tokens, hidden, dtype, weight_kind, requires_grad=False):
    x = torch.randn(tokens, hidden, dtype=dtype)
    w = None if weight_kind == "none" else (torch.rand(hidden) + 0.5).to(dtype)
    if requires_grad:
        x.requires_grad_()
        if w is not None:
            w.requires_grad_()
    return x, w


def ref64(x, w, offset, eps=1e-6):
    return lk.rms_norm_ref(x.double(), None if w is None else w.double(), eps, offset)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
def test_rms_norm_forward(cpu_isa, dtype, hidden, tokens, weight_kind):
    x, w = make(tokens, hidden, dtype, weight_kind)
    offset = weight_kind == "gemma"
    out = lk.rms_norm(x, w, 1e-6, weight_offset=offset)
    assert_close_derived(out, ref64(x, w, offset), lk.rms_norm_ref(x, w, 1e-6, offset))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_strided_leading_dims_and_out(cpu_isa, dtype):
    x = strided(torch.randn(3, 5, 769, dtype=dtype))  # rows 772 apart
    w = torch.randn(769, dtype=dtype)
    want = ref64(x, w, False)
    assert_close_derived(lk.rms_norm(x, w), want, lk.rms_norm_ref(x, w))
    out = strided(poisoned_like(x))
    assert lk.rms_norm(x, w, out=out) is out
    assert_close_derived(out, want, lk.rms_norm_ref(x, w))
    # Leading dims that no single row stride describes are copied, not misread.
    xt = torch.randn(5, 3, 769, dtype=dtype).transpose(0, 1)
    assert_close_derived(lk.rms_norm(xt, w), ref64(xt, w, False), lk.rms_norm_ref(xt, w))


def test_qk_norm_per_head(cpu_isa):
    q = torch.randn(7, 4, 111)  # [tokens, heads, head_dim] with a [head_dim] weight
    w = torch.randn(111)
    assert_close_derived(lk.rms_norm(q, w), ref64(q, w, False), lk.rms_norm_ref(q, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [8, 769, 4096])
@pytest.mark.parametrize("weight_kind", WEIGHTS)
def test_fused_add_rms_norm(cpu_isa, dtype, hidden, weight_kind):
    x, w = make(7, hidden, dtype, weight_kind)
    res = torch.randn(7, hidden, dtype=dtype)
    offset = weight_kind == "gemma"
    out_t, sum_t = lk.fused_add_rms_norm_ref(x, res, w, 1e-6, offset)
    # The kernel normalizes the sum as stored in dtype (as vLLM does), so the exact reference does too.
    want = ref64(sum_t, w, offset)
    out, s = lk.fused_add_rms_norm(x, res, w, 1e-6, weight_offset=offset)
    assert torch.equal(s, sum_t)
    assert_close_derived(out, want, out_t)
    x2, res2 = strided(x.clone()), res.clone()
    lk.fused_add_rms_norm_(x2, res2, w, 1e-6, weight_offset=offset)
    assert torch.equal(res2, sum_t)
    assert_close_derived(x2, want, out_t)


def test_float64_eps_is_not_rounded_to_float32(cpu_isa):
    # With x tiny, rstd is about 1/sqrt(eps): float32(0.1) would move it by ~7.5e-9, far beyond float64's error.
    x = 1e-6 * torch.randn(3, 769, dtype=torch.float64)
    torch.testing.assert_close(lk.rms_norm(x, None, 0.1), lk.rms_norm_ref(x, None, 0.1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("weight_kind", WEIGHTS)
def test_gradcheck_float64(cpu_isa, weight_kind):
    x, w = make(5, 37, torch.float64, weight_kind, requires_grad=True)
    offset = weight_kind == "gemma"
    inputs = (x,) if w is None else (x, w)
    fn = lambda x, w=None: lk.rms_norm(x, w, 1e-5, weight_offset=offset)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    res = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    fused = lambda x, r, w=None: lk.fused_add_rms_norm(x, r, w, 1e-5, weight_offset=offset)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (x, res) if w is None else (x, res, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [8, 769, 4096])
@pytest.mark.parametrize("weight_kind", ["weight", "gemma"])
def test_backward_low_precision(cpu_isa, dtype, hidden, weight_kind):
    x, w = make(33, hidden, dtype, weight_kind)
    offset = weight_kind == "gemma"
    dy = torch.randn(33, hidden)
    kern = grads(lambda x, w: lk.rms_norm(x, w, 1e-6, weight_offset=offset), [x, w], [dy])
    ref = grads(lambda x, w: lk.rms_norm_ref(x, w, 1e-6, offset), [x.double(), w.double()], [dy])
    torch_same = grads(lambda x, w: lk.rms_norm_ref(x, w, 1e-6, offset), [x, w], [dy])
    for name, g, r, t in zip(["dx", "dweight"], kern, ref, torch_same):
        assert_close_derived(g, r, t, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_backward_low_precision(cpu_isa, dtype):
    x, w = make(7, 769, dtype, "weight")
    res = torch.randn(7, 769, dtype=dtype)
    dy, ds = torch.randn(7, 769), torch.randn(7, 769)
    fn = lambda x, r, w: lk.fused_add_rms_norm(x, r, w, 1e-6)  # noqa: E731
    ref_fn = lambda x, r, w: lk.fused_add_rms_norm_ref(x, r, w, 1e-6)  # noqa: E731
    kern = grads(fn, [x, res, w], [dy, ds])
    ref = grads(ref_fn, [x.double(), res.double(), w.double()], [dy, ds])
    torch_same = grads(ref_fn, [x, res, w], [dy, ds])
    for name, g, r, t in zip(["dx", "dresidual", "dweight"], kern, ref, torch_same):
        assert_close_derived(g, r, t, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_llama_rmsnorm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(769, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(769) + 0.5)
    hf = hf.to(dtype)
    x = torch.randn(2, 7, 769, dtype=dtype)
    want = ref64(x, hf.weight, False, 1e-5)
    # transformers rounds x_normed to dtype before the weight multiply: two roundings where we do one.
    assert_close_derived(lk.rms_norm(x, hf.weight, 1e-5), want, hf(x).detach())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_kind", WEIGHTS)
def test_backward_out_matches_functional(cpu_isa, dtype, weight_kind):
    x, w = make(7, 769, dtype, weight_kind)
    offset = weight_kind == "gemma"
    dy, dres = torch.randn(7, 769, dtype=dtype), torch.randn(7, 769, dtype=dtype)
    _, rstd = torch.ops.llmkern.rms_norm(x, w, 1e-6, offset)
    dx_want, dw_want = torch.ops.llmkern.rms_norm_bwd(dy, x, w, rstd, offset, dres)
    dx = strided(poisoned_like(x))
    dw = None if w is None else poisoned_like(w)
    torch.ops.llmkern.rms_norm_bwd_out(dx, dw, dy, x, w, rstd, offset, dres)
    assert torch.equal(dx, dx_want)
    if w is not None:
        assert torch.equal(dw, dw_want)


def test_opcheck():
    x, w = torch.randn(7, 769), torch.randn(769)
    res = torch.randn(7, 769)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    ops = torch.ops.llmkern
    torch.library.opcheck(ops.rms_norm, (xg, wg, 1e-6, False))
    torch.library.opcheck(ops.rms_norm, (x, None, 1e-6, False))
    torch.library.opcheck(ops.rms_norm_out, (torch.empty_like(x), x, w, 1e-6, True))
    torch.library.opcheck(ops.fused_add_rms_norm, (xg, res.clone().requires_grad_(), wg, 1e-6, False))
    torch.library.opcheck(ops.fused_add_rms_norm_, (x.clone(), res.clone(), w, 1e-6, False))
    _, rstd = ops.rms_norm(x, w, 1e-6, False)
    torch.library.opcheck(ops.rms_norm_bwd, (torch.randn(7, 769), x, w, rstd, False, None))
    torch.library.opcheck(ops.rms_norm_bwd, (torch.randn(7, 769), x, None, rstd, False, res))
    torch.library.opcheck(ops.rms_norm_bwd_out, (torch.empty_like(x), torch.empty_like(w), res, x, w, rstd, False, None))


def test_autocast_runs_the_norms_in_float32(torch_device):
    """Under autocast the norms run in float32, as torch's layer_norm does: a bf16 x (a linear's output) with
    the float32 gain and residual gives the float32 call's result, and x's gradient comes back in bf16."""
    x = torch.randn(5, 64, device=torch_device).bfloat16().requires_grad_()
    w = torch.rand(64, device=torch_device) + 0.5
    r = torch.randn(5, 64, device=torch_device)
    with torch.autocast(torch_device, torch.bfloat16):
        y = lk.rms_norm(x, w)
        out, s = lk.fused_add_rms_norm(x, r, w)
    assert y.dtype == out.dtype == s.dtype == torch.float32
    assert torch.equal(y, lk.rms_norm(x.float(), w))
    expected_out, expected_s = lk.fused_add_rms_norm(x.float(), r, w)
    assert torch.equal(out, expected_out) and torch.equal(s, expected_s)
    (y.sum() + out.sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.isfinite().all()


def test_zero_rows():
    x = torch.randn(0, 16)
    assert lk.rms_norm(x, torch.randn(16)).shape == (0, 16)


BAD = [
    ("x", lambda: lk.rms_norm(torch.randint(0, 5, (3, 8)), None), "x: expected dtype"),
    ("weight", lambda: lk.rms_norm(torch.randn(3, 8), torch.randn(8, dtype=torch.bfloat16)), "weight: expected the dtype of x"),
    ("weight", lambda: lk.rms_norm(torch.randn(3, 8), torch.randn(7)), r"weight: expected shape \[8\]"),
    ("weight", lambda: lk.rms_norm(torch.randn(3, 8), torch.randn(8, 2)[:, 0]), "weight: expected a contiguous"),
    ("weight", lambda: lk.rms_norm(torch.randn(3, 8), torch.randn(8, device="meta")), "weight: expected the device of x"),
    ("x", lambda: lk.rms_norm(torch.randn(3, 0), None), "x: expected a non-empty last"),
    ("x", lambda: lk.rms_norm(torch.tensor(1.0), None), "x: expected at least 1 dimension"),
    ("eps", lambda: lk.rms_norm(torch.randn(3, 8), None, -1.0), "eps: expected >= 0"),
    ("weight_offset", lambda: lk.rms_norm(torch.randn(3, 8), None, weight_offset=True), "weight_offset: needs a weight"),
    ("out", lambda: lk.rms_norm(torch.randn(3, 8), None, out=torch.empty(3, 9)), "out: expected the shape of x"),
    ("out", lambda: lk.rms_norm(torch.randn(3, 8), None, out=torch.empty(8, 3).t()), "out: written in place"),
    ("residual", lambda: lk.fused_add_rms_norm(torch.randn(3, 8), torch.randn(3, 9)), "residual: expected the shape"),
    ("residual", lambda: lk.fused_add_rms_norm_(torch.randn(3, 8), torch.randn(3, 8).half()), "residual: expected the dtype"),
    ("residual", lambda: lk.fused_add_rms_norm_(torch.randn(3, 8), torch.randn(1, 8).expand(3, 8)), "residual: written in place, so its elements must not overlap"),
    ("dx", lambda: bwd_out(dx=torch.empty(3, 9)), "dx: expected the shape of x"),
    ("dx", lambda: bwd_out(dx=torch.empty(1, 8).expand(3, 8)), "dx: written in place"),
    ("dweight", lambda: bwd_out(dweight=None), "dweight: expected a tensor exactly when weight is given"),
    ("dweight", lambda: bwd_out(dweight=torch.empty(9)), r"dweight: expected a contiguous \[8\] tensor"),
    ("dweight", lambda: bwd_out(dweight=torch.empty(8, dtype=torch.float64)), "dweight: expected the dtype of x"),
    ("rstd", lambda: bwd_out(rstd=torch.ones(3, dtype=torch.float64)), r"rstd: expected the \[3\] Float tensor"),
    ("dy", lambda: bwd_out(dy=torch.ones(3, 7)), "dy: expected the shape of x"),
    # outputs overlapping inputs shifted (a row apart), or two in-place outputs sharing memory
    ("out", lambda: (b := torch.randn(4, 8), lk.rms_norm(b[:-1], None, out=b[1:])), "out: expected memory disjoint"),
    ("residual", lambda: (b := torch.randn(4, 8), lk.fused_add_rms_norm_(b[:-1], b[1:])),
     "residual: expected memory disjoint from x's"),
    ("residual", lambda: (x := torch.randn(3, 8), lk.fused_add_rms_norm_(x, x)), "residual: expected memory disjoint"),
    ("dx", lambda: (b := torch.randn(4, 8), bwd_out(dx=b[1:], x=b[:-1])), "dx: expected memory disjoint from x's"),
    ("dx", lambda: (b := torch.randn(4, 8), bwd_out(dx=b[1:], dy=b[:-1])), "dx: expected memory disjoint from dy's"),
    ("dx", lambda: (b := torch.randn(4, 8), bwd_out(dx=b[1:], dresidual=b[:-1])), "dx: expected memory disjoint"),
]


def bwd_out(**kw):
    args = dict(dx=torch.empty(3, 8), dweight=torch.empty(8), dy=torch.randn(3, 8), x=torch.randn(3, 8),
                weight=torch.randn(8), rstd=torch.ones(3), weight_offset=False, dresidual=None)
    args.update(kw)
    torch.ops.llmkern.rms_norm_bwd_out(*args.values())


@pytest.mark.parametrize("arg,call,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises(arg, call, message):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        call()
