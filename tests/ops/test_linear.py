import importlib

import pytest
import torch
import torch.nn.functional as F

from llmkern.ops import linear, linear_group, linear_group_ref, linear_ref, mm, mm_ref
from tests.helpers import DTYPES, assert_close_derived, grads, strided

# (M, N, K). Dot form (M < 16, or < 32 with K > 512; over bf16 pairs, K even, M < 16, or < 128 with K > 512): GEMV
# rows 1-4, the 4-row blocks plus a remainder (5-8 rows over bf16 pairs: one block of 4, 3 or 2 weight rows with
# their tails), weight-row tails (N % 4), odd K (paired, whole vector and scalar tails for 8- and 16-lane paths; the
# masked last 32 of the pair path), K = 1. Outer form (fp32, bf16, fp16): 1-4 vectors of x rows with a partial last
# one, several x panels (64 rows on AVX-512, 32 on AVX2 and scalar) with a partial last one, weight tiles of 24 rows
# with a tail, K in equal chunks of at most 512 (and K = 512). Either side of the bf16 pair rule: 12 x 1030, 24 x 2050
# and 65 x 1100 (dot over pairs, outer in fp32 from 32 rows), 128 x 514 (outer). fp32 from 256 rows with at most 1024
# columns: W^T through mm (a partial last vector of columns, n = 1024), wider stays outer (1030).
SHAPES = [(1, 1, 1), (1, 5, 7), (2, 17, 33), (3, 64, 100), (4, 33, 4097), (5, 18, 256), (6, 23, 130), (7, 64, 129),
          (7, 45, 66), (8, 50, 600), (9, 26, 1025), (10, 9, 1030), (12, 21, 1030), (16, 40, 64), (16, 30, 512),
          (17, 25, 257), (24, 11, 2050), (33, 19, 300), (64, 24, 31), (65, 49, 1100), (128, 9, 514), (130, 7, 70),
          (256, 30, 70), (300, 1024, 33), (257, 1030, 40)]


def check(x, w, b):
    want = linear_ref(x.double(), w.double(), None if b is None else b.double())
    assert_close_derived(linear(x, w, b), want, linear_ref(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_linear_matches_reference(cpu_isa, dtype, m, n, k):
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    check(x, w, torch.randn(n).to(dtype) if (m + n) % 2 else None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_batched(cpu_isa, dtype):
    x = strided(torch.randn(6, 70).to(dtype))            # rows 3 elements apart
    w = torch.randn(9, 80).to(dtype)[:, 5:75]            # a column slice: row stride 80
    check(x, w, torch.randn(9).to(dtype))
    check(strided(torch.randn(40, 70).to(dtype)), w, torch.randn(9).to(dtype))  # the outer form (M >= 32)
    check(strided(torch.randn(300, 70).to(dtype)), w, torch.randn(9).to(dtype))  # fp32: mm
    check(torch.randn(2, 3, 70).to(dtype), w, None)      # leading dims flatten into rows
    assert linear(torch.randn(2, 0, 70).to(dtype), w).shape == (2, 0, 9)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 17, 64, 65, 130, 513])
def test_bf16_whole_k_tiles(cpu_isa, m):
    # k a multiple of 32: bf16 on the amx path takes the tile products from 4 to 512 rows (x^T packed in 16-row column
    # groups, 64 rows a product, weight tiles of 32 rows, a partial last one copied out); strided x, a weight slice,
    # a bias.
    x = strided(torch.randn(m, 96).to(torch.bfloat16)) if m % 2 else torch.randn(m, 96).to(torch.bfloat16)
    w = torch.randn(45, 100).to(torch.bfloat16)[:, 2:98]
    check(x, w, torch.randn(45).to(torch.bfloat16) if m % 3 else None)
    # a group whose last part has an odd row stride (its tiles are copied out) gives each part its own call's bits
    parts = [torch.randn(40, 64).to(torch.bfloat16), torch.randn(7, 64).to(torch.bfloat16),
             torch.randn(33, 65).to(torch.bfloat16)[:, :64]]
    x = torch.randn(m, 64).to(torch.bfloat16)
    for y, wp in zip(linear_group(x, parts), parts):
        assert torch.equal(y, linear(x, wp))
        assert_close_derived(y, linear_ref(x.double(), wp.double()), linear_ref(x, wp))


def test_empty_k_gives_bias():
    b = torch.randn(5)
    assert torch.equal(linear(torch.randn(3, 0), torch.randn(5, 0), b), b.expand(3, 5))
    assert torch.equal(linear(torch.randn(3, 0), torch.randn(5, 0)), torch.zeros(3, 5))


def test_large_values_do_not_overflow_bf16_accumulation():
    x = torch.full((1, 4096), 3.0, dtype=torch.bfloat16)
    w = torch.full((2, 4096), 5.0, dtype=torch.bfloat16)
    assert linear(x, w).float().tolist() == [[61440.0, 61440.0]]  # 15 * 4096, exact in fp32 and in bf16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(5, 3), (20, 16)])  # fp32 over 256+ rows: dx and dW through mm where it beats torch
def test_backward(dtype, lead):
    x, w, b = torch.randn(*lead, 40).to(dtype), torch.randn(24, 40).to(dtype), torch.randn(24).to(dtype)
    dy = torch.randn(*lead, 24).to(dtype)
    got = grads(linear, [x, w, b], [dy])
    want = grads(linear_ref, [t.double() for t in (x, w, b)], [dy.double()])
    torch_ = grads(F.linear, [x, w, b], [dy])
    for name, g, g64, gt in zip(["dx", "dweight", "dbias"], got, want, torch_):
        assert_close_derived(g, g64, gt, name=name)


@pytest.mark.parametrize("mm_beats_torch", [False, True])
def test_fp32_backward_through_mm_or_torch(monkeypatch, mm_beats_torch):
    monkeypatch.setattr(importlib.import_module("llmkern.ops.linear"), "mm_beats_torch", lambda: mm_beats_torch)
    test_backward(torch.float32, (20, 16))


def test_gradcheck_float64():
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in [(3, 7), (5, 7), (5,)])
    assert torch.autograd.gradcheck(linear, (x, w, b))
    assert torch.autograd.gradcheck(linear, (x, w))  # no bias: its backward sees two inputs


@pytest.mark.parametrize("rows", [3, 300])
def test_backward_without_bias(rows):
    x, w = torch.randn(rows, 40, requires_grad=True), torch.randn(6, 40, requires_grad=True)
    linear(x, w).square().sum().backward()
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    linear_ref(x2, w2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad.float(), rtol=1e-4, atol=1e-4)
    x.grad = w.grad = None
    linear(x, w).sum().backward()  # dy: an expanded tensor (strides 0)
    torch.testing.assert_close(w.grad, x.detach().sum(0).expand(6, 40), rtol=1e-4, atol=1e-3)


def test_opcheck():
    x, w, b = torch.randn(3, 40, requires_grad=True), torch.randn(6, 40, requires_grad=True), torch.randn(6)
    torch.library.opcheck(torch.ops.llmkern.linear, (x, w, b))
    torch.library.opcheck(torch.ops.llmkern.linear, (x.detach().bfloat16(), w.detach().bfloat16(), None))


def test_compiled_matches_eager():
    x, w = torch.randn(4, 64), torch.randn(8, 64)
    compiled = torch.compile(lambda x, w: linear(x, w) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x, w), linear(x, w) * 2)


# linear_group: the parts of one x, each with the bits of its own linear call, in both forms (the dot form over 1-15
# rows, 5-8 rows as one block over bf16 pairs; the outer form from 16), parts whose rows end inside a tile (k and v
# of 24-row outer tiles, 16-row dot tiles), strided x, biases; fp32 from 256 rows, where parts of at most 1024 rows
# take mm and wider ones the outer form.
GROUP_ROWS = [1, 3, 6, 16, 33, 130, 257]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", GROUP_ROWS)
def test_linear_group_equals_separate_calls(cpu_isa, dtype, m):
    x = strided(torch.randn(m, 66).to(dtype)) if m % 2 else torch.randn(m, 66).to(dtype)
    weights = [torch.randn(n, 66).to(dtype) for n in (40, 7, 1030 if m > 256 else 25)]
    for biases in (None, [torch.randn(w.shape[0]).to(dtype) for w in weights]):
        got = linear_group(x, weights, biases)
        for y, w, b in zip(got, weights, biases or [None] * 3):
            assert torch.equal(y, linear(x, w, b))
    check_group = linear_group_ref(x.double(), [w.double() for w in weights])
    for y, want, w in zip(linear_group(x, weights), check_group, weights):
        assert_close_derived(y, want, linear_ref(x, w))


def test_linear_group_empty_parts():
    x, w = torch.randn(2, 3, 16), torch.randn(5, 16)
    empty, y = linear_group(x, [torch.randn(0, 16), w])
    assert empty.shape == (2, 3, 0) and torch.equal(y, linear(x, w))
    b = torch.randn(4)
    assert torch.equal(linear_group(torch.randn(3, 0), [torch.randn(4, 0)], [b])[0], b.expand(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_group_backward(dtype):
    x, dy = torch.randn(5, 3, 40).to(dtype), [torch.randn(5, 3, n).to(dtype) for n in (24, 9)]
    ws, bs = [torch.randn(n, 40).to(dtype) for n in (24, 9)], [torch.randn(n).to(dtype) for n in (24, 9)]
    group = lambda x, w0, w1, b0, b1: tuple(linear_group(x, [w0, w1], [b0, b1]))  # noqa: E731
    group_ref = lambda x, w0, w1, b0, b1: tuple(linear_group_ref(x, [w0, w1], [b0, b1]))  # noqa: E731
    torch_ = lambda x, w0, w1, b0, b1: (F.linear(x, w0, b0), F.linear(x, w1, b1))  # noqa: E731
    got = grads(group, [x, *ws, *bs], dy)
    want = grads(group_ref, [t.double() for t in (x, *ws, *bs)], [d.double() for d in dy])
    for name, g, g64, gt in zip(["dx", "dw0", "dw1", "db0", "db1"], got, want, grads(torch_, [x, *ws, *bs], dy)):
        assert_close_derived(g, g64, gt, name=name)


def test_linear_group_gradcheck_float64():
    x, w0, w1, b0, b1 = (torch.randn(*s, dtype=torch.float64, requires_grad=True)
                         for s in [(3, 7), (5, 7), (2, 7), (5,), (2,)])
    assert torch.autograd.gradcheck(lambda *t: linear_group(t[0], t[1:3], t[3:]), (x, w0, w1, b0, b1))
    assert torch.autograd.gradcheck(lambda x, w0, w1: linear_group(x, [w0, w1]), (x, w0, w1))


def test_linear_group_opcheck_and_compile():
    x, ws = torch.randn(3, 40, requires_grad=True), [torch.randn(n, 40, requires_grad=True) for n in (6, 2)]
    torch.library.opcheck(torch.ops.llmkern.linear_group, (x, ws, [torch.randn(6), torch.randn(2)]))
    x, ws = x.detach(), [w.detach() for w in ws]
    torch.library.opcheck(torch.ops.llmkern.linear_group, (x.bfloat16(), [w.bfloat16() for w in ws], []))
    compiled = torch.compile(lambda x, a, b: [y * 2 for y in linear_group(x, [a, b])], fullgraph=True)
    for got, want in zip(compiled(x, *ws), linear_group(x, ws)):
        torch.testing.assert_close(got, want * 2)


X, W = torch.randn(2, 16), torch.randn(4, 16)
BAD = [
    ("weight", lambda: linear(X, W.double()), "weight: expected the dtype of x"),
    ("weight", lambda: linear(X, W[0]), r"weight: expected 2 dimensions"),
    ("weight", lambda: linear(X, torch.randn(4, 15)), "weight: expected K = 16"),
    ("bias", lambda: linear(X, W, torch.randn(5)), r"bias: expected shape \[4\]"),
    ("bias", lambda: linear(X, W, torch.randn(4).bfloat16()), "bias: expected the dtype of x"),
    ("x", lambda: linear(torch.tensor(1.0), W), "x: expected at least 1 dimension"),
    ("x", lambda: linear(X.int(), W.int()), "x: expected dtype"),
    ("weights", lambda: linear_group(X, []), "weights: expected at least one weight"),
    ("weights", lambda: linear_group(X, [W, torch.randn(3, 15)]), r"weights\[1\]: expected K = 16"),
    ("weights", lambda: linear_group(X, [W, W.bfloat16()]), r"weights\[1\]: expected the dtype of x"),
    ("biases", lambda: linear_group(X, [W, W], [torch.randn(4)]), r"biases: expected none or one per weight \(2\)"),
    ("biases", lambda: linear_group(X, [W, W], [torch.randn(4), torch.randn(3)]),
     r"biases\[1\]: expected shape \[4\]"),
]


@pytest.mark.parametrize("name,call,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(name, call, message):
    with pytest.raises((ValueError, RuntimeError, TypeError), match=message):
        call()


# mm: whole vectors of columns and a partial last one, several tiles of rows and columns (tiles of at most 192 x 512,
# 256 columns beyond), k in passes of 256 (k = 600: three), k = 0 (zeros), single rows and columns.
MM_SHAPES = [(1, 1, 1), (7, 5, 3), (1, 300, 33), (300, 1, 33), (13, 16, 600), (200, 100, 257), (385, 530, 20),
             (6, 1100, 9), (3, 4, 0)]


def check_mm(a, b):
    assert_close_derived(mm(a, b), mm_ref(a.double(), b.double()), mm_ref(a, b))


@pytest.mark.parametrize("m,n,k", MM_SHAPES)
def test_mm_matches_reference(cpu_isa, m, n, k):
    check_mm(torch.randn(m, k), torch.randn(k, n))


def test_mm_layouts(cpu_isa):
    a, b = torch.randn(70, 300), torch.randn(70, 90)
    check_mm(a.t(), b)                                   # a column-major (dy^T): read in place
    check_mm(strided(torch.randn(300, 70)), strided(b))  # rows further apart than contiguous
    check_mm(a.t()[::2], b)                              # neither stride 1: copied
    check_mm(torch.randn(300, 90), b.t())                # b column-major: copied
    check_mm(torch.randn(300, 70), torch.randn(70, 1).expand(70, 3))  # b's rows: one element, stride 0


def test_mm_backward():
    a, b, dc = torch.randn(300, 40), torch.randn(40, 33), torch.randn(300, 33)
    got, want, torch_ = grads(mm, [a, b], [dc]), grads(mm_ref, [a.double(), b.double()], [dc.double()]), grads(
        mm_ref, [a, b], [dc])
    for name, g, g64, gt in zip(["da", "db"], got, want, torch_):
        assert_close_derived(g, g64, gt, name=name)


def test_mm_opcheck():
    torch.library.opcheck(torch.ops.llmkern.mm, (torch.randn(30, 20, requires_grad=True), torch.randn(20, 17)))
    torch.library.opcheck(torch.ops.llmkern.mm, (torch.randn(20, 30).t(), torch.randn(20, 17, requires_grad=True)))


@pytest.mark.parametrize("a,b,match", [
    (torch.randn(3, 4).bfloat16(), torch.randn(4, 5), "a: expected float32"),
    (torch.randn(3, 4), torch.randn(4, 5).double(), "b: expected float32"),
    (torch.randn(12), torch.randn(12, 5), "a: expected 2 dimensions"),
    (torch.randn(3, 4), torch.randn(5, 5), r"b: expected \[K, N\] with K = 4"),
])
def test_mm_bad_inputs(a, b, match):
    with pytest.raises(RuntimeError, match=match):
        mm(a, b)
