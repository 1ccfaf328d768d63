"""llmkern.LLM: batched generation over the serving step, against transformers' generate and itself."""

from __future__ import annotations

import pytest
import torch
from llm_refs import EOT, write_llama_checkpoint

from llmkern import LLM, SamplingParams
from llmkern.generation import GenerationConfig

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
    with pytest.raises(ValueError, match=r"prompts\[0\]: token ids must be in \[0, 640\)"):
        llm.generate(None, GREEDY, prompt_token_ids=[[1, 640]])
    with pytest.raises(ValueError, match="leave no room"):
        llm.generate(None, GREEDY, prompt_token_ids=[[1] * 128])
    with pytest.raises(ValueError, match="n > 1 and logprobs are not supported"):
        llm.generate("x", SamplingParams(n=2))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        LLM.from_model(llm.model).generate(None, SamplingParams(stop="x"), prompt_token_ids=[[1, 2]])
