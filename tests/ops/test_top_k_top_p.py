"""llmkern.ops.top_k_top_p_ against top_k_top_p_ref (transformers' warpers by a full sort) in float64 on every CPU
path: the same tokens removed and the kept logits untouched; ties kept whole; NaN rows left alone; bad inputs named."""

import pytest
import torch

import llmkern.ops as lk
from tests.helpers import strided

ops = torch.ops.llmkern
INF = float("inf")


def ref64(x, k, p):
    """The reference in float64 (its float32 cumsum may round a top_p of 0.999 across a token's cut)."""
    return lk.top_k_top_p_ref(x.double(), k, p.double()).to(x.dtype)


def filtered(x, k, p):
    out = x.clone()
    assert lk.top_k_top_p_(out, k, p) is out
    return out


def random_params(rows, vocab, g):
    k = torch.randint(-1, vocab + 3, (rows,), generator=g)
    k[::3] = 0  # no top-k
    k[1::5] = 1
    p = torch.rand(rows, generator=g).clamp(min=1e-6)
    p[::4] = 1.0  # no top-p
    p[2::7] = 0.999
    return k, p


# Row lengths: one token, shorter than a vector, a vector and a tail, a vocabulary and a tail.
@pytest.mark.parametrize("vocab", [1, 7, 17, 1000, 8195])
# Logit scales: flat (top-p keeps most of the row), moderate, peaked (a few candidates past the mass floor).
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_matches_reference(cpu_isa, vocab, scale):
    g = torch.Generator().manual_seed(vocab)
    for _ in range(4):
        x = torch.randn(24, vocab, generator=g) * scale
        k, p = random_params(24, vocab, g)
        assert torch.equal(filtered(x, k, p), ref64(x, k, p)), (k, p)


def test_top_k_ties_with_the_kth_value_are_kept(cpu_isa):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (8, 3000), generator=g).float()  # ~300 copies of each value
    k = torch.tensor([1, 5, 40, 299, 300, 301, 1500, 2999])
    p = torch.ones(8)
    got = filtered(x, k, p)
    assert torch.equal(got, ref64(x, k, p))
    assert ((got > -INF).sum(1) >= k).all() and ((got > -INF).sum(1) > k).any()


def test_top_p_keeps_every_token_tied_with_the_cut():
    # Two tokens of mass ~0.497 each: a sort keeps one of them for top_p = 0.3 (whichever it puts last); the
    # filter keeps both, since neither has more probable tokens above it.
    x = torch.tensor([[0.0, 5.0, -1.0, 5.0, 0.0]])
    got = filtered(x, torch.tensor([0]), torch.tensor([0.3]))
    assert torch.equal(got, torch.tensor([[-INF, 5.0, -INF, 5.0, -INF]]))
    assert ((lk.top_k_top_p_ref(x, torch.tensor([0]), torch.tensor([0.3])) > -INF).sum() == 1)


def test_infinities_nan_rows_and_strided_rows(cpu_isa):
    x = torch.randn(5, 40)
    x[0, ::3] = -INF            # tokens already removed
    x[1] = -INF                 # nothing left: unchanged
    x[2, 7] = float("nan")      # NaN: the row is left as it is
    x[3, 11] = INF              # +inf: softmax is NaN, so top-p removes nothing (the reference's rule)
    k, p = torch.tensor([3, 2, 3, 0, 0]), torch.tensor([0.9, 0.5, 0.5, 0.5, 1.0])
    got, want = filtered(x, k, p), ref64(x, k, p)
    assert torch.equal(got[[0, 1, 3, 4]], want[[0, 1, 3, 4]])
    assert torch.equal(got[2].nan_to_num(), x[2].nan_to_num()) and got[2].isnan().sum() == 1
    s = strided(torch.randn(6, 300) * 4)  # rows 3 elements apart, filtered in place
    k, p = torch.tensor([0, 5, 0, 50, 1, 0]), torch.tensor([0.8, 1.0, 0.3, 0.9, 0.5, 1.0])
    want = ref64(s, k, p)
    assert torch.equal(filtered(s, k, p), want)
    lk.top_k_top_p_(s, k, p)
    assert torch.equal(s, want)


def test_opcheck():
    args = (torch.randn(3, 37), torch.tensor([0, 4, 1]), torch.tensor([0.9, 1.0, 0.5]))
    torch.library.opcheck(ops.top_k_top_p_, args)


K2, P2 = torch.zeros(2, dtype=torch.long), torch.ones(2)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 9, dtype=torch.bfloat16), K2, P2), "logits: expected float32"),
    ((torch.randn(9), torch.zeros(1, dtype=torch.long), torch.ones(1)), "logits: expected float32 \\[rows, vocab\\]"),
    ((torch.randn(9, 2).t(), K2, P2), "logits"),
    ((torch.randn(2, 9), torch.zeros(2, dtype=torch.int32), P2), "top_k: expected int64 \\[2\\]"),
    ((torch.randn(2, 9), torch.zeros(3, dtype=torch.long), P2), "top_k: expected int64 \\[2\\]"),
    ((torch.randn(2, 9), K2, torch.ones(2, dtype=torch.float64)), "top_p: expected float32"),
    ((torch.randn(2, 9), K2, torch.tensor([0.5, 0.0])), "top_p: expected values in"),
    ((torch.randn(2, 9), K2, torch.tensor([1.5, 0.5])), "top_p: expected values in"),
    ((torch.randn(2, 9), K2, torch.tensor([float("nan"), 0.5])), "top_p: expected values"),
])
def test_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        lk.top_k_top_p_(*args)
