"""llmkern.ops.linear_cross_entropy and cross_entropy_grad_ against their references in float64."""

import importlib

import pytest
import torch

import llmkern.ops as lk
from llmkern.models import LlamaForCausalLM, preset
from tests.helpers import DTYPES, assert_close_derived, grads, strided

ops = torch.ops.llmkern

# (tokens, hidden, vocab, chunk rows): chunks that divide the tokens, that do not, and one chunk for all
CASES = [(37, 24, 131, 8), (64, 16, 50, 64), (5, 59, 1000, None)]


def _inputs(n, h, v, dtype, bias, device="cpu"):
    hidden = torch.randn(n, h, dtype=dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[::3] = -100  # ignored positions
    b = (torch.randn(v) * 0.1).to(dtype) if bias else None
    return [t.to(device) if t is not None else None for t in (hidden, weight, targets, b)]


def _check_against_reference(fused, inputs, targets, num_items=None, dloss=1.0):
    """fused(*inputs) (hidden, weight[, bias]) and its gradients against linear_cross_entropy_ref in float64, within
    twice PyTorch's error in the inputs' dtype."""
    def ref(x, w, *b):
        return lk.linear_cross_entropy_ref(x, w, targets, *b, num_items=num_items)

    ref64 = ref(*(t.double() for t in inputs))
    # The loss sums its (positive) per-token terms in another order than PyTorch's: up to one rounding of the
    # loss per term (PyTorch's own error can be 0 by luck, as on CUDA).
    terms = (targets != -100).sum().item()
    assert_close_derived(fused(*inputs), ref64.float(), ref(*inputs), name="loss", scale=terms * ref64.item())
    g64 = grads(ref, [t.double() for t in inputs], [torch.tensor(dloss, dtype=torch.float64)])
    d = [torch.tensor(dloss)]
    for name, g, gt, r in zip(("dhidden", "dweight", "dbias"), grads(fused, inputs, d), grads(ref, inputs, d), g64):
        assert_close_derived(g, r.to(g.dtype).double(), gt, name=name)


@pytest.mark.parametrize("n, h, v, chunk", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 50.0])
def test_matches_reference_fp32(n, h, v, chunk, bias, num_items, torch_device):
    hidden, weight, targets, b = _inputs(n, h, v, torch.float32, bias, torch_device)

    def fused(x, w, *b):
        return lk.linear_cross_entropy(x, w, targets, *b, num_items=num_items, chunk_rows=chunk)

    _check_against_reference(fused, [hidden, weight] + ([b] if bias else []), targets, num_items, dloss=0.7)


@pytest.mark.parametrize("n, h, v, chunk", CASES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_reference(monkeypatch, n, h, v, chunk, dtype):
    # The chunk loop's PyTorch softmax-gradient branch (CUDA's, and any device without the compiled kernel), on the CPU.
    monkeypatch.setattr(importlib.import_module("llmkern.ops.loss"), "available", lambda: False)
    hidden, weight, targets, b = _inputs(n, h, v, dtype, True)
    fused = lambda x, w, b: lk.linear_cross_entropy(x, w, targets, b, chunk_rows=chunk)  # noqa: E731
    _check_against_reference(fused, [hidden, weight, b], targets)


@pytest.mark.parametrize("llmkern_gemm", [False, True])
def test_wide_head_through_either_matmul(monkeypatch, llmkern_gemm):
    # Where torch's fp32 matmul is MKL on AMD the chunks' logits of a wide head come from ops.linear and their
    # gradient products from ops.mm: same results.
    monkeypatch.setattr(importlib.import_module("llmkern.ops.linear"), "_torch_fp32_gemm_is_mkl_on_amd",
                        lambda: llmkern_gemm)
    loss_mod, mm_calls = importlib.import_module("llmkern.ops.loss"), []
    monkeypatch.setattr(loss_mod, "mm", lambda a, b: mm_calls.append(1) or lk.mm(a, b))
    hidden, weight, targets, b = _inputs(45, 24, 2053, torch.float32, True)
    fused = lambda x, w, b: lk.linear_cross_entropy(x, w, targets, b, chunk_rows=20)  # noqa: E731 (> 16 rows)
    _check_against_reference(fused, [hidden, weight, b], targets)
    assert bool(mm_calls) == llmkern_gemm


def test_bf16_gradients_within_twice_torch_error(torch_device):
    hidden, weight, targets, _ = _inputs(67, 32, 300, torch.bfloat16, False, torch_device)
    d = [torch.tensor(1.0)]
    g64 = grads(lambda x, w: lk.linear_cross_entropy_ref(x, w, targets), [hidden.double(), weight.double()], d)
    gt = grads(lambda x, w: lk.linear_cross_entropy_ref(x, w, targets), [hidden, weight], d)
    g = grads(lambda x, w: lk.linear_cross_entropy(x, w, targets, chunk_rows=16), [hidden, weight], d)
    for name, a, b, r in zip(("dhidden", "dweight"), g, gt, g64):
        assert_close_derived(a, r.to(a.dtype).double(), b, name=name)


def test_autocast_runs_the_products_in_bf16(torch_device):
    # As F.linear's would under autocast: fp32 inputs, bf16 products, float32 loss and gradients, within twice the
    # error of the unfused head under the same autocast.
    hidden, weight, targets, _ = _inputs(67, 32, 300, torch.float32, False, torch_device)
    d = [torch.tensor(1.0)]

    def under_autocast(fn):
        def run(x, w):
            with torch.autocast(torch_device, torch.bfloat16):
                return fn(x, w, targets)
        return run

    fused = under_autocast(lambda x, w, t: lk.linear_cross_entropy(x, w, t, chunk_rows=16))
    unfused = under_autocast(lk.linear_cross_entropy_ref)
    ref64 = lk.linear_cross_entropy_ref(hidden.double(), weight.double(), targets)
    assert_close_derived(fused(hidden, weight), ref64.float(), unfused(hidden, weight), name="loss")
    g64 = grads(lambda x, w: lk.linear_cross_entropy_ref(x, w, targets), [hidden.double(), weight.double()], d)
    g, gt = grads(fused, [hidden, weight], d), grads(unfused, [hidden, weight], d)
    g32 = grads(lambda x, w: lk.linear_cross_entropy(x, w, targets, chunk_rows=16), [hidden, weight], d)
    for name, a, b, r, a32 in zip(("dhidden", "dweight"), g, gt, g64, g32):
        assert a.dtype == torch.float32
        assert_close_derived(a, r, b, name=name)
        # bf16's error, not float32's: the products did run in bf16
        assert (a.double() - r).abs().max() > 30 * (a32.double() - r).abs().max(), name


def test_model_loss_without_logits_equals_the_logits_path():
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset("tiny-llama"))
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    cu = torch.tensor([0, 13, 40], dtype=torch.int32)
    outs, param_grads = [], []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(ids, labels=ids, cu_seqlens=cu, num_items_in_batch=30, return_logits=return_logits)
        out.loss.backward()
        outs.append(out)
        param_grads.append([p.grad.clone() for p in model.parameters()])
    assert outs[1].logits is None
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=0)
    for a, b in zip(*param_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("args, match", [
    (dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 7), targets=torch.zeros(4, dtype=torch.long)), "hidden"),
    (dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.zeros(4, dtype=torch.int32)), "targets"),
    (dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.zeros(4, dtype=torch.long),
          bias=torch.zeros(9)), "bias"),
    *((dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.zeros(4, dtype=torch.long),
            chunk_rows=bad), "chunk_rows: expected a positive int") for bad in (0, -1, 2.5)),  # -1 returned 0
])  # fmt: skip
def test_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        lk.linear_cross_entropy(**args)


# ---------------------------------------------------------------- cross_entropy_grad_ (the CPU loss of a chunk)

VOCABS = [1, 5, 769, 8195]  # one class, a tail shorter than a vector, odd sizes


def _logits(rows, vocab, dtype):
    x = (4 * torch.randn(rows, vocab)).to(dtype)  # wide enough that softmax has both tails
    t = torch.randint(0, vocab, (rows,))
    t[1::3] = -100
    return x, t


def check_ce(x, t, scale=1.0, ignore_index=-100):
    """Runs the op on x in place and compares loss and gradient with the float64 reference (2x PyTorch's error in
    x's dtype; the loss is float32 whatever x's dtype, so PyTorch's is cast)."""
    loss64, grad64 = lk.cross_entropy_grad_ref(x.double(), t, scale, ignore_index)
    loss_t, grad_t = lk.cross_entropy_grad_ref(x, t, scale, ignore_index)
    loss = lk.cross_entropy_grad_(x, t, scale, ignore_index)
    assert loss.dtype == torch.float32
    assert_close_derived(loss, loss64, loss_t.float(), name="loss", scale=loss64.abs().max().item() + 1)
    # Two roundings of ~scale at the target (softmax * scale, then - scale) whatever PyTorch's luck.
    assert_close_derived(x, grad64, grad_t, name="grad", scale=2 * abs(scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_cross_entropy_grad(cpu_isa, dtype, vocab, rows):
    check_ce(*_logits(rows, vocab, dtype), scale=0.37)


def test_cross_entropy_grad_float64(cpu_isa):
    # float64 has no lower-precision PyTorch twin to derive a bound from: agreement to ~1e-13 (sums of 8195 terms).
    x, t = _logits(7, 8195, torch.float64)
    loss64, grad64 = lk.cross_entropy_grad_ref(x, t, 0.5)
    loss = lk.cross_entropy_grad_(x, t, 0.5)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, loss64, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(x, grad64, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_grad_strided_rows_and_ignored_rows(cpu_isa, dtype):
    x, t = _logits(9, 769, dtype)
    xs = strided(x)  # rows 3 elements apart, NaN in the gaps
    check_ce(xs, t)
    assert xs._base[:, 769:].isnan().all(), "wrote outside the rows"
    # Ignored rows: gradient exactly 0 and loss 0, whatever they held (NaN included).
    x[1::3] = float("nan")
    loss = lk.cross_entropy_grad_(x, t)
    assert (x[1::3] == 0).all() and (loss[1::3] == 0).all()
    # Leading dims: [2, 3, vocab] rows; and ones no single row stride describes are refused (written in place).
    x, t = _logits(6, 769, dtype)
    check_ce(x.view(2, 3, 769), t.view(2, 3))
    with pytest.raises(RuntimeError, match="logits"):
        lk.cross_entropy_grad_(x.view(2, 3, 769).transpose(0, 1), t.view(2, 3).t())
    # ignore_index may be any value, here a class id.
    x, t = _logits(9, 50, dtype)
    t[1::3] = 7
    check_ce(x, t, scale=2.0, ignore_index=7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_grad_wide_logits(cpu_isa, dtype):
    # Logits over +-200: exp(x - max) covers normal, denormal and underflowed results (the AVX-512 exp_sub masks the
    # lanes below 2^-150 off, and its polynomial meets every exponent the row's range reaches).
    x, t = _logits(33, 769, dtype)
    check_ce((x.float() * 12).clamp(-200, 200).to(dtype), t, scale=0.37)


def test_cross_entropy_grad_softmax_to_a_few_ulp(cpu_isa):
    # Gradient j over the row maximum's gradient (both softmax * scale, scale / sum computed once) is exp(x_j - max)
    # to within the rounding of that product: each exponential to ~1.3 ulp, plus |x_j - max| ulp for rounding the
    # difference and (AVX-512) its multiple of log2 e, which a softmax cannot see but a bound must allow.
    x, _ = _logits(7, 769, torch.float32)
    am = x.argmax(1)
    t = (am + 1) % 769
    g = x.clone()
    lk.cross_entropy_grad_(g, t, 1.0)
    d = (x - x.max(1, keepdim=True).values).double()
    ref = d.exp()
    ratio = g.double() / g.gather(1, am[:, None]).double()
    keep = (torch.arange(769)[None] != t[:, None]) & (ref > 1e-30)
    ulp = 2.0**-24
    err = ((ratio - ref).abs() / ref)[keep]
    assert (err <= ulp * (2.5 + 2.5 * d.abs()[keep])).all(), f"{(err / ulp).max().item():.1f} ulp"


def test_cross_entropy_grad_masked_and_nan_logits():
    x, t = _logits(4, 300, torch.float32)
    t[:] = torch.tensor([3, 5, 7, 9])
    x[0, 100:] = float("-inf")  # a masked vocabulary tail: probability 0, gradient 0
    check_ce(x.clone(), t)
    x[1, 42] = float("nan")  # NaN spreads over its row only, as PyTorch's does
    loss = lk.cross_entropy_grad_(x, t)
    assert loss[1].isnan() and x[1].isnan().all()
    assert loss[[0, 2, 3]].isfinite().all() and x[[0, 2, 3]].isfinite().all()


def test_cross_entropy_grad_opcheck():
    x, t = _logits(7, 769, torch.float32)
    torch.library.opcheck(ops.cross_entropy_grad_, (x, t, 0.5, -100))


@pytest.mark.parametrize("logits, targets, kwargs, error, match", [
    (torch.randn(4, 10), torch.tensor([0, 1, 10, 2]), {}, IndexError, "targets: expected values in \\[0, 10\\)"),
    (torch.randn(4, 10), torch.tensor([0, -1, 1, 2]), {}, IndexError, "targets"),
    (torch.randn(4, 10), torch.tensor([0, 1, 2, 3], dtype=torch.int32), {}, TypeError, "targets: expected dtype int64"),
    (torch.randn(4, 10), torch.tensor([0, 1, 2]), {}, RuntimeError, "targets: expected shape \\[4\\]"),
    (torch.tensor(1.0), torch.tensor(0), {}, RuntimeError, "logits: expected \\[..., vocab\\]"),
    (torch.randint(0, 9, (4, 10)), torch.tensor([0, 1, 2, 3]), {}, TypeError, "logits: expected dtype"),
    (torch.randn(10, 4).t(), torch.tensor([0, 1, 2, 3]), {}, RuntimeError, "logits"),
])  # fmt: skip
def test_cross_entropy_grad_bad_inputs(logits, targets, kwargs, error, match):
    with pytest.raises(error, match=match):
        lk.cross_entropy_grad_(logits, targets, **kwargs)
