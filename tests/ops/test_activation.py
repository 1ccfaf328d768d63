import pytest
import torch
import torch.nn.functional as F

from llmkern.ops.activation import (
    act_and_mul_ref,
    act_mul_ref,
    gelu_and_mul,
    gelu_mul,
    silu_and_mul,
    silu_mul,
)
from tests.helpers import DTYPES, assert_close_derived, grads, poisoned_like, strided

D = [8, 769, 4096, 5125]
TOKENS = [1, 7, 33]
ACTIVATIONS = ["silu", "gelu_tanh"]
AND_MUL = {"silu": silu_and_mul, "gelu_tanh": gelu_and_mul}
MUL = {"silu": silu_mul, "gelu_tanh": gelu_mul}
ops = torch.ops.llmkern


def make(tokens, d, dtype):
    # Scaled so the gate covers both saturated tails of the sigmoid, not just its middle.
    return (3 * torch.randn(tokens, 2 * d)).to(dtype)


def check_packed(x, act, out=None):
    want = act_and_mul_ref(x.double(), act)
    got = AND_MUL[act](x, out=out)
    assert_close_derived(got, want, act_and_mul_ref(x, act))
    return got


def check_separate(gate, up, act):
    want = act_mul_ref(gate.double(), up.double(), act)
    assert_close_derived(MUL[act](gate, up), want, act_mul_ref(gate, up, act))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", D)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_forward(cpu_isa, dtype, d, tokens, act):
    x = make(tokens, d, dtype)
    check_packed(x, act)
    check_separate(x[:, :d].contiguous(), x[:, d:].contiguous(), act)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_strided_leading_dims_and_out(cpu_isa, dtype, act):
    x = strided(3 * torch.randn(3, 5, 2 * 769, dtype=dtype))  # rows 2*769+3 apart
    out = strided(poisoned_like(x[..., :769]))
    assert check_packed(x, act, out=out) is out
    # gate and up as strided views of one buffer (row stride 2d + 3), and up with its own padding.
    check_separate(x[..., :769], x[..., 769:], act)
    check_separate(x[..., :769], strided(x[..., 769:].contiguous(), pad=5), act)
    # Leading dims that no single row stride describes are copied, not misread.
    xt = (3 * torch.randn(5, 3, 2 * 769, dtype=dtype)).transpose(0, 1)
    check_packed(xt, act)
    check_separate(xt[..., :769], xt[..., 769:], act)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_float64(cpu_isa, act):
    x = (2 * torch.randn(2, 2 * 19, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(AND_MUL[act], (x,))
    gate, up = (2 * torch.randn(2, 2, 19, dtype=torch.float64)).unbind(0)
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    assert torch.autograd.gradcheck(MUL[act], (gate, up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 769, 5125])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_backward_low_precision(cpu_isa, dtype, d, act):
    x = make(7, d, dtype)
    dy = torch.randn(7, d)
    ref_fn = lambda x: act_and_mul_ref(x, act)  # noqa: E731
    (dx,), (ref,), (same,) = (grads(f, [t], [dy]) for f, t in [(AND_MUL[act], x), (ref_fn, x.double()), (ref_fn, x)])
    assert_close_derived(dx, ref, same, name="dx")
    gate, up = x[:, :d].contiguous(), x[:, d:].contiguous()
    ref_fn = lambda g, u: act_mul_ref(g, u, act)  # noqa: E731
    kern = grads(MUL[act], [gate, up], [dy])
    ref = grads(ref_fn, [gate.double(), up.double()], [dy])
    same = grads(ref_fn, [gate, up], [dy])
    for name, g, r, t in zip(["dgate", "dup"], kern, ref, same):
        assert_close_derived(g, r, t, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_backward_out(cpu_isa, dtype, act):
    # Strided inputs and NaN-poisoned outputs with strided rows; d = 769 gives SIMD bodies and tails.
    d = 769
    x = strided(make(7, d, dtype).view(7, 1, 2 * d))
    dy = strided(torch.randn(7, 1, d, dtype=dtype), pad=5)
    ref_fn = lambda x: act_and_mul_ref(x, act)  # noqa: E731
    (ref,), (same,) = (grads(ref_fn, [t], [dy]) for t in (x.double(), x))
    dx = strided(poisoned_like(x))
    assert ops.act_and_mul_bwd_out(dx, dy, x, act) is None
    assert_close_derived(dx, ref, same, name="dx")

    gate, up = x[..., :d], strided(x[..., d:].contiguous(), pad=2)
    ref_fn = lambda g, u: act_mul_ref(g, u, act)  # noqa: E731
    ref = grads(ref_fn, [gate.double(), up.double()], [dy])
    same = grads(ref_fn, [gate, up], [dy])
    dgate, dup = strided(poisoned_like(gate), pad=1), strided(poisoned_like(gate), pad=4)
    ops.act_mul_bwd_out(dgate, dup, dy, gate, up, act)
    for name, g, r, t in zip(["dgate", "dup"], [dgate, dup], ref, same):
        assert_close_derived(g, r, t, name=name)
    # dgate and dup as the two halves of one buffer, as the packed op writes them.
    both = poisoned_like(x)
    ops.act_mul_bwd_out(both[..., :d], both[..., d:], dy, gate, up, act)
    assert torch.equal(both, torch.cat([dgate, dup], -1))


def test_backward_out_in_place():
    # Elementwise: every element's inputs are read before its outputs are written, so exact aliasing works.
    x, dy = 3 * torch.randn(5, 2 * 37), torch.randn(5, 37)
    want = ops.act_and_mul_bwd(dy, x, "silu")
    ops.act_and_mul_bwd_out(x, dy, x, "silu")
    assert torch.equal(x, want)
    gate, up, dy = torch.randn(3, 5, 37).unbind(0)
    want = ops.act_mul_bwd(dy, gate, up, "gelu_tanh")
    ops.act_mul_bwd_out(up, gate, dy, gate, up, "gelu_tanh")  # dgate into up, dup into gate
    assert torch.equal(up, want[0]) and torch.equal(gate, want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act,hf_name", [("silu", "silu"), ("gelu_tanh", "gelu_pytorch_tanh")])
def test_matches_transformers(dtype, act, hf_name):
    from transformers.activations import ACT2FN

    # LlamaMLP (and Gemma's MLP with gelu_pytorch_tanh): act_fn(gate_proj(x)) * up_proj(x).
    gate, up = (3 * torch.randn(2, 2, 7, 769)).to(dtype).unbind(0)
    hf = ACT2FN[hf_name](gate) * up  # rounds act(gate) to dtype before the multiply: two roundings to our one
    want = act_mul_ref(gate.double(), up.double(), act)
    assert_close_derived(MUL[act](gate, up), want, hf)
    assert_close_derived(AND_MUL[act](torch.cat([gate, up], -1)), want, hf)


# Saturated sigmoid tails, overflow of g^3 and g^2, inf and NaN. Tiled so that each value lands both in
# a SIMD body and in a scalar tail on every ISA.
SPECIAL = [-float("inf"), -1e30, -100.0, -88.5, -20.0, -0.0, 0.0, 20.0, 100.0, 1e30, float("inf"), float("nan")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_extreme_values_match_torch(cpu_isa, dtype, act):
    gate = torch.tensor(SPECIAL * 4 + SPECIAL[:7], dtype=dtype)
    up = torch.randn_like(gate)
    assert not MUL[act](torch.full((3,), -100.0, dtype=dtype), torch.ones(3, dtype=dtype)).isnan().any()
    kern = grads(MUL[act], [gate, up], [torch.ones_like(gate)])
    torch_fn = F.silu if act == "silu" else lambda g: F.gelu(g, approximate="tanh")  # noqa: E731
    same = grads(lambda g, u: torch_fn(g.float()) * u.float(), [gate, up], [torch.ones_like(gate)])
    out = MUL[act](gate, up)
    # NaN exactly where PyTorch has NaN (e.g. act(-inf) = -inf * 0); values agree up to rounding, with an
    # absolute slack for results near the float range's bottom (exp underflow).
    tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-30, equal_nan=True)
    torch.testing.assert_close(out, (torch_fn(gate.float()) * up.float()).to(dtype), **tol)
    for g, t in zip(kern, same):
        torch.testing.assert_close(g, t.to(dtype), **tol)
    assert torch.equal(out.isnan(), gate.isnan() | (gate == -float("inf")))


def test_opcheck():
    x = 3 * torch.randn(7, 2 * 769)
    gate, up, dy = torch.randn(3, 7, 769).unbind(0)
    # The activation is only a string to the registration machinery: each op is checked once.
    torch.library.opcheck(ops.act_and_mul, (x.clone().requires_grad_(), "silu"))
    torch.library.opcheck(ops.act_and_mul_out, (torch.empty(7, 769), x, "gelu_tanh"))
    torch.library.opcheck(ops.act_and_mul_bwd, (dy, x, "gelu_tanh"))
    torch.library.opcheck(ops.act_mul, (gate.clone().requires_grad_(), up.clone().requires_grad_(), "gelu_tanh"))
    torch.library.opcheck(ops.act_mul_bwd, (dy, gate, up, "silu"))
    torch.library.opcheck(ops.act_and_mul_bwd_out, (torch.empty(7, 2 * 769), dy, x, "silu"))
    torch.library.opcheck(ops.act_mul_bwd_out, (torch.empty(7, 769), torch.empty(7, 769), dy, gate, up, "gelu_tanh"))


def test_zero_rows():
    assert silu_and_mul(torch.randn(0, 16)).shape == (0, 8)
    assert gelu_mul(torch.randn(2, 0, 8), torch.randn(2, 0, 8)).shape == (2, 0, 8)
    x = torch.randn(0, 16, requires_grad=True)
    silu_and_mul(x).sum().backward()
    assert x.grad.shape == (0, 16)


def shifted(n, rows, cols):
    """Two [rows, cols] views of one buffer, one element apart: they partially overlap."""
    buf = torch.randn(rows * cols + n)
    return buf[:rows * cols].view(rows, cols), buf[n:].view(rows, cols)


X8, DY4, G4 = torch.randn(3, 8), torch.randn(3, 4), torch.randn(3, 4)
BAD = [
    ("x", lambda: silu_and_mul(torch.randint(0, 5, (3, 8))), "x: expected dtype"),
    ("x", lambda: gelu_and_mul(torch.randn(3, 7)), "x: expected a non-empty, even last dim"),
    ("x", lambda: silu_and_mul(torch.randn(3, 0)), "x: expected a non-empty, even last dim"),
    ("x", lambda: silu_and_mul(torch.tensor(1.0)), "x: expected at least 1 dimension"),
    ("gate", lambda: silu_mul(torch.randint(0, 5, (3, 8)), torch.randn(3, 8)), "gate: expected dtype"),
    ("gate", lambda: silu_mul(torch.randn(3, 0), torch.randn(3, 0)), "gate: expected a non-empty last dim"),
    ("up", lambda: silu_mul(torch.randn(3, 8), torch.randn(3, 9)), r"up: expected the shape of gate"),
    ("up", lambda: gelu_mul(torch.randn(3, 8), torch.randn(3, 8).half()), "up: expected the dtype of gate"),
    ("up", lambda: silu_mul(torch.randn(3, 8), torch.randn(3, 8, device="meta")), "up: expected the device of gate"),
    ("activation", lambda: ops.act_and_mul(torch.randn(3, 8), "relu"), "activation: expected"),
    ("activation", lambda: ops.act_mul(torch.randn(3, 8), torch.randn(3, 8), "gelu"), "activation: expected"),
    ("activation", lambda: act_mul_ref(torch.randn(3, 8), torch.randn(3, 8), "relu"), "activation: expected"),
    ("out", lambda: silu_and_mul(torch.randn(3, 8), out=torch.empty(3, 8)), r"out: expected shape \[3, 4\]"),
    ("out", lambda: silu_and_mul(torch.randn(3, 8), out=torch.empty(3, 4).half()), "out: expected the dtype of x"),
    ("out", lambda: silu_and_mul(torch.randn(3, 8), out=torch.empty(4, 3).t()), "out: written in place"),
    ("dy", lambda: ops.act_and_mul_bwd(torch.randn(3, 8), torch.randn(3, 8), "silu"), r"dy: expected shape \[3, 4\]"),
    ("dy", lambda: ops.act_mul_bwd(torch.randn(3, 8).half(), torch.randn(3, 8), torch.randn(3, 8), "silu"),
     "dy: expected the dtype of gate"),
    ("dx", lambda: ops.act_and_mul_bwd_out(torch.empty(3, 4), DY4, X8, "silu"), r"dx: expected the shape of x \[3, 8\]"),
    ("dx", lambda: ops.act_and_mul_bwd_out(torch.empty(3, 8).half(), DY4, X8, "silu"), "dx: expected the dtype of x"),
    ("dx", lambda: ops.act_and_mul_bwd_out(torch.empty(1, 8).expand(3, 8), DY4, X8, "silu"), "dx: written in place"),
    ("dx", lambda: ops.act_and_mul_bwd_out(torch.empty(8, 3).t(), DY4, X8, "silu"), "dx: written in place"),
    ("dx", lambda: (lambda x, dx: ops.act_and_mul_bwd_out(dx, DY4, x, "silu"))(*shifted(1, 3, 8)),
     "dx: expected memory disjoint from x's"),
    ("dx", lambda: ops.act_and_mul_bwd_out(torch.empty(3, 8, device="meta"), DY4, X8, "silu"),
     "dx: expected the device of x"),
    ("dgate", lambda: ops.act_mul_bwd_out(torch.empty(3, 5), torch.empty(3, 4), DY4, G4, G4, "silu"),
     r"dgate: expected the shape of gate \[3, 4\]"),
    ("dup", lambda: ops.act_mul_bwd_out(torch.empty(3, 4), torch.empty(3, 4).double(), DY4, G4, G4, "silu"),
     "dup: expected the dtype of gate"),
    ("dup", lambda: ops.act_mul_bwd_out(torch.empty(3, 4), torch.empty(4).expand(3, 4), DY4, G4, G4, "silu"),
     "dup: written in place"),
    ("dup", lambda: (lambda t: ops.act_mul_bwd_out(t, t, DY4, G4, G4, "silu"))(torch.empty(3, 4)),
     "dup: expected memory disjoint from dgate's"),
    ("dup", lambda: ops.act_mul_bwd_out(*shifted(2, 3, 4), DY4, G4, G4, "silu"), "dup: expected memory disjoint"),
    ("dgate", lambda: (lambda up, dg: ops.act_mul_bwd_out(dg, torch.empty(3, 4), DY4, G4, up, "silu"))(*shifted(1, 3, 4)),
     "dgate: expected memory disjoint from up's"),
]


@pytest.mark.parametrize("arg,call,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises(arg, call, message):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        call()
