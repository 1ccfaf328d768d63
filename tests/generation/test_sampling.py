"""The batched sampler against transformers' logits processors, vLLM's penalty formula, and its own contracts:
greedy = argmax, same seed same tokens, rows independent of each other, draws follow the distribution."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmkern._ext import available
from llmkern.generation import SamplingParams, make_generator, probabilities, sample
from llmkern.generation import sampling
from llmkern.generation.sampling import apply_penalties, compute_logprobs, sample_seeds

VOCAB = 1000

# Each row its own combination, so the batched code must keep rows apart.
ROWS = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=50),
    SamplingParams(top_p=0.9),
    SamplingParams(temperature=0.6, top_k=40, top_p=0.8),
    SamplingParams(min_p=0.05),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.95, min_p=0.1, repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.8, top_k=VOCAB + 5),
    SamplingParams(temperature=2.0, top_p=0.5, min_p=0.2, repetition_penalty=1.1),
    SamplingParams(top_k=1),
]


def transformers_probs(logits_row, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """One row through transformers' processors in `generate`'s order, skipped when disabled as `generate` does."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(top_k=p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=p.top_p))
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(min_p=p.min_p))
    ids = torch.tensor([history], dtype=torch.long)
    return procs(ids, logits_row[None].clone())[0].softmax(-1)


def random_case(batch, seed=0, vocab=VOCAB, scale=3.0):
    """Random logits (integers 0..9 when scale is None: many exact ties) and random prompt / output tokens."""
    g = torch.Generator().manual_seed(seed)
    if scale is None:
        logits = torch.randint(0, 10, (batch, vocab), generator=g).float()
    else:
        logits = torch.randn(batch, vocab, generator=g) * scale
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (batch,), generator=g)]
    outputs = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in torch.randint(0, 20, (batch,), generator=g)]
    return logits, prompts, outputs


# Logit shapes that take each path of the top-k / top-p code: all tokens candidates (vocab <= 1024); a peaked
# distribution whose nucleus lies in the top-1024 candidates; a flat one that needs the full sort; exact ties
# (top-k keeps every token tied with the k-th; no top-p there, since a sort orders ties arbitrarily).
CASES = {
    "small_vocab": (1000, 3.0, ROWS),
    "peaked_large_vocab": (5000, 8.0, ROWS),
    "flat_large_vocab": (5000, 0.5, ROWS),
    "ties": (3000, None, [SamplingParams(top_k=k, min_p=m, temperature=t) for k, m, t in
                          [(5, 0.0, 1.0), (1, 0.0, 0.5), (40, 0.3, 1.0), (1500, 0.0, 2.0), (0, 0.5, 1.0)]]),
}


@pytest.mark.parametrize("compiled", [True, False], ids=["cpu-kernel", "torch-candidates"])
@pytest.mark.parametrize("case", list(CASES))
def test_probabilities_match_transformers_processors(case, compiled, monkeypatch):
    # Top-k / top-p through the compiled CPU filter, and through the torch path other devices take.
    monkeypatch.setattr(sampling, "available", lambda: compiled and available())
    vocab, scale, rows = CASES[case]
    logits, prompts, outputs = random_case(len(rows), vocab=vocab, scale=scale)
    ours = probabilities(logits, rows, prompts, outputs)
    for r, p in enumerate(rows):
        ref = transformers_probs(logits[r], p, prompts[r] + outputs[r])
        assert torch.equal(ours[r] > 0, ref > 0), f"row {r} ({p}): different tokens filtered"
        # Same fp32 math: only the order of the softmax / cumsum reductions may differ.
        torch.testing.assert_close(ours[r], ref, rtol=1e-5, atol=1e-7, msg=f"row {r} ({p})")
    if case != "ties":
        assert (ours[-1] > 0).sum() == 1  # top_k=1
        assert (ours[3] > 0).sum() < vocab  # top_p=0.9 filtered something
    else:
        assert (ours[0] > 0).sum() > 5  # ties with the 5th value kept


def test_presence_and_frequency_penalties_match_vllm_formula():
    logits, prompts, outputs = random_case(3, seed=1)
    outputs[1] = outputs[1] + outputs[1][:3]  # repeated tokens: counts above 1
    params = [SamplingParams(presence_penalty=0.5), SamplingParams(frequency_penalty=0.7, presence_penalty=-0.3),
              SamplingParams(frequency_penalty=-1.0, repetition_penalty=1.2)]
    got = apply_penalties(logits, params, prompts, outputs)
    for r, p in enumerate(params):
        ref = logits[r].clone()
        seen = set(prompts[r]) | set(outputs[r])  # repetition penalty: prompt and output
        for t in seen:
            ref[t] = ref[t] * p.repetition_penalty if ref[t] < 0 else ref[t] / p.repetition_penalty
        for t, n in Counter(outputs[r]).items():  # presence / frequency: output tokens only (OpenAI, vLLM)
            ref[t] -= p.frequency_penalty * n + p.presence_penalty
        torch.testing.assert_close(got[r], ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[0], logits[0])


def test_compiled_penalties_equal_the_torch_path(monkeypatch):
    # ops.apply_penalties_ (the CPU path) against the PyTorch index code (other devices), bit for bit; rows with
    # each penalty alone, all of them, none, and histories given as tensors.
    rows = [SamplingParams(repetition_penalty=1.3), SamplingParams(frequency_penalty=0.7),
            SamplingParams(presence_penalty=-0.4), SamplingParams(), SamplingParams(repetition_penalty=0.8,
            frequency_penalty=-1.1, presence_penalty=1.5), SamplingParams(repetition_penalty=1.1, presence_penalty=0.2)]
    logits, prompts, outputs = random_case(len(rows), seed=3, vocab=300)
    prompts[5] = torch.tensor(prompts[5])
    out = []
    for compiled in (True, False):
        monkeypatch.setattr(sampling, "available", lambda: compiled and available())
        out.append(apply_penalties(logits, rows, prompts, outputs))
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], logits) and torch.equal(out[0][3], logits[3])
    # a first decode step: no output tokens yet, so frequency and presence have no history at all
    empty = apply_penalties(logits[:2], rows[1:3], prompts[:2], [[], []])
    assert torch.equal(empty, logits[:2])


def test_greedy_is_argmax_of_penalized_logits():
    logits, prompts, outputs = random_case(4, seed=2)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=5.0),
              SamplingParams(temperature=0, top_k=3, top_p=0.1), SamplingParams(temperature=0, frequency_penalty=2.0)]
    top = logits.argmax(-1)
    prompts[1] = [int(top[1])]  # the repetition penalty must move row 1 off its raw argmax
    outputs[3] = [int(top[3])] * 3
    tokens = sample(logits, params, prompts, outputs)
    assert tokens.dtype == torch.long and tokens.shape == (4,)
    assert torch.equal(tokens, apply_penalties(logits, params, prompts, outputs).argmax(-1))
    assert tokens[0] == top[0] and tokens[2] == top[2]
    assert tokens[1] != top[1] and tokens[3] != top[3]
    probs = probabilities(logits, params, prompts, outputs)
    assert torch.equal(probs.argmax(-1), tokens) and torch.equal(probs.sum(-1), torch.ones(4))


def run_seeded(logits_steps, params, rows):
    """Tokens of the given rows over several steps, each row with its own generator."""
    gens = [make_generator(p) for p in params]
    return torch.stack([sample(step, params, generators=gens) for step in logits_steps])[:, rows]


def test_same_seed_same_tokens_independent_of_batch():
    steps = [torch.randn(6, VOCAB) for _ in range(8)]
    for s in steps:
        s[3] = s[0]  # rows 0 and 3: same seed, same logits
    params = [SamplingParams(seed=7, top_p=0.95), SamplingParams(seed=8), SamplingParams(temperature=0),
              SamplingParams(seed=7, top_p=0.95), SamplingParams(), SamplingParams(seed=9, top_k=5)]
    first = run_seeded(steps, params, [0, 1, 3, 5])
    assert torch.equal(first, run_seeded(steps, params, [0, 1, 3, 5]))
    assert torch.equal(first[:, 0], first[:, 2])  # same seed and logits in two rows: same tokens
    assert not torch.equal(first[:, 0], first[:, 1])
    # Row 0 alone, and row 5 moved to another batch position among other requests: the same tokens.
    alone = run_seeded([s[:1] for s in steps], params[:1], [0])
    assert torch.equal(alone[:, 0], first[:, 0])
    order = [5, 2, 4]
    moved = run_seeded([s[order] for s in steps], [params[i] for i in order], [0])
    assert torch.equal(moved[:, 0], first[:, 3])


def test_compiled_draw_equals_the_torch_path(monkeypatch):
    # On the CPU sample() draws in one compiled op (ops.sample_) with the same uniform numbers as the torch path:
    # the same tokens, seeded rows and unseeded ones alike.
    for seed, (vocab, scale) in enumerate([(1000, 3.0), (5000, 8.0), (5000, 0.5), (8192, 2.0)]):
        logits, prompts, outputs = random_case(len(ROWS), seed=seed, vocab=vocab, scale=scale)
        params = [dataclasses.replace(p, seed=100 * seed + i if i % 2 else None) for i, p in enumerate(ROWS)]
        tokens, before = [], logits.clone()
        for compiled in (True, False):
            monkeypatch.setattr(sampling, "available", lambda: compiled and available())
            torch.manual_seed(seed)
            tokens.append(sample(logits, params, prompts, outputs, generators=[make_generator(p) for p in params]))
        assert torch.equal(tokens[0], tokens[1])
        assert torch.equal(logits, before)  # the op draws on a copy of the caller's logits
    sample(logits, [SamplingParams(top_p=0.9)] * len(logits))  # no penalty: no new logits before the op's copy
    assert torch.equal(logits, before)


def test_draws_follow_the_distribution():
    """Total-variation distance between 40k draws and `probabilities` (3 sigma bound for 8 categories)."""
    torch.manual_seed(0)
    n, vocab = 40_000, 8
    logits = torch.randn(1, vocab).expand(n, vocab).contiguous()
    params = [SamplingParams(temperature=0.9, top_k=6, min_p=0.02)] * n
    p = probabilities(logits[:1], params[:1])[0]
    freq = torch.bincount(sample(logits, params), minlength=vocab).double() / n
    tv = 0.5 * (freq - p.double()).abs().sum().item()
    bound = 0.5 * sum(3 * (q * (1 - q) / n) ** 0.5 for q in p.double().tolist())
    assert tv <= bound, f"TV {tv:.4f} > {bound:.4f}"
    assert freq[p == 0].sum() == 0  # filtered tokens are never drawn


def test_bf16_logits_are_processed_in_fp32():
    logits = torch.randn(2, VOCAB)
    got = probabilities(logits.bfloat16(), [SamplingParams(top_p=0.9)] * 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, probabilities(logits.bfloat16().float(), [SamplingParams(top_p=0.9)] * 2))


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.1}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"seed": 1.5}, "seed"), ({"max_tokens": 0}, "max_tokens"), ({"stop": ["ok", ""]}, r"stop\[1\]"),
    ({"stop_token_ids": [3, -1]}, r"stop_token_ids\[1\]"), ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"logprobs": -1}, "logprobs"), ({"n": 0}, "n"),
    # beyond the int64 tensors the values end in (seeds: torch.Generator.manual_seed's range)
    ({"top_k": 2**63}, "top_k"), ({"stop_token_ids": [2**63]}, r"stop_token_ids\[0\]"), ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
])
def test_bad_params_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_extreme_ints_and_tiny_temperatures_sample():
    logits = torch.randn(3, VOCAB)
    big = [SamplingParams(top_k=2**63 - 1, seed=2**64 - 1), SamplingParams(seed=-(2**63), n=2)]
    assert sample(logits[:2], big, generators=[make_generator(p) for p in big]).shape == (2,)
    assert sample_seeds(big[1])[0] == -(2**63)
    # Below 1e-5 a temperature is greedy (vLLM's rule): dividing logits by it would overflow float32 (1e-40) or
    # round the divisor to 0 (1e-300).
    for t in (1e-6, 1e-40, 1e-300):
        params = SamplingParams(temperature=t)
        assert params.greedy and params.temperature == 0.0
        assert torch.equal(sample(logits, [params] * 3), logits.argmax(-1))
    assert not SamplingParams(temperature=1e-5).greedy


def test_params_normalize_stop():
    assert SamplingParams(stop="###").stop_strings == ("###",)
    assert SamplingParams(stop=["a", "bb"], stop_token_ids=[5]).stop_strings == ("a", "bb")
    assert SamplingParams().stop_strings == () and SamplingParams().stop_token_ids == ()


def test_bad_inputs_are_named():
    params = [SamplingParams()] * 2
    with pytest.raises(ValueError, match="params"):
        sample(torch.randn(3, 10), params)
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(2, 3, 10), params)
    with pytest.raises(ValueError, match="output_ids"):
        sample(torch.randn(2, 10), params, output_ids=[[1]])
    with pytest.raises(ValueError, match="token ids"):
        sample(torch.randn(2, 10), [SamplingParams(repetition_penalty=1.2)] * 2, prompt_ids=[[1], [10]])


def test_logprobs_of_the_raw_distribution():
    logits = torch.randn(3, 50, dtype=torch.float64)
    tokens = torch.tensor([4, 0, 49])
    got = compute_logprobs(logits.float(), tokens, num_top=5)
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(got.token.double(), ref[torch.arange(3), tokens], rtol=0, atol=1e-6)
    assert torch.equal(got.rank, (ref > ref[torch.arange(3), tokens][:, None]).sum(-1) + 1)
    assert torch.equal(got.top_ids, ref.topk(5).indices)
    assert compute_logprobs(logits, logits.argmax(-1)).rank.tolist() == [1, 1, 1]
