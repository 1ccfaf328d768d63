"""llmkern.ops.sample_, the sampler's whole draw in one op, on every CPU path: an inverse CDF over transformers'
warped distribution (probabilities() in float64 is the reference), argmax at temperature 0, bad inputs named. And
apply_penalties_'s contract (its values: tests/generation/test_sampling.py, against the PyTorch path)."""

import pytest
import torch

import llmkern.ops as lk
from llmkern.generation import SamplingParams, probabilities

ops = torch.ops.llmkern
NAN = float("nan")


def draw(x, params, u):
    col = lambda name, dtype=torch.float32: torch.tensor([getattr(p, name) for p in params], dtype=dtype)  # noqa: E731
    return lk.sample_(x.clone(), col("temperature"), col("top_k", torch.long), col("top_p"), col("min_p"), u)


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=50),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.95, min_p=0.05),
    SamplingParams(min_p=0.2),
], ids=["plain", "top_k", "top_p", "all", "min_p"])
@pytest.mark.parametrize("vocab", [7, 1000, 8195])
def test_inverse_cdf_over_the_warped_distribution(cpu_isa, params, vocab):
    # N evenly spaced u's: token j takes the u's in [cdf(j - 1), cdf(j)), so its share is p_j within 1 / N (and the
    # tokens come in order).
    g = torch.Generator().manual_seed(vocab)
    row = torch.randn(1, vocab, generator=g) * 3
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = draw(row.expand(n, vocab), [params] * n, u.float())
    assert torch.equal(tokens, tokens.sort().values)
    p = probabilities(row.double(), [params])[0]
    share = torch.bincount(tokens, minlength=vocab).double() / n
    assert (share - p).abs().max() <= 1.0 / n + 1e-6
    assert share[p == 0].sum() == 0  # filtered tokens are never drawn


def test_temperature_zero_is_argmax_and_nan_rows(cpu_isa):
    x = torch.randn(5, 300)
    x[1, 7] = x[1, 200] = 50.0      # a tie: the first
    x[2, 30] = NAN                  # greedy: the first NaN, as argmax
    x[3, 99] = NAN                  # sampled: a NaN row gives its first NaN too
    x[4, 5] = float("inf")          # sampled: an infinite logit holds all the probability
    params = [SamplingParams(temperature=0)] * 3 + [SamplingParams(top_p=0.9)] * 2
    assert draw(x, params, torch.full((5,), 0.5)).tolist() == [int(x[0].argmax()), 7, 30, 99, 5]


def test_u_at_the_ends():
    x = torch.tensor([[1.0, -float("inf"), 2.0, 0.5, -float("inf")]])
    p = [SamplingParams()]
    assert draw(x, p, torch.tensor([0.0])).item() == 0
    assert draw(x, p, torch.tensor([1.0 - 2**-24])).item() == 3  # the last token with probability > 0


def test_opcheck():
    args = (torch.randn(3, 37), torch.tensor([0.0, 0.8, 1.0]), torch.tensor([0, 4, 1]), torch.tensor([0.9, 1.0, 0.5]),
            torch.tensor([0.0, 0.1, 0.0]), torch.tensor([0.1, 0.5, 0.99]))
    torch.library.opcheck(ops.sample_, args)


def _args(**change):
    args = dict(logits=torch.randn(2, 9), temperature=torch.ones(2), top_k=torch.zeros(2, dtype=torch.long),
                top_p=torch.ones(2), min_p=torch.zeros(2), u=torch.full((2,), 0.5))
    return {**args, **change}


@pytest.mark.parametrize("change, match", [
    (dict(temperature=torch.tensor([1.0, -0.5])), "temperature: expected values in"),
    (dict(temperature=torch.ones(3)), "temperature: expected float32 \\[2\\]"),
    (dict(min_p=torch.tensor([0.0, 1.5])), "min_p: expected values in"),
    (dict(u=torch.tensor([0.5, 1.0])), "u: expected values in \\[0, 1\\)"),
    (dict(u=torch.tensor([0.5, NAN])), "u: expected values in"),
    (dict(u=torch.full((2,), 0.5, dtype=torch.float64)), "u: expected float32"),
    (dict(top_p=torch.tensor([0.0, 1.0])), "top_p: expected values in \\(0, 1\\]"),
    (dict(logits=torch.randn(2, 9, dtype=torch.float16)), "logits: expected float32"),
])
def test_bad_input(change, match):
    with pytest.raises(RuntimeError, match=match):
        lk.sample_(**_args(**change))


def _penalty_args(**change):
    args = dict(logits=torch.randn(2, 9), ids=torch.tensor([1, 2, 2, 8, 0]), offsets=torch.tensor([0, 3, 5]),
                output_start=torch.tensor([1, 4]), repetition=torch.tensor([1.2, 1.0]),
                frequency=torch.tensor([0.5, 0.0]), presence=torch.tensor([0.0, -0.3]))
    return {**args, **change}


def test_penalties_by_hand():
    x = torch.tensor([[2.0, -1.0, 3.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    # row 0: history [1, 2, 2], outputs [2, 2]; row 1: history [3, 3, 0], outputs [3, 3, 0]
    lk.apply_penalties_(x, torch.tensor([1, 2, 2, 3, 3, 0]), torch.tensor([0, 3, 6]), torch.tensor([1, 3]),
                        torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.25]), torch.tensor([0.1, 1.0]))
    want = torch.tensor([[2.0, -2.0, 1.5 - 0.5 * 2 - 0.1, 0.5], [1.0 - 0.25 - 1.0, 1.0, 1.0, 1.0 - 0.5 - 1.0]])
    assert torch.equal(x, want)


@pytest.mark.parametrize("change, error, match", [
    (dict(ids=torch.tensor([1, 2, 9, 8, 0])), ValueError, "token ids must be in \\[0, 9\\)"),
    (dict(ids=torch.tensor([1, 2, -1, 8, 0])), ValueError, "token ids must be in"),
    (dict(ids=torch.tensor([1, 2, 2, 8, 0], dtype=torch.int32)), RuntimeError, "ids: expected int64"),
    (dict(offsets=torch.tensor([0, 3])), RuntimeError, "offsets: expected int64 \\[3\\]"),
    (dict(offsets=torch.tensor([0, 3, 6])), RuntimeError, "offsets: expected 0 first and at most 5 last"),
    (dict(output_start=torch.tensor([4, 4])), RuntimeError, "output_start"),
    (dict(repetition=torch.tensor([0.0, 1.0])), RuntimeError, "repetition: expected values in \\(0, inf\\]"),
    (dict(presence=torch.tensor([0.0, float("nan")])), RuntimeError, "presence: expected values in"),
    (dict(logits=torch.randn(2, 9, dtype=torch.bfloat16)), RuntimeError, "logits: expected float32"),
])
def test_penalties_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        lk.apply_penalties_(**_penalty_args(**change))


def test_penalties_opcheck():
    a = _penalty_args()
    torch.library.opcheck(ops.apply_penalties_, tuple(a.values()))
