"""llmkern.ops.logprobs against log_softmax in float64 on every CPU path: the chosen tokens' log-probabilities, their
ranks, the top alternatives (ties: the lower id first); strided rows; bad inputs named."""

import pytest
import torch

import llmkern.ops as lk
from tests.helpers import DTYPES, strided

ops = torch.ops.llmkern


def check(x, tokens, num_top):
    lp, rank, top, ids = lk.logprobs(x, tokens, num_top)
    xf = x.float()
    ref = xf.double().log_softmax(-1)
    # float32 rounding of (x - max) - log(sum): a few ulps of the larger of |x - max| and log(sum)
    tol = 4 * torch.finfo(torch.float32).eps * (ref.abs().amax(-1) + 1)
    assert ((lp.double() - ref.gather(1, tokens[:, None])[:, 0]).abs() <= tol).all()
    # log-probabilities keep the logits' order (the test's logits are 1/64 apart or equal)
    assert torch.equal(rank, (xf > xf.gather(1, tokens[:, None])).sum(-1) + 1)
    want = torch.sort(-xf, dim=-1, stable=True).indices[:, :num_top]  # descending, ties by the lower id
    assert torch.equal(ids, want)
    assert ((top.double() - ref.gather(1, want)).abs() <= tol[:, None]).all()


def logits(rows, vocab, dtype, g):
    # multiples of 1/64: exact ties, and distinct values far apart from float32 rounding
    return ((torch.randn(rows, vocab, generator=g) * 3 * 64).round() / 64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 17, 1000, 8195])
@pytest.mark.parametrize("num_top", [0, 1, 5, 20])
def test_matches_log_softmax(cpu_isa, dtype, vocab, num_top):
    g = torch.Generator().manual_seed(vocab + num_top)
    x = logits(9, vocab, dtype, g)
    tokens = torch.randint(0, vocab, (9,), generator=g)
    tokens[0] = x[0].float().argmax()
    check(x, tokens, min(num_top, vocab))


def test_strided_rows_ties_and_infinities(cpu_isa):
    g = torch.Generator().manual_seed(0)
    x = strided(logits(4, 300, torch.float32, g))
    x[1] = 2.0                      # every token tied: ids 0, 1, 2, ...
    x[2, ::2] = -float("inf")       # half the tokens impossible
    check(x, torch.tensor([5, 7, 3, 0]), 6)


def test_opcheck():
    torch.library.opcheck(ops.logprobs, (torch.randn(3, 37, dtype=torch.bfloat16), torch.tensor([0, 4, 36]), 5))


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(2, 9), torch.tensor([0, 9]), 3), IndexError, "tokens: expected ids in \\[0, 9\\)"),
    ((torch.randn(2, 9), torch.tensor([0, -1]), 3), IndexError, "tokens: expected ids in"),
    ((torch.randn(2, 9), torch.tensor([0, 1], dtype=torch.int32), 3), RuntimeError, "tokens: expected int64 \\[2\\]"),
    ((torch.randn(2, 9), torch.tensor([0]), 3), RuntimeError, "tokens: expected int64 \\[2\\]"),
    ((torch.randn(2, 9), torch.tensor([0, 1]), 10), RuntimeError, "num_top: expected 0..9"),
    ((torch.randn(9), torch.tensor([0]), 1), RuntimeError, "logits: expected \\[rows, vocab\\]"),
    ((torch.randint(0, 3, (2, 9)), torch.tensor([0, 1]), 1), TypeError, "logits: expected dtype"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        lk.logprobs(*args)
