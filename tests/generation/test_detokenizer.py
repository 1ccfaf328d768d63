"""Streaming detokenization: only complete text, and the pieces add up to the full decode."""

from __future__ import annotations

import pytest

from llmkern.generation import IncrementalDetokenizer, Tokenizer

from tokenizer_refs import CORPUS

TEXTS = CORPUS + ["🧑🏽‍🚀👩‍💻 🇫🇷🇯🇵 ∑∞ 日本語 naïve", "x = {'ключ': '值'}  # коммент"]


@pytest.fixture(params=["llama3", "chatml", "spm"])
def tok(request):
    return Tokenizer.from_pretrained(request.getfixturevalue(f"{request.param}_dir"))


def stream(tok, prompt_ids, ids, **kw):
    detok = IncrementalDetokenizer(tok, prompt_ids, **kw)
    pieces = [detok.add(t) for t in ids]
    return pieces, detok.flush()


def continuation(tok, prompt, ids):
    """The text `ids` add after the prompt. Byte-level BPE: decode(ids). SentencePiece-style decoders drop the
    leading space of a decode's first token, which a continuation keeps."""
    full, head = tok.decode(prompt + ids), tok.decode(prompt)
    assert full.startswith(head)
    return full[len(head):]


def test_pieces_concatenate_to_the_full_decode(tok):
    prompt = tok.encode("Once upon a time")
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        pieces, tail = stream(tok, prompt, ids)
        assert "".join(pieces) + tail == continuation(tok, prompt, ids)
        assert tail == ""  # the text ends on a whole character: nothing is left held back
        assert not any("\ufffd" in p for p in pieces)
        if tok.backend.decoder.__class__.__name__ == "ByteLevel":
            assert "".join(pieces) == tok.decode(ids) == text


def test_split_characters_are_held_until_complete(tok):
    ids = tok.encode("🧑🏽‍🚀", add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial, "the test needs an emoji split over byte-level tokens"
    pieces, _ = stream(tok, [], ids)
    # Each piece is emitted as soon as the text so far is whole: at the first token ending a whole character.
    decoded_so_far = [tok.decode(ids[: n + 1]) for n in range(len(ids))]
    for n, piece in enumerate(pieces):
        complete = not decoded_so_far[n].endswith("\ufffd")
        assert (piece != "") == (complete and decoded_so_far[n] != (decoded_so_far[n - 1] if n else ""))


def test_flush_returns_an_unfinished_character(tok):
    ids = tok.encode("ab😀", add_special_tokens=False)
    while not tok.decode(ids).endswith("\ufffd"):  # cut the emoji short
        ids = ids[:-1]
        assert ids, "no token boundary inside the emoji"
    pieces, tail = stream(tok, [], ids)
    assert "".join(pieces) == "ab"
    assert "".join(pieces) + tail == tok.decode(ids)


def test_special_tokens_skipped_or_kept(llama3_dir):
    tok = Tokenizer.from_pretrained(llama3_dir)
    ids = [*tok.encode("hello", add_special_tokens=False), tok.eos_token_id, *tok.encode(" world", add_special_tokens=False)]
    pieces, tail = stream(tok, [tok.bos_token_id], ids)
    assert "".join(pieces) + tail == "hello world" == tok.decode(ids)
    pieces, tail = stream(tok, [], ids, skip_special_tokens=False)
    assert "".join(pieces) + tail == "hello<|eot_id|> world" == tok.decode(ids, skip_special_tokens=False)


def test_generated_ids_are_recorded(tok):
    prompt, ids = tok.encode("p"), tok.encode("some text", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.add_many(ids) == continuation(tok, prompt, ids)
    assert detok.generated == ids
