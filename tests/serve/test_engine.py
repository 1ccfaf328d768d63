"""The serving engine (fp32 tiny Llama): continuous batching, chunked prefill, prefix caching, preemption, n > 1
and aborts all give the outputs of transformers' greedy generate and of each request alone."""

from __future__ import annotations

import copy

import pytest
import torch
from llm_refs import write_llama_checkpoint

from llmkern.generation import SamplingParams
from llmkern.serve.config import EngineConfig
from llmkern.serve.engine import Engine, QueueFullError, kv_block_bytes

BS = 4  # small blocks: sequences straddle several
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama_checkpoint(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 600, (13,), generator=g).tolist()  # a common prefix: prefix-cache hits
    lengths = (5, 17, 1, 40, 9)
    return [shared + torch.randint(3, 600, (n,), generator=g).tolist() for n in lengths] + [shared[:7]]


@pytest.fixture(scope="module")
def reference(checkpoint, prompts):
    """transformers' greedy continuation of each prompt."""
    hf, _ = checkpoint
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def make_engine(checkpoint, **overrides) -> Engine:
    return Engine.from_pretrained(checkpoint[1], EngineConfig(block_size=BS, **overrides))


def run(engine: Engine, prompts, params=GREEDY) -> dict[str, list[list[int]]]:
    """Every request to its end: request id -> each sample's tokens; checks the deltas' bookkeeping."""
    ids = [str(i) for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    tokens: dict[str, list[list[int]]] = {i: [[] for _ in range(params.n)] for i in ids}
    finished = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in finished
            for d in out.deltas:
                tokens[out.request_id][d.index] += d.token_ids
            if out.finished:
                finished.add(out.request_id)
    assert finished == set(ids)
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0  # every block freed
    return tokens


def test_concurrent_greedy_equals_transformers_and_each_alone(checkpoint, prompts, reference):
    engine = make_engine(checkpoint)
    together = run(engine, prompts)
    assert [together[str(i)][0] for i in range(len(prompts))] == reference
    alone = make_engine(checkpoint, enable_prefix_caching=False)
    for i, p in enumerate(prompts[:3]):
        assert run(alone, [p])["0"][0] == reference[i]


def test_chunked_prefill_mixed_with_decodes(checkpoint, prompts, reference):
    engine = make_engine(checkpoint, max_num_batched_tokens=7, max_num_seqs=3)
    out = run(engine, prompts)
    assert [out[str(i)][0] for i in range(len(prompts))] == reference


def test_prefix_caching_on_and_off_agree_and_hits_are_counted(checkpoint, prompts, reference):
    on = make_engine(checkpoint)
    run(on, prompts[:1])
    out = run(on, prompts[1:])  # the shared 13-token prefix: 3 full blocks of 4 found
    assert [out[str(i)][0] for i in range(len(prompts) - 1)] == reference[1:]
    stats = on.stats()
    assert stats.prefix_cache_queries == sum(map(len, prompts))
    assert stats.prefix_cache_hits >= 12 * 4  # 4 of the later prompts are longer than the shared prefix
    off = make_engine(checkpoint, enable_prefix_caching=False)
    assert [v[0] for v in run(off, prompts).values()] == reference
    assert off.stats().prefix_cache_hits == 0


def test_preemption_under_a_tiny_kv_budget_completes_everything(checkpoint, prompts, reference):
    engine = make_engine(checkpoint)
    per_block = kv_block_bytes(engine.model, BS)
    need = -(-engine.max_model_len // BS)
    tiny = make_engine(checkpoint, kv_cache_memory=need * per_block + 5 * per_block)
    out = run(tiny, prompts)
    assert [out[str(i)][0] for i in range(len(prompts))] == reference
    assert tiny.stats().num_preemptions > 0


def test_kv_budget_below_one_full_length_sequence(checkpoint):
    """An asked-for max_model_len the budget cannot hold is refused; without one, the engine serves what fits."""
    engine = make_engine(checkpoint)
    per_block = kv_block_bytes(engine.model, BS)
    with pytest.raises(ValueError, match=r"max_model_len 64 needs 16 KV-cache blocks.*holds 15"):
        make_engine(checkpoint, max_model_len=64, kv_cache_memory=15 * per_block)
    capped = make_engine(checkpoint, kv_cache_memory=15 * per_block)
    assert capped.max_model_len == 15 * BS < engine.max_model_len
    with pytest.raises(ValueError, match=r"maximum context length is 60 tokens"):
        capped.add_request("x", [5] * 50, SamplingParams(max_tokens=11))
    assert run(capped, [[5] * 50], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))["0"][0]
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        make_engine(checkpoint, max_model_len=10**6)


def test_n_samples_share_the_prompt_and_copy_on_write(checkpoint, prompts, reference):
    engine = make_engine(checkpoint)
    greedy = run(engine, prompts[:2], SamplingParams(n=3, temperature=0.0, max_tokens=24, ignore_eos=True))
    assert greedy["0"] == [reference[0]] * 3 and greedy["1"] == [reference[1]] * 3
    seeded = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    a, b = run(engine, prompts[3:4], seeded)["0"], run(engine, prompts[3:4], seeded)["0"]
    assert a == b and len({tuple(t) for t in a}) > 1  # reproducible, and the samples differ
    first = run(engine, prompts[3:4], SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))
    assert first["0"][0] == a[0]  # sample 0 of n is the n = 1 request with the same seed


def test_abort_frees_blocks_and_ends_the_request(checkpoint, prompts):
    engine = make_engine(checkpoint)
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    engine.step()
    engine.abort_request("a")
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert aborted[0].finished and aborted[0].deltas[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        assert all(o.request_id == "b" for o in engine.step())
    assert engine.stats().kv_cache_usage == 0.0
    engine.abort_request("b")  # finished already: ignored
    assert not engine.has_unfinished_requests()
    # n samples aborted in their prompt's prefill (before the other n - 1 fork from the first): each one ends.
    engine = make_engine(checkpoint, max_num_batched_tokens=4)
    engine.add_request("n", prompts[1], SamplingParams(n=3, max_tokens=4))
    engine.step()
    engine.abort_request("n")
    deltas = [d for o in engine.step() for d in o.deltas]
    assert sorted((d.index, d.finish_reason) for d in deltas) == [(0, "abort"), (1, "abort"), (2, "abort")]


def test_stop_conditions_and_logprobs(checkpoint, prompts, reference):
    engine = make_engine(checkpoint)
    stop_token = reference[0][5]
    engine.add_request("s", prompts[0], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_token],
                                                       logprobs=2))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [d for o in engine.step() for d in o.deltas]
    tokens = [t for d in deltas for t in d.token_ids]
    assert tokens == reference[0][: reference[0].index(stop_token) + 1]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop_token
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in logprobs] == tokens and all(lp.rank == 1 for lp in logprobs)
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in logprobs)


def test_bad_requests_raise_and_the_queue_is_bounded(checkpoint, prompts):
    engine = make_engine(checkpoint, max_waiting=2)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("x", [], GREEDY)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 640\)"):
        engine.add_request("x", [640], GREEDY)
    limit = engine.max_model_len
    with pytest.raises(ValueError, match=rf"maximum context length is {limit} tokens.*{limit + 1} tokens \(10 in the "
                                         rf"prompt, {limit - 9} for the completion\)"):
        engine.add_request("x", [5] * 10, SamplingParams(max_tokens=limit - 9))
    engine.add_request("a", prompts[0], GREEDY)
    with pytest.raises(ValueError, match="already running"):
        engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[0], GREEDY)
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        engine.add_request("c", prompts[0], GREEDY)
    engine.step()  # both admitted: room again
    engine.add_request("c", prompts[0], GREEDY)


@pytest.fixture(scope="module")
def hf64(checkpoint):
    """The transformers model in float64 on the CPU: the judge of every device's greedy tokens."""
    return copy.deepcopy(checkpoint[0]).to(torch.float64)


@pytest.mark.parametrize("overrides", [{}, {"max_num_batched_tokens": 7, "max_num_seqs": 3},
                                       {"speculative": "ngram"}], ids=["batched", "chunked", "ngram"])
def test_greedy_tokens_on_each_device_are_the_models_argmax(checkpoint, hf64, prompts, torch_device, overrides):
    """The engine on the device (its KV cache sized from the device's free memory, the paged kernels, prefix
    hits): each greedy token is the float64 model's argmax on the engine's own sequence, up to near-ties
    (fp32 on another device may break a tie the other way, after which the sequences rightly differ)."""
    engine = Engine.from_pretrained(checkpoint[1], EngineConfig(block_size=BS, **overrides),
                                    device=torch_device)
    assert all(t.device.type == torch_device for t in engine.kv_caches[0])
    out = run(engine, prompts)
    for i, prompt in enumerate(prompts):
        tokens = out[str(i)][0]
        with torch.no_grad():
            logits = hf64(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (logits.max(1).values - chosen).max() < 1e-3, f"prompt {i}: a greedy token is not the argmax"
    seeded = SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)
    a, b = run(engine, prompts[3:4], seeded)["0"], run(engine, prompts[3:4], seeded)["0"]
    assert a == b and a[0] != a[1]  # seeded sampling with the device's generator: reproducible, samples differ


def test_on_model_start_runs_once_a_step_before_the_model(checkpoint, prompts):
    engine = make_engine(checkpoint)
    events = []
    real_model_step = engine.model.step

    def model_step(*args, **kwargs):
        events.append("model")
        return real_model_step(*args, **kwargs)

    engine.model.step = model_step
    assert engine.step(on_model_start=lambda: events.append("start")) == [] and events == []  # nothing scheduled
    engine.add_request("a", prompts[0], GREEDY)
    while engine.has_unfinished_requests():
        engine.step(on_model_start=lambda: events.append("start"))
    assert events == ["start", "model"] * (len(events) // 2) and len(events) >= 2 * GREEDY.max_tokens
