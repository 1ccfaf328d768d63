"""llmkern's Tokenizer against transformers' loading the same checkpoint directory: encode, decode, special tokens."""

from __future__ import annotations

import json

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from llmkern.generation import Tokenizer

from tokenizer_refs import CORPUS, LLAMA3_SPECIAL, added_token_dict, train_byte_bpe, write_checkpoint

TEXTS = CORPUS + [
    "",
    " ",
    "unseen words: xylophone quizzically jackdaws",
    "mixed 😀日本🚀 text\u200bwith zero-width space and a \u00a0 non-breaking one",
    "special tokens inline: <|eot_id|> and <|im_start|>user",
    "class A:\n\tdef f(self): return {'k': [1, 2.5e-3, None]}\r\n",
    "🧑🏽‍🚀" * 5,
]


@pytest.fixture(params=["llama3", "chatml", "spm"])
def ckpt(request):
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ckpt, add_special_tokens):
    ours, ref = Tokenizer.from_pretrained(ckpt), PreTrainedTokenizerFast.from_pretrained(ckpt)
    for text in TEXTS:
        expected = ref.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, repr(text)
    assert ours.encode_batch(TEXTS, add_special_tokens) == [ref.encode(t, add_special_tokens=add_special_tokens) for t in TEXTS]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(ckpt, skip_special_tokens):
    ours, ref = Tokenizer.from_pretrained(ckpt), PreTrainedTokenizerFast.from_pretrained(ckpt)
    batch = [ref.encode(t) for t in TEXTS]
    for ids, text in zip(batch, TEXTS):
        got = ours.decode(ids, skip_special_tokens=skip_special_tokens)
        assert got == ref.decode(ids, skip_special_tokens=skip_special_tokens), repr(text)
    assert ours.decode_batch(batch, skip_special_tokens) == ref.batch_decode(batch, skip_special_tokens=skip_special_tokens)


def test_round_trip_is_lossless(ckpt):
    tok = Tokenizer.from_pretrained(ckpt)
    for text in TEXTS:
        if "<|" not in text:  # special tokens in the text are dropped by skip_special_tokens
            assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_llama3_adds_bos_from_post_processor(llama3_dir):
    tok = Tokenizer.from_pretrained(llama3_dir)
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.bos_token_id == bos and tok.encode("hi")[0] == bos
    assert bos not in tok.encode("hi", add_special_tokens=False)
    assert tok.eos_token == "<|eot_id|>" and tok.eos_token_id == tok.token_to_id("<|eot_id|>")


def test_special_tokens_match_transformers(ckpt):
    ours, ref = Tokenizer.from_pretrained(ckpt), PreTrainedTokenizerFast.from_pretrained(ckpt)
    assert ours.special_tokens == ref.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert len(ours) == len(ref)


def test_add_bos_token_used_when_tokenizer_json_has_no_post_processor(tmp_path):
    tok = train_byte_bpe(LLAMA3_SPECIAL)  # no post-processor
    d = write_checkpoint(tmp_path, tok, {"bos_token": added_token_dict("<|begin_of_text|>"), "eos_token": "<|eot_id|>",
                                         "add_bos_token": True, "add_eos_token": True})
    ours = Tokenizer.from_pretrained(d)
    plain = ours.encode("hello world", add_special_tokens=False)
    assert ours.encode("hello world") == [ours.bos_token_id, *plain, ours.eos_token_id]


def test_post_processor_wins_over_add_bos_token(tmp_path):
    """transformers 5 ignores add_bos_token when tokenizer.json has a post-processor; so does llmkern."""
    tok = train_byte_bpe(LLAMA3_SPECIAL)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    d = write_checkpoint(tmp_path, tok, {"bos_token": "<|begin_of_text|>", "add_bos_token": True})
    ref = PreTrainedTokenizerFast.from_pretrained(d)
    assert Tokenizer.from_pretrained(d).encode("hello world") == ref.encode("hello world")


def test_special_token_missing_from_vocab_is_added(tmp_path):
    tok = train_byte_bpe(LLAMA3_SPECIAL)
    d = write_checkpoint(tmp_path, tok, {"bos_token": "<|begin_of_text|>", "pad_token": "<|my_pad|>"})
    ours, ref = Tokenizer.from_pretrained(d), PreTrainedTokenizerFast.from_pretrained(d)
    assert ours.pad_token_id is not None and ours.pad_token_id == ref.pad_token_id
    assert ours.encode("a<|my_pad|>b", add_special_tokens=False) == ref.encode("a<|my_pad|>b", add_special_tokens=False)


def test_extra_special_tokens_list_is_added(tmp_path):
    tok = train_byte_bpe(LLAMA3_SPECIAL)
    d = write_checkpoint(tmp_path, tok, {"eos_token": "<|eot_id|>", "extra_special_tokens": ["<|tool|>", added_token_dict("<|img|>")]})
    ours, ref = Tokenizer.from_pretrained(d), PreTrainedTokenizerFast.from_pretrained(d)
    text = "x<|tool|>y<|img|>"
    assert ours.encode(text) == ref.encode(text) and len(ours.encode(text)) == 4
    assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True) == "xy"


def test_split_special_tokens(tmp_path):
    d = write_checkpoint(tmp_path, train_byte_bpe(LLAMA3_SPECIAL), {"eos_token": "<|eot_id|>", "split_special_tokens": True})
    ours, ref = Tokenizer.from_pretrained(d), PreTrainedTokenizerFast.from_pretrained(d)
    text = "a<|eot_id|>b"
    assert ours.encode(text) == ref.encode(text)
    assert ours.eos_token_id not in ours.encode(text)


def test_legacy_special_tokens_map(tmp_path):
    tok = train_byte_bpe(LLAMA3_SPECIAL)
    d = write_checkpoint(tmp_path, tok, {})
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": added_token_dict("<|eot_id|>")}))
    ours, ref = Tokenizer.from_pretrained(d), PreTrainedTokenizerFast.from_pretrained(d)
    assert ours.eos_token == ref.eos_token == "<|eot_id|>"


def test_missing_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_malformed_files_name_the_file(tmp_path, llama3_dir):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((llama3_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 7}))
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_pretrained(tmp_path)


def test_encode_rejects_non_strings(llama3_dir):
    tok = Tokenizer.from_pretrained(llama3_dir)
    with pytest.raises(TypeError, match="text"):
        tok.encode(["a list"])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode_batch(["ok", 3])
