"""llmkern.LLM: batched generation over the serving step, against transformers' generate and itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from llm_refs import EOT, write_llama_checkpoint

from llmkern import LLM, SamplingParams
from llmkern.generation import GenerationConfig
from llmkern.llm import sample_seeds

PROMPTS = ["The quick brown fox", "def fibonacci(n):\n    if n < 2:", "Hello"]  # different lengths
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama_checkpoint(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint[1], block_size=4)  # small blocks: sequences straddle several


def test_greedy_32_tokens_equal_transformers_generate(checkpoint, llm):
    hf, _ = checkpoint
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    ids = llm.tokenizer.encode(PROMPTS[0])
    assert out.prompt_token_ids == ids and ids[0] == llm.tokenizer.bos_token_id
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):]
    assert out.token_ids == ref.tolist()
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "length" and out.num_generated_tokens == 32 and out.num_prompt_tokens == len(ids)
    assert out.prefill_s > 0 and out.decode_s > 0 and out.decode_tokens_per_s > 0


def test_batch_of_different_lengths_equals_each_alone(llm):
    batch = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, batch):
        alone = llm.generate(prompt, GREEDY)[0]
        assert out.token_ids == alone.token_ids and out.text == alone.text, prompt


def test_chunked_prefill_equals_whole_prompt(checkpoint, llm):
    chunked = LLM.from_model(llm.model, llm.tokenizer, llm.generation_config, block_size=3, max_prefill_tokens=4)
    whole = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == whole


def test_same_seed_same_output_alone_or_in_a_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    a = llm.generate(PROMPTS[0], seeded)[0]
    b = llm.generate(PROMPTS, [seeded, SamplingParams(temperature=1.0, max_tokens=8), seeded])
    assert b[0].token_ids == a.token_ids
    other = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, seed=8, max_tokens=16, ignore_eos=True))
    assert other[0].token_ids != a.token_ids  # the seed matters (equal 16-token draws are astronomically unlikely)
    assert llm.generate(PROMPTS[2], seeded)[0].token_ids == b[2].token_ids


def test_stop_string_ends_the_output_before_it(llm):
    full = llm.generate(PROMPTS[1], GREEDY)[0]
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a stop string in the middle of the output
    assert len(stop) == 3 and text.find(stop) > 0
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, stop=stop))[0]
    assert out.text == text[: text.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < 32


def test_max_tokens_and_eos_end_generation(llm):
    full = llm.generate(PROMPTS[0], GREEDY)[0]
    short = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert short.token_ids == full.token_ids[:5] and short.finish_reason == "length"
    # EOS from generation_config: make the 4th generated token the checkpoint's EOS.
    eos = full.token_ids[3]
    first = full.token_ids.index(eos)
    with_eos = LLM.from_model(llm.model, llm.tokenizer, GenerationConfig(eos_token_ids=(eos,)), block_size=4)
    out = with_eos.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=32))[0]
    assert out.token_ids == full.token_ids[: first + 1] and out.finish_reason == "stop" and out.stop_reason == eos
    assert llm.eos_token_ids == (llm.tokenizer.token_to_id(EOT),)


def test_model_length_ends_generation(llm):
    room = llm.max_model_len - 120
    out = llm.generate(None, GREEDY, prompt_token_ids=[list(range(1, 121))])[0]
    assert out.num_generated_tokens == room and out.finish_reason == "length"


def test_default_params_come_from_generation_config(llm):
    out = llm.generate(PROMPTS[0])[0]  # do_sample false: greedy; no max_new_tokens: 16
    assert out.token_ids == llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=16))[0].token_ids


def test_stream_and_callback_pieces_make_the_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    stream = llm.stream(PROMPTS[1], params)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.output.text
    assert stream.output.token_ids == llm.generate(PROMPTS[1], params)[0].token_ids
    got = {}
    outs = llm.generate(PROMPTS, params, on_text=lambda i, t: got.setdefault(i, []).append(t))
    assert ["".join(got.get(i, [])) for i in range(3)] == [o.text for o in outs]


def test_a_stream_left_early_frees_its_request(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    free = llm.engine.kv.num_free_blocks
    for _ in (stream := llm.stream(PROMPTS[1], params)):
        break
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.num_free_blocks == free
    assert stream.output is None  # it did not finish
    half = iter(llm.stream(PROMPTS[1], params))
    next(half)  # kept half-read: its request runs on until closed
    with pytest.raises(RuntimeError, match="a stream of this LLM is still open"):
        llm.generate(PROMPTS[1], params)
    half.close()
    assert len(llm.generate(PROMPTS[1], params)[0].token_ids) == 24


def test_chat_continues_the_final_message(llm):
    messages = [{"role": "user", "content": "Hello, world!"}, {"role": "assistant", "content": "Hello"}]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = llm.chat(messages, params, add_generation_prompt=False, continue_final_message=True)[0]
    want = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True,
                                             tokenize=True)
    assert out.prompt_token_ids == want
    assert want != llm.chat_token_ids(messages)[0]  # the default renders a new assistant turn


def test_chat_renders_the_template(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = llm.chat(messages, params, date_string="26 Jul 2024")[0]
    ids = llm.tokenizer.apply_chat_template(messages, tokenize=True, date_string="26 Jul 2024")
    assert out.prompt_token_ids == ids and ids.count(llm.tokenizer.bos_token_id) == 1
    assert out.token_ids == llm.generate(None, params, prompt_token_ids=[ids])[0].token_ids
    assert len(llm.chat([messages, messages[1:]], params)) == 2


def test_bad_inputs_raise_clear_errors(checkpoint, llm, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        LLM(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype"):
        LLM(checkpoint[1], dtype="float8")
    with pytest.raises(ValueError, match="quant"):
        LLM(checkpoint[1], quant="int3")
    with pytest.raises(ValueError, match="params: expected one SamplingParams or one per prompt"):
        llm.generate(PROMPTS, [GREEDY, GREEDY])
    with pytest.raises(ValueError, match=r"prompts\[0\]: prompt token ids must be in \[0, 640\)"):
        llm.generate(None, GREEDY, prompt_token_ids=[[1, 640]])
    with pytest.raises(ValueError, match="leaving no room"):
        llm.generate(None, GREEDY, prompt_token_ids=[[1] * 128])
    for bad in ([[5.9, 7.2]], [[True, 5]], [5, 7]):  # int() would take floats and bools for ids
        with pytest.raises(ValueError, match=r"prompt_token_ids\[0\]: expected a sequence of int token ids"):
            llm.generate(None, GREEDY, prompt_token_ids=bad)
    with pytest.raises(ValueError, match="stream: n > 1 gives several outputs"):
        llm.stream("x", SamplingParams(n=2))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        LLM.from_model(llm.model).generate(None, SamplingParams(stop="x"), prompt_token_ids=[[1, 2]])


def test_n_samples_share_the_prompt_and_equal_their_seeds_alone(llm):
    """n > 1: n outputs per prompt in a row, each equal to generating alone with its sample's seed (so the
    copied prompt KV blocks hold what a prefill writes); the first sample keeps the request's seed."""
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    outs = llm.generate(PROMPTS[:2], [params, dataclasses.replace(params, n=2, seed=12)])
    assert [(o.prompt_index, o.sample_index) for o in outs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    seeds = sample_seeds(params) + sample_seeds(dataclasses.replace(params, n=2, seed=12))
    assert seeds[0] == 11 and seeds[3] == 12 and len(set(seeds)) == 5
    for o, seed in zip(outs, seeds):
        alone = llm.generate(PROMPTS[o.prompt_index], dataclasses.replace(params, n=1, seed=seed))[0]
        assert o.token_ids == alone.token_ids and o.text == alone.text
        assert o.prompt_token_ids == alone.prompt_token_ids
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3  # three different draws
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], [params, dataclasses.replace(params, n=2, seed=12)])] \
        == [o.token_ids for o in outs]  # same seed, same n outputs
    # Samples that finish at their first token (freeing their blocks) still all get theirs.
    short = llm.generate(PROMPTS[0], dataclasses.replace(params, n=4, max_tokens=1))
    assert [o.token_ids for o in short] == [o.token_ids[:1] for o in outs[:3]] + [short[3].token_ids]


def _reference_logprobs(hf, out) -> torch.Tensor:
    """log_softmax of transformers' logits at each generated token's position [num_generated, vocab]."""
    ids = torch.tensor([out.prompt_token_ids + out.token_ids[:-1]])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(out.prompt_token_ids) - 1 :]
    return torch.log_softmax(logits, dim=-1), logits


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=1.5, top_k=20, repetition_penalty=1.2, seed=4, max_tokens=8, ignore_eos=True,
                   logprobs=5),
    SamplingParams(temperature=1.0, seed=2, max_tokens=4, ignore_eos=True, logprobs=0, n=2),
], ids=["greedy", "sampled", "n2-token-only"])  # fmt: skip
def test_logprobs_are_log_softmax_of_the_models_logits(checkpoint, llm, params):
    """Each generated token's logprob, rank and top logprobs: transformers' log_softmax of the raw logits
    (before penalties and warpers, vLLM's default). Tolerance derived from llmkern's float32 logits matching
    transformers' within 1e-4 relative (tests/models/test_llama.py): log_softmax moves an error of at most
    max|d logits| by at most twice that."""
    hf, _ = checkpoint
    outs = llm.generate(PROMPTS[0], params)
    assert len(outs) == params.n
    for out in outs:
        assert len(out.logprobs) == len(out.token_ids)
        ref, logits = _reference_logprobs(hf, out)
        tol = 2 * 1e-4 * logits.abs().max().item()
        for t, (lp, row) in enumerate(zip(out.logprobs, ref)):
            token = out.token_ids[t]
            assert lp.token_id == token
            assert abs(lp.logprob - row[token].item()) <= tol, t
            assert lp.rank == int((row > row[token]).sum()) + 1
            if params.greedy:
                assert lp.rank == 1
            top, top_ids = row.topk(params.logprobs)
            assert [i for i, _ in lp.top] == top_ids.tolist()
            assert max((abs(v - r) for (_, v), r in zip(lp.top, top.tolist())), default=0.0) <= tol
    assert llm.generate(PROMPTS[0], dataclasses.replace(params, logprobs=None))[0].logprobs is None
