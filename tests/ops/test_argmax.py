"""llmkern.ops.argmax against torch.argmax (the reference): every dtype and CPU path, ties, NaN, infinities."""

import pytest
import torch

import llmkern.ops as lk
from tests.helpers import DTYPES, strided

ops = torch.ops.llmkern
NAN, INF = float("nan"), float("inf")

# Row lengths: shorter than a vector, whole vectors of 8 and 16 lanes, a vector and a tail, a vocabulary.
LENGTHS = [1, 7, 16, 17, 33, 8192, 8195]


def check(x):
    got = lk.argmax(x)
    assert got.dtype == torch.int64 and got.shape == x.shape[:-1]
    assert torch.equal(got, lk.argmax_ref(x))


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("n", LENGTHS)
def test_matches_torch(cpu_isa, dtype, n):
    check(torch.randn(5, n).to(dtype))
    check(torch.randint(-3, 3, (9, n)).to(dtype))  # many ties: the first maximum


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_infinities(cpu_isa, dtype):
    n = 50  # three 16-lane vectors and a tail
    x = torch.randn(8, n)
    x[0, 40] = NAN                       # NaN in a vector lane, after the maximum: the NaN
    x[1, 10], x[1, 30] = NAN, NAN        # the first of two NaNs
    x[2, 49] = NAN                       # NaN in the tail
    x[3] = -INF                          # all -inf: index 0
    x[4, 20], x[4, 35] = INF, INF        # the first +inf
    x[5] = -INF
    x[5, 48] = -1.0                      # the only finite value, in the tail
    x[6, 3], x[6, 0] = NAN, -INF         # NaN before everything else
    x[7, 17], x[7, 33], x[7, 49] = 9.0, 9.0, 9.0  # a tie across lanes and the tail
    check(x.to(dtype))


def test_leading_dims_and_strided_rows(cpu_isa):
    x = torch.randn(3, 4, 100, dtype=torch.bfloat16)
    check(x)
    check(strided(torch.randn(6, 70)))      # rows 3 elements apart
    check(torch.randn(70, 6).t())           # unit stride across rows: copied
    check(torch.randn(0, 10))               # no rows


def test_long_row_segments():
    # Lane indices count in float32 (exact to 2^24): longer rows go in segments; the maximum of the second
    # segment ties one of the first (the first wins) and one past 2^24 + 1 would round in a float index.
    n = (1 << 24) + 21
    x = torch.zeros(1, n)
    x[0, (1 << 24) + 3] = 5.0
    check(x)
    x[0, 12345] = 5.0
    check(x)


def test_opcheck():
    torch.library.opcheck(ops.argmax, (torch.randn(3, 37, dtype=torch.bfloat16),))


def test_compiled_matches_eager():
    x = torch.randn(4, 300)
    compiled = torch.compile(lambda t: lk.argmax(t * 2), fullgraph=True)
    assert torch.equal(compiled(x), lk.argmax(x))


@pytest.mark.parametrize("x, error, match", [
    (torch.tensor(1.0), RuntimeError, "x: expected \\[..., n\\]"),
    (torch.randn(3, 0), RuntimeError, "x: expected a non-empty last dim"),
    (torch.randint(0, 5, (3, 4)), TypeError, "x: expected dtype float32, bfloat16, float16 or float64, got Long"),
])
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        lk.argmax(x)
