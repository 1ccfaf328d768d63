"""The server through the official openai client: results equal llmkern.LLM's and transformers' greedy output,
streaming pieces make the same text, usage, n, logprobs, and errors as the client's exception classes."""

from __future__ import annotations

import concurrent.futures
import math

import httpx
import openai
import pytest
import torch
from serve_refs import SERVED_NAME, StepGate, ThreadServer, idle, wait_until

from llmkern import LLM, SamplingParams

PROMPT = "def fibonacci(n):\n    if n < 2:"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
NO_EOS = {"ignore_eos": True}  # vLLM's extra field: fixed lengths whatever the random model says


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint[1], dtype=torch.float32)


def test_greedy_completion_equals_llm_and_transformers(client, llm, tiny_checkpoint):
    r = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=24, temperature=0, extra_body=NO_EOS)
    ref = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == SERVED_NAME
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == ref.num_prompt_tokens and r.usage.completion_tokens == 24
    assert r.usage.total_tokens == ref.num_prompt_tokens + 24
    # transformers' greedy, one full forward per token (its cached generate() drifts from its own forward on
    # this random model and long-context rope; the forward is the reference).
    ids = ref.prompt_token_ids
    seq = list(ids)
    with torch.no_grad():
        for _ in range(24):
            seq.append(int(tiny_checkpoint[0](torch.tensor([seq])).logits[0, -1].argmax()))
    assert ref.token_ids == seq[len(ids):]
    # The same prompt as token ids gives the same completion.
    by_ids = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=24, temperature=0, extra_body=NO_EOS)
    assert by_ids.choices[0].text == ref.text


def test_streamed_pieces_make_the_completion(client):
    kwargs = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=20, temperature=0, extra_body=NO_EOS)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 2 and all(c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_equals_llm_on_the_template(client, llm):
    r = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=8, temperature=0,
                                       extra_body=NO_EOS)
    ids = llm.tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    ref = llm.generate(None, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                       prompt_token_ids=[ids])[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens == len(ids)
    # max_tokens unset: the room the model length leaves (vLLM's default for chat).
    rest = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, temperature=0, extra_body=NO_EOS)
    assert rest.usage.completion_tokens == llm.max_model_len - len(ids)
    assert rest.choices[0].message.content.startswith(ref.text)


def test_chat_stream_role_first_then_content_then_usage(client):
    kwargs = dict(model=SERVED_NAME, messages=MESSAGES, max_tokens=10, temperature=0,
                  extra_body=NO_EOS)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_n_and_several_prompts_are_prompt_major(client):
    r = client.completions.create(model=SERVED_NAME, prompt=["Hello", PROMPT], n=2, max_tokens=6, temperature=0,
                                  extra_body=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model=SERVED_NAME, prompt=p, max_tokens=6, temperature=0,
                                       extra_body=NO_EOS).choices[0].text for p in ("Hello", PROMPT)]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]  # greedy: samples agree
    assert r.usage.completion_tokens == 24
    sampled = client.completions.create(model=SERVED_NAME, prompt=PROMPT, n=2, max_tokens=6, seed=3,
                                        extra_body=NO_EOS)
    assert len(sampled.choices) == 2 and all(c.finish_reason == "length" for c in sampled.choices)


def test_completion_logprobs(client, llm):
    r = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body=NO_EOS)
    lp = r.choices[0].logprobs
    ref = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3))[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text  # single-token pieces of ASCII-ish text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for got, want, top in zip(lp.token_logprobs, ref.logprobs, lp.top_logprobs):
        assert math.isclose(got, want.logprob, rel_tol=1e-4, abs_tol=1e-4)
        # Up to 3 + the sampled token (fewer when tokens decode alike); greedy: the sampled one is the top one.
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(got, abs=1e-4)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body=NO_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode())
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-4)


def test_errors_are_the_clients_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=SERVED_NAME, prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=500)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=2).choices[0].text is not None
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]


def test_api_key_is_required_when_set(tiny_checkpoint):
    server = ThreadServer(tiny_checkpoint[1], api_key="sk-test")
    try:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(server.url + "/v1/models").status_code == 401  # no key at all
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200  # open to load balancers
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)
        assert good.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=2).choices
    finally:
        server.close()


def test_full_waiting_queue_gives_429(tiny_checkpoint):
    server = ThreadServer(tiny_checkpoint[1], {"max_waiting": 1})
    gate = StepGate(server.aengine.engine)  # no step runs: the first request stays waiting
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    try:
        waiting = client.completions.create(model=SERVED_NAME, prompt="Hello", max_tokens=5, temperature=0,
                                            stream=True, extra_body=NO_EOS)  # headers sent: it is queued
        with pytest.raises(openai.RateLimitError, match="busy"):
            client.completions.create(model=SERVED_NAME, prompt="Hello", max_tokens=2)
        gate.allow(None)
        chunks = list(waiting)
        assert chunks[-1].choices[0].finish_reason == "length"
        wait_until(lambda: idle(server.aengine), what="the engine to be idle")
        assert client.completions.create(model=SERVED_NAME, prompt="Hello", max_tokens=2).choices
        # A request's prompts are admitted together: more than the queue holds is a 400, never a 429 to retry.
        with pytest.raises(openai.BadRequestError, match="2 prompts in one request exceed the server's waiting"):
            client.completions.create(model=SERVED_NAME, prompt=["Hello", "Hi"], max_tokens=2)
        assert idle(server.aengine)
    finally:
        gate.close()
        server.close()


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_speculating_server_gives_the_same_greedy_text_and_reports_acceptance(tiny_checkpoint, client, speculative):
    """A server that speculates (n-gram, or a draft equal to the target: acceptance 1.0) streams the same greedy
    completions as the plain one, several requests at once, and exports the speculative counters."""
    config = {"speculative": speculative, "num_speculative_tokens": 3}
    if speculative == "draft":
        config["draft_model"] = str(tiny_checkpoint[1])
    server = ThreadServer(tiny_checkpoint[1], config)
    try:
        spec_client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        prompts = [PROMPT, "a b a b a b a b", "import os\nimport sys\nimport os\n"]

        def complete(c, prompt):
            return c.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=20, temperature=0,
                                        extra_body=NO_EOS).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            spec = list(pool.map(lambda p: complete(spec_client, p), prompts))
        assert spec == [complete(client, p) for p in prompts]
        metrics = httpx.get(server.url + "/metrics").text
        drafted = accepted = None
        for line in metrics.splitlines():
            if line.startswith("llmkern:spec_decode_num_draft_tokens_total"):
                drafted = float(line.split()[-1])
            if line.startswith("llmkern:spec_decode_num_accepted_tokens_total"):
                accepted = float(line.split()[-1])
        assert drafted and drafted > 0 and accepted is not None
        if speculative == "draft":
            assert accepted == drafted
    finally:
        server.close()
