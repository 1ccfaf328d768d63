"""Speculative decoding in the engine: greedy output unchanged (draft model and n-gram), a draft equal to the
target accepts everything, and sampled output keeps the target's distribution (chi-square against the exact
distribution of a tiny-vocabulary model, with a check that the test rejects the draft's distribution)."""

from __future__ import annotations

import math

import pytest
import torch
from llm_refs import write_llama_checkpoint
from model_refs import make_hf_model, randomize_

from llmkern.generation import SamplingParams, probabilities
from llmkern.models import load_model
from llmkern.serve.config import EngineConfig
from llmkern.serve.engine import Engine, kv_block_bytes

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama and a different random one with the same vocabulary (the draft)."""
    root = tmp_path_factory.mktemp("spec")
    _, target = write_llama_checkpoint(root / "target")
    draft = load_model(target)
    randomize_(draft, seed=1)  # same shapes, other weights: a draft that is often wrong
    return target, draft


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    random = [torch.randint(3, 600, (n,), generator=g).tolist() for n in (5, 17, 3)]
    repetitive = [[7, 8, 9, 10, 11] * 5, [40, 41] * 9 + [40]]  # n-gram lookup finds these
    return random + repetitive


def run(engine: Engine, prompts, params) -> list[list[list[int]]]:
    """Each request's samples' tokens."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    out = {str(i): [[] for _ in range(params.n)] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for o in engine.step():
            for d in o.deltas:
                out[o.request_id][d.index] += d.token_ids
    assert engine.stats().kv_cache_usage == 0.0
    return [out[str(i)] for i in range(len(prompts))]


def engine(target, draft=None, **kw) -> Engine:
    model = load_model(target)
    config = EngineConfig(block_size=4, **kw, **({"speculative": "draft", "draft_model": "given"} if draft else {}))
    return Engine(model, config=config, draft_model=draft)


@pytest.mark.parametrize("method", ["ngram", "draft", "draft=target"])
def test_greedy_output_is_unchanged_by_speculation(checkpoints, prompts, method):
    target, draft = checkpoints
    plain = run(engine(target), prompts, GREEDY)
    if method == "ngram":
        spec = engine(target, speculative="ngram", num_speculative_tokens=3)
    else:
        spec = engine(target, draft if method == "draft" else load_model(target), num_speculative_tokens=4)
    assert run(spec, prompts, GREEDY) == plain
    stats = spec.stats()
    assert stats.spec_rounds > 0 and stats.spec_drafted >= stats.spec_accepted
    assert stats.spec_accepted_per_position == sorted(stats.spec_accepted_per_position, reverse=True)
    if method == "draft=target":
        assert stats.spec_accepted == stats.spec_drafted  # acceptance 1.0
    else:
        assert stats.spec_accepted < stats.spec_drafted  # some rejections were exercised


def test_a_draft_equal_to_the_target_accepts_every_sampled_token(checkpoints, prompts):
    target, _ = checkpoints
    spec = engine(target, load_model(target), num_speculative_tokens=3)
    run(spec, prompts, SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True))
    stats = spec.stats()
    assert stats.spec_drafted > 0 and stats.spec_accepted == stats.spec_drafted


def test_speculation_with_preemption_prefix_hits_and_n_samples_keeps_greedy_output(checkpoints, prompts):
    target, draft = checkpoints
    params = SamplingParams(n=2, temperature=0.0, max_tokens=20, ignore_eos=True)
    prompts = prompts + [prompts[3] + [5, 6, 7]]  # a cached prefix: the draft recomputes its own cache over it
    plain = run(engine(target), prompts, params)
    per_block = kv_block_bytes(load_model(target), 4) * 2  # target and draft caches
    tiny = engine(target, draft, kv_cache_memory=(32 + 6) * per_block)  # one full-length sequence and a bit
    assert run(tiny, prompts[3:4], params) == plain[3:4]  # caches the prefix of the last prompt
    assert run(tiny, prompts, params) == plain
    stats = tiny.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


# ---- the sampled distribution ----

VOCAB, PROMPT, K, N = 8, [3, 1, 4], 2, 6000
PARAMS = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)


def exact_distribution(model) -> torch.Tensor:
    """The model's exact probability of each continuation (t1, t2, t3, t4) of PROMPT [V, V, V, V], by enumeration."""
    rows = torch.cartesian_prod(*[torch.arange(VOCAB)] * 3)  # every (t1, t2, t3)
    ids = torch.cat([torch.tensor(PROMPT).expand(len(rows), -1), rows], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, len(PROMPT) - 1 :].float()  # the next-token logits after PROMPT, t1, t2, t3
    p = probabilities(logits.reshape(-1, VOCAB), [PARAMS] * logits[:, :, 0].numel()).view(len(rows), 4, VOCAB)
    t1, t2, t3 = rows.T
    joint = p[:, 0].gather(1, t1[:, None]) * p[:, 1].gather(1, t2[:, None]) * p[:, 2].gather(1, t3[:, None])
    return (joint * p[:, 3]).view(VOCAB, VOCAB, VOCAB, VOCAB)


def chi_square(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, float]:
    """Pearson's statistic (cells expected below min_expected pooled) and its critical value at p = 1e-4
    (Wilson-Hilferty)."""
    expected = probs.flatten().double() * counts.sum()
    counts = counts.flatten().double()
    small = expected < min_expected
    e, o = expected[~small], counts[~small]
    if small.any():
        e, o = torch.cat([e, expected[small].sum()[None]]), torch.cat([o, counts[small].sum()[None]])
    stat = float(((o - e) ** 2 / e).sum())
    df = len(e) - 1
    z = 3.719  # the standard normal's 1 - 1e-4 quantile
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_output_with_a_draft_model_is_distributed_as_the_target(tmp_path):
    """Tokens 2..4 come from speculative rounds (2 draft tokens and the bonus, or a rejection and further
    rounds); the joint distribution of tokens 2 and 3, and token 4's, must be the target's, not the draft's."""
    make_hf_model("llama", vocab_size=VOCAB).save_pretrained(tmp_path / "t")
    randomize_(make_hf_model("llama", vocab_size=VOCAB), seed=1).save_pretrained(tmp_path / "d")
    target, draft = load_model(tmp_path / "t"), load_model(tmp_path / "d")
    config = EngineConfig(block_size=4, speculative="draft", draft_model="given", num_speculative_tokens=K,
                          max_num_seqs=1024, max_num_batched_tokens=8192, max_waiting=N,
                          kv_cache_memory=kv_block_bytes(target, 4) * 2 * 2048)
    spec = Engine(target, config=config, draft_model=draft)
    for i in range(N):
        spec.add_request(str(i), PROMPT, SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=i))
    samples = {str(i): [] for i in range(N)}
    while spec.has_unfinished_requests():
        for o in spec.step():
            samples[o.request_id] += [t for d in o.deltas for t in d.token_ids]
    samples = torch.tensor(list(samples.values()))
    stats = spec.stats()
    assert stats.spec_rounds >= N and 0 < stats.spec_accepted < stats.spec_drafted  # rejections happened
    p_target, p_draft = exact_distribution(target), exact_distribution(draft)
    counts = torch.zeros(VOCAB, VOCAB, VOCAB, VOCAB).index_put_(tuple(samples.T), torch.ones(N), accumulate=True)
    for name, dims in (("tokens 2-3", (0, 3)), ("token 4", (0, 1, 2))):
        stat, critical = chi_square(counts.sum(dims), p_target.sum(dims))
        assert stat < critical, f"{name}: chi-square {stat:.1f} >= {critical:.1f} against the target"
        stat, critical = chi_square(counts.sum(dims), p_draft.sum(dims))
        assert stat > critical, f"{name}: the test cannot tell the draft's distribution from the target's"


def test_greedy_and_sampled_requests_speculate_in_one_batch(checkpoints, prompts):
    """Mixed batches take the general verification path (greedy rows one-hot); greedy outputs stay exact."""
    target, draft = checkpoints
    plain = run(engine(target), prompts, GREEDY)
    spec = engine(target, draft, num_speculative_tokens=3)
    sampled = SamplingParams(temperature=1.0, seed=1, max_tokens=20, ignore_eos=True)
    for i, p in enumerate(prompts):
        spec.add_request(f"g{i}", p, GREEDY)
        spec.add_request(f"s{i}", p, sampled)
    out = {}
    while spec.has_unfinished_requests():
        for o in spec.step():
            out.setdefault(o.request_id, []).extend(t for d in o.deltas for t in d.token_ids)
    assert [out[f"g{i}"] for i in range(len(prompts))] == [p[0] for p in plain]
    assert all(len(out[f"s{i}"]) == 20 for i in range(len(prompts)))


def test_a_prompt_whose_last_chunk_is_one_token_forks_its_samples(checkpoints):
    """Chunked prefill can leave exactly one prompt token for a step: it picks the first token plainly (no
    drafts), so a request's n samples are still forked from it."""
    target, _ = checkpoints
    prompt = [7, 8, 9, 10] * 2 + [7]  # 9 tokens: a chunk of 8, then 1; n-gram lookup has a proposal for it
    params = SamplingParams(n=2, temperature=0.0, max_tokens=6, ignore_eos=True)
    plain = run(engine(target, max_num_batched_tokens=8), [prompt], params)
    spec = run(engine(target, speculative="ngram", max_num_batched_tokens=8), [prompt], params)
    assert spec == plain and [len(t) for t in spec[0]] == [6, 6]
