"""TextChunks: streamed text chunks rendered from their parts equal the pydantic models' dumps."""

import random

import pytest

from llmkern.serve.protocol import (ChatChunkChoice, ChatCompletionChunk, Completion, CompletionChoice, Delta,
                                    TextChunks)


def completion_dump(model: str = "demo-target"):
    def dump(k, text, reason):  # as api.create_completion's stream
        choice = CompletionChoice(index=k, text=text, finish_reason=reason)
        return Completion(id="cmpl-3f2a", created=1764530000, model=model, choices=[choice]).model_dump_json()
    return dump


def chat_dump(k, text, reason):  # as api.create_chat_completion's stream (exclude_unset)
    choice = ChatChunkChoice(index=k, delta=Delta(content=text), logprobs=None, finish_reason=reason)
    return ChatCompletionChunk(id="chatcmpl-9c", object="chat.completion.chunk", created=17, model="m",
                               choices=[choice]).model_dump_json(exclude_unset=True)


def texts(seed: int):
    """Every code point but the surrogates once, then random strings over the whole range."""
    every = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    yield "".join(every)
    rng = random.Random(seed)
    for n in (0, 1, 2, 7, 40):
        yield "".join(rng.choice(every) for _ in range(n))
    yield from ('"', "\\", "\n\t\r\b\f", "\x00\x1f\x7f", "\u2028\u2029", "\ue000\ue001", "😀 café")


@pytest.mark.parametrize("dump", [completion_dump(), chat_dump], ids=["completion", "chat"])
def test_text_chunks_render_what_the_models_dump(dump):
    chunks = TextChunks(dump)
    assert chunks.render != dump  # the parts, not the fallback
    for text in texts(0):
        for k in (0, 1, 9, 10, 123):
            for reason in (None, "stop", "length"):
                assert chunks.render(k, text, reason) == dump(k, text, reason)


def test_text_chunks_fall_back_to_the_dump_when_a_fixed_field_holds_a_sentinel():
    dump = completion_dump(model="\ue000")  # dumps as the text sentinel
    chunks = TextChunks(dump)
    assert chunks.render == dump
    assert chunks.render(3, "x", None) == dump(3, "x", None)
