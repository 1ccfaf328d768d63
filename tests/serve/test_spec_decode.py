"""Speculative decoding math: the n-gram proposer and the rejection sampler (exactness, greedy, seeds, errors).

The statistical tests draw many independent rows in one batched call and compare the emitted tokens' counts
with the target distribution by a chi-square test at P_MIN with fixed seeds; test_statistic_detects_wrong_rules
shows the same statistic rejects samplers that break the rule in classic ways, so a pass means something.
"""

import pytest
import torch

from llmkern.serve.spec_decode import VerifyResult, ngram_propose, rejection_sample

P_MIN = 1e-4  # a correct sampler fails a check with this probability (fixed seeds: it passes or fails for good)
VOCAB = 5
ROWS = 40_000


# ---------------------------------------------------------------------------------------------- ngram_propose


@pytest.mark.parametrize(
    "tokens, k, min_n, max_n, expected",
    [
        ([7, 1, 2, 3, 9, 8, 6, 1, 2, 3], 3, 1, 4, [9, 8, 6]),  # the 3-gram [1, 2, 3] occurred at 1
        ([1, 2, 3, 4], 3, 1, 4, []),  # the last token never occurred before
        ([5, 3, 8, 4, 3, 9, 5, 3], 2, 1, 2, [8, 4]),  # the 2-gram [5, 3] beats the more recent 1-gram [3]
        ([5, 3, 8, 4, 3, 9, 5, 3], 2, 1, 1, [9, 5]),  # 1-grams only: the most recent [3] is followed by 9
        ([1, 2, 1, 3, 1], 2, 1, 4, [3, 1]),  # [1] at 0 and 2: the most recent wins
        ([4, 5, 6, 4, 5], 5, 1, 4, [6, 4, 5]),  # only 3 tokens follow the match
        ([1, 1, 1, 1], 4, 1, 4, [1]),  # the match overlaps the suffix itself
        ([1, 2, 3, 1], 3, 2, 4, []),  # only a 1-gram matches, below min_n
        ([1, 2, 3, 1], 3, 1, 4, [2, 3, 1]),
        ([], 3, 1, 4, []),
        ([7], 3, 1, 4, []),
    ],
)
def test_ngram_propose(tokens, k, min_n, max_n, expected):
    assert ngram_propose(tokens, k, min_n=min_n, max_n=max_n) == expected


def ngram_propose_ref(tokens, k, min_n, max_n):
    """The definition, literally: for n = max_n..min_n, the latest start i < len - n with the same n tokens."""
    for n in range(max_n, min_n - 1, -1):
        for i in range(len(tokens) - n - 1, -1, -1):
            if tokens[i : i + n] == tokens[len(tokens) - n :]:
                return tokens[i + n : i + n + k]
    return []


def test_ngram_propose_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    for case in range(400):
        tokens = torch.randint(0, 2 + case % 3, (case % 41,), generator=gen).tolist()
        k, min_n = 1 + case % 5, 1 + case % 3
        max_n = min_n + case % 4
        assert ngram_propose(tokens, k, min_n, max_n) == ngram_propose_ref(tokens, k, min_n, max_n), (tokens, k)


def test_ngram_propose_accepts_a_tensor():
    assert ngram_propose(torch.tensor([7, 1, 2, 3, 9, 8, 6, 1, 2, 3]), 2) == [9, 8]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be >= 1"),
        (dict(k=-2), "k must be >= 1"),
        (dict(k=1.5), "k must be an int"),
        (dict(k=2, min_n=0), "min_n must be >= 1"),
        (dict(k=2, max_n=0), "max_n must be >= 1"),
        (dict(k=2, min_n=3, max_n=2), "max_n must be >= min_n"),
        (dict(token_ids=[[1, 2], [3, 4]], k=2), "token_ids must be a flat sequence of int token ids"),
        (dict(token_ids=[1.0, 2.5], k=2), "token_ids must be a flat sequence of int token ids"),
        (dict(token_ids=["a", "b"], k=2), "token_ids must be a flat sequence of int token ids"),
    ],
)
def test_ngram_propose_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ngram_propose(**{"token_ids": [1, 2, 1], **kwargs})


# ----------------------------------------------------------------------------------------------- greedy rows

# (target argmax at positions 0..3, draft tokens (-1: padding), num_draft) -> (tokens, num_accepted)
GREEDY_ROWS = [
    (([3, 1, 4, 2], [3, 1, 5], 3), ([3, 1, 4], 2)),  # rejected at position 2: the target's argmax replaces it
    (([3, 1, 4, 2], [3, 1, 4], 3), ([3, 1, 4, 2], 3)),  # all accepted: the bonus token is the argmax at 3
    (([0, 6, 6, 6], [7, 6, 6], 3), ([0], 0)),  # rejected at once, later matches do not count
    (([5, 2, 2, 2], [-1, -1, -1], 0), ([5], 0)),  # nothing drafted: the target's argmax at 0
    (([2, 2, 7, 1], [2, 2, -1], 2), ([2, 2, 7], 2)),  # two drafted, both accepted: the bonus is at position 2
]


def _greedy_inputs(vocab=8):
    argmaxes, drafts, num_draft = zip(*(row for row, _ in GREEDY_ROWS))
    target = torch.nn.functional.one_hot(torch.tensor(argmaxes), vocab).float()
    return target, torch.tensor(drafts), list(num_draft)


def _random_draft_probs(drafts, vocab, gen):
    """A draft distribution q that gives each real draft token some mass, as a sampled draft would."""
    q = torch.rand(*drafts.shape, vocab, generator=gen) + 0.01
    q.scatter_add_(2, drafts.clamp(min=0)[..., None], torch.full((*drafts.shape, 1), 2.0))
    return q / q.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("proposer", ["deterministic", "sampled"])
def test_greedy_rows_follow_the_target_argmax_whatever_the_rng(proposer):
    target, drafts, num_draft = _greedy_inputs()
    expected_tokens = [tokens for _, (tokens, _) in GREEDY_ROWS]
    expected_accepted = [accepted for _, (_, accepted) in GREEDY_ROWS]
    q = _random_draft_probs(drafts, 8, torch.Generator().manual_seed(1)) if proposer == "sampled" else None
    for seed in range(6):
        torch.manual_seed(seed)  # the global generator, for rows without their own
        generators = [torch.Generator().manual_seed(100 * seed + r) if r % 2 else None for r in range(len(drafts))]
        result = rejection_sample(target, drafts, q, num_draft, generators if seed % 2 else None)
        assert result == VerifyResult(tokens=expected_tokens, num_accepted=expected_accepted)


def test_greedy_rows_unaffected_by_sampled_rows_in_the_batch():
    target, drafts, num_draft = _greedy_inputs()
    gen = torch.Generator().manual_seed(2)
    sampled = torch.softmax(torch.randn(3, 4, 8, generator=gen), dim=-1)
    batch_target = torch.cat([sampled[:1], target, sampled[1:]])
    batch_drafts = torch.cat([torch.tensor([[1, 2, 3]]), drafts, torch.tensor([[0, 0, 0], [4, 4, 4]])])
    result = rejection_sample(batch_target, batch_drafts, None, [3] + num_draft + [1, 3])
    assert result.tokens[1:-2] == [tokens for _, (tokens, _) in GREEDY_ROWS]


def test_empty_residual_falls_back_to_the_target():
    # The draft proposed token 1 although its q gives it no mass (rounding, or a proposer ignoring q): the target
    # rejects it (p = 0) and max(p - q, 0) is all zero, so the replacement comes from p.
    target = torch.tensor([[[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])
    q = torch.tensor([[[1.0, 0.0, 0.0]]])
    for seed in range(4):
        torch.manual_seed(seed)
        assert rejection_sample(target, torch.tensor([[1]]), q, [1]) == VerifyResult(tokens=[[0]], num_accepted=[0])


# ------------------------------------------------------------------------------------------- draft == target


def test_draft_equal_to_target_accepts_everything():
    gen = torch.Generator().manual_seed(3)
    rows, k, vocab = 2000, 4, 11
    logits = torch.randn(rows, k + 1, vocab, generator=gen) * 2
    logits[..., :3] = float("-inf")  # zeros in p, as top-k / top-p leave them
    p = torch.softmax(logits, dim=-1)
    drafts = torch.multinomial(p[:, :k].reshape(-1, vocab), 1, generator=gen).view(rows, k)
    num_draft = [r % (k + 1) for r in range(rows)]
    result = rejection_sample(p, drafts, p[:, :k].clone(), num_draft)
    assert result.num_accepted == num_draft
    assert all(tokens[:-1] == drafts[r, : num_draft[r]].tolist() for r, tokens in enumerate(result.tokens))


# ------------------------------------------------------------------------------------- statistical exactness


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi-square >= the statistic) for observed counts against expected probabilities (all cells > 0)."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    expected = counts.sum() * probs / probs.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic / 2))


def _distribution(gen, *shape):
    """Random distributions over VOCAB, far from each other and from uniform, but with every token >= 0.03,
    so each cell of the tests below expects dozens of counts at least."""
    return 0.85 * torch.softmax(2.0 * torch.randn(*shape, VOCAB, generator=gen), dim=-1) + 0.15 / VOCAB


class Chain:
    """A two-step target and draft with context: p0, q0 for the first token, P1[a], Q1[a] for the second after
    token a, P2[b] for the third (the bonus) after b. The emitted (y0, y1) must be distributed as p0(a) P1[a](b)."""

    def __init__(self, seed):
        gen = torch.Generator().manual_seed(seed)
        self.p0, self.q0 = _distribution(gen), _distribution(gen)
        self.P1, self.Q1, self.P2 = _distribution(gen, VOCAB), _distribution(gen, VOCAB), _distribution(gen, VOCAB)
        self.gen = gen

    def draft(self, rows):
        x0 = torch.multinomial(self.q0, rows, replacement=True, generator=self.gen)
        x1 = torch.multinomial(self.Q1[x0], 1, generator=self.gen)[:, 0]
        return x0, x1

    def verify_inputs(self, x0, x1):
        target = torch.stack([self.p0.expand(len(x0), -1), self.P1[x0], self.P2[x1]], dim=1)
        draft = torch.stack([self.q0.expand(len(x0), -1), self.Q1[x0]], dim=1)
        return target, torch.stack([x0, x1], dim=1), draft

    def pairs(self, tokens: list[list[int]]):
        """(y0, y1) per row; a row that emitted one token gets its second from P1[y0], as the next round would."""
        y0 = torch.tensor([t[0] for t in tokens])
        y1 = torch.multinomial(self.P1[y0], 1, generator=self.gen)[:, 0]
        emitted_two = torch.tensor([len(t) >= 2 for t in tokens])
        y1 = torch.where(emitted_two, torch.tensor([t[1] if len(t) >= 2 else -1 for t in tokens]), y1)
        return y0, y1, emitted_two

    def joint(self):
        return self.p0[:, None] * self.P1


def _counts(y0, y1=None):
    if y1 is None:
        return torch.bincount(y0, minlength=VOCAB)
    return torch.bincount(y0 * VOCAB + y1, minlength=VOCAB * VOCAB)


def test_sampled_draft_is_exact():
    chain = Chain(seed=10)
    x0, x1 = chain.draft(ROWS)
    target, drafts, draft_probs = chain.verify_inputs(x0, x1)
    result = rejection_sample(target, drafts, draft_probs, [2] * ROWS)
    y0, y1, first_accepted = chain.pairs(result.tokens)

    # (a) the first token is distributed as p0; position 0 accepts with probability sum(min(p0, q0)).
    assert chi2_pvalue(_counts(y0), chain.p0) > P_MIN
    accept = torch.minimum(chain.p0, chain.q0).sum()
    assert chi2_pvalue(torch.bincount(first_accepted.long(), minlength=2), torch.stack([1 - accept, accept])) > P_MIN
    # (b) the first two tokens are distributed as p0(a) P1[a](b): the second is conditioned on the first...
    assert chi2_pvalue(_counts(y0, y1), chain.joint()) > P_MIN
    # ...also given that the first was accepted (then y0 ~ min(p0, q0) / accept and y1 ~ P1[y0]).
    accepted_joint = torch.minimum(chain.p0, chain.q0)[:, None] * chain.P1
    assert chi2_pvalue(_counts(y0[first_accepted], y1[first_accepted]), accepted_joint) > P_MIN
    assert result.num_accepted == [len(t) - 1 for t in result.tokens]


@pytest.mark.parametrize("proposal", [(1, 3), (4, 4)])
def test_deterministic_proposer_is_exact(proposal):
    # (c) q one-hot (n-gram, greedy draft): every row proposes the same tokens, whatever p says.
    chain = Chain(seed=11)
    x0, x1 = torch.full((ROWS,), proposal[0]), torch.full((ROWS,), proposal[1])
    target, drafts, _ = chain.verify_inputs(x0, x1)
    result = rejection_sample(target, drafts, None, [2] * ROWS)
    y0, y1, _ = chain.pairs(result.tokens)
    assert chi2_pvalue(_counts(y0), chain.p0) > P_MIN
    assert chi2_pvalue(_counts(y0, y1), chain.joint()) > P_MIN


def test_one_hot_draft_probs_equal_no_draft_probs():
    chain = Chain(seed=12)
    x0, x1 = chain.draft(500)
    target, drafts, _ = chain.verify_inputs(x0, x1)
    one_hot = torch.nn.functional.one_hot(drafts, VOCAB).float()
    num_draft = [r % 3 for r in range(500)]
    torch.manual_seed(5)
    implicit = rejection_sample(target, drafts, None, num_draft)
    torch.manual_seed(5)
    assert rejection_sample(target, drafts, one_hot, num_draft) == implicit


def test_statistic_detects_wrong_rules():
    """The checks above are sensitive: classic mistakes, run on the same inputs, fail them by far."""
    chain = Chain(seed=10)
    x0, x1 = chain.draft(ROWS)
    target, drafts, draft_probs = chain.verify_inputs(x0, x1)
    u = torch.rand(ROWS, generator=chain.gen)
    accepted = u * chain.q0[x0] < chain.p0[x0]

    # Replacement drawn from p instead of max(p - q, 0): too much mass on what the draft already favours.
    from_p = torch.multinomial(chain.p0, ROWS, replacement=True, generator=chain.gen)
    assert chi2_pvalue(_counts(torch.where(accepted, x0, from_p)), chain.p0) < P_MIN

    # The deterministic proposer's replacement (p without x) after a sampled draft's acceptance test: the
    # residual must remove q's mass, not only x. (Ignoring q altogether, i.e. accepting with probability p(x)
    # and replacing from p without x, would be right: that is the deterministic rule, valid for any proposal.)
    without_x = chain.p0.expand(ROWS, -1).scatter(1, x0[:, None], 0.0)
    replacement = torch.multinomial(without_x, 1, generator=chain.gen)[:, 0]
    assert chi2_pvalue(_counts(torch.where(accepted, x0, replacement)), chain.p0) < P_MIN

    # Each position verified on its own, not stopping at the first rejection: after a rejected x0 the second
    # token is judged by P1[x0], the target's distribution after a token that was never emitted.
    position0 = rejection_sample(target[:, :2], drafts[:, :1], draft_probs[:, :1], [1] * ROWS)
    position1 = rejection_sample(target[:, 1:], drafts[:, 1:], draft_probs[:, 1:], [1] * ROWS)
    y0 = torch.tensor([t[0] for t in position0.tokens])
    y1 = torch.tensor([t[0] for t in position1.tokens])
    assert chi2_pvalue(_counts(y0), chain.p0) > P_MIN  # the first token alone is still right...
    assert chi2_pvalue(_counts(y0, y1), chain.joint()) < P_MIN  # ...the pair is not


# ------------------------------------------------------------------------------------- seeds, padding, errors


def _sampled_batch(seed, rows=4, k=3, vocab=9):
    gen = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(rows, k + 1, vocab, generator=gen), dim=-1)
    draft_probs = torch.softmax(torch.randn(rows, k, vocab, generator=gen), dim=-1)
    drafts = torch.multinomial(draft_probs.view(-1, vocab), 1, generator=gen).view(rows, k)
    return target, drafts, draft_probs


def _generators(seeds):
    return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]


def test_seeded_rows_reproduce():
    target, drafts, draft_probs = _sampled_batch(20, rows=64)
    seeds = [1000 + r for r in range(64)]
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # must not matter to seeded rows
        results.append(rejection_sample(target, drafts, draft_probs, [3] * 64, _generators(seeds)))
    assert results[0] == results[1]
    # and the seeds matter: another set gives other tokens somewhere in 64 rows
    other = rejection_sample(target, drafts, draft_probs, [3] * 64, _generators([s + 1 for s in seeds]))
    assert other.tokens != results[0].tokens


def test_seeded_row_ignores_the_batch_around_it():
    # Alone with k = 2, or padded to k = 5 among other rows (seeded and not): same tokens, same generator state.
    target, drafts, draft_probs = _sampled_batch(21, rows=1, k=2)
    alone_gen = torch.Generator().manual_seed(7)
    alone = rejection_sample(target, drafts, draft_probs, [2], [alone_gen])

    others_target, others_drafts, others_q = _sampled_batch(22, rows=3, k=5)
    pad = (0, 0, 0, 3)
    batch_target = torch.cat([others_target[:2], torch.nn.functional.pad(target, pad, value=0.5), others_target[2:]])
    batch_q = torch.cat([others_q[:2], torch.nn.functional.pad(draft_probs, pad, value=0.5), others_q[2:]])
    batch_drafts = torch.cat([others_drafts[:2], torch.nn.functional.pad(drafts, (0, 3), value=1), others_drafts[2:]])
    batch_gen = torch.Generator().manual_seed(7)
    generators = [torch.Generator().manual_seed(3), None, batch_gen, None]
    batch = rejection_sample(batch_target, batch_drafts, batch_q, [5, 4, 2, 5], generators)
    assert batch.tokens[2] == alone.tokens[0] and batch.num_accepted[2] == alone.num_accepted[0]
    assert torch.equal(batch_gen.get_state(), alone_gen.get_state())


def test_padding_is_never_read():
    # NaN in the target's and the draft's padding positions, out-of-vocabulary padding tokens: nothing changes.
    target, drafts, draft_probs = _sampled_batch(23, rows=6, k=4)
    num_draft = [0, 1, 2, 3, 4, 2]
    seeds = [40 + r for r in range(6)]
    clean = rejection_sample(target, drafts, draft_probs, num_draft, _generators(seeds))
    for r, n in enumerate(num_draft):
        target[r, n + 1 :] = float("nan")
        draft_probs[r, n:] = float("nan")
        drafts[r, n:] = 10**6
    assert rejection_sample(target, drafts, draft_probs, num_draft, _generators(seeds)) == clean


def test_no_drafts():
    target = torch.softmax(torch.randn(3, 1, 9), dim=-1)
    drafts = torch.zeros(3, 0, dtype=torch.int64)
    result = rejection_sample(target, drafts, None, [0, 0, 0])
    assert result.num_accepted == [0, 0, 0] and all(len(t) == 1 for t in result.tokens)
    assert rejection_sample(target[:0], drafts[:0], None, []) == VerifyResult(tokens=[], num_accepted=[])


def _bad(**changes):
    target, drafts, draft_probs = _sampled_batch(25, rows=2, k=3)
    args = dict(target_probs=target, draft_tokens=drafts, draft_probs=draft_probs, num_draft=[3, 2], generators=None)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, match",
    [
        (_bad(target_probs=torch.rand(2, 4, 9, dtype=torch.float64)), "target_probs must be a float32 tensor"),
        (_bad(target_probs=torch.rand(2, 9)), "target_probs must be a float32 tensor"),
        (_bad(target_probs=[[0.5, 0.5]]), "target_probs must be a float32 tensor"),
        (_bad(target_probs=torch.rand(2, 0, 9)), "target_probs needs k"),
        (_bad(draft_tokens=torch.zeros(2, 3, dtype=torch.int32)), "draft_tokens must be an int64 tensor"),
        (_bad(draft_tokens=torch.zeros(2, 4, dtype=torch.int64)), r"draft_tokens must have shape \[batch, k\]"),
        (_bad(draft_tokens=torch.tensor([[1, 2, 9], [0, 0, 0]])), "draft_tokens must be in"),
        (_bad(draft_tokens=torch.tensor([[1, 2, 3], [0, -1, 0]])), "draft_tokens must be in"),
        (_bad(draft_probs=torch.rand(2, 3, 8)), "draft_probs must have shape"),
        (_bad(draft_probs=torch.rand(2, 3, 9).half()), "draft_probs must be None or a float32 tensor"),
        (_bad(num_draft=[3]), "num_draft: one count per row"),
        (_bad(num_draft=[3, -1]), r"num_draft\[1\] must be >= 0"),
        (_bad(num_draft=[4, 2]), r"num_draft\[0\] must be <= k = 3"),
        (_bad(num_draft=[3, 2.0]), r"num_draft\[1\] must be an int"),
        (_bad(generators=[None]), "generators: one per row"),
    ],
)
def test_rejection_sample_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        rejection_sample(**args)
