"""Corpus split, tokenizer and packed batches of llmkern.train.data."""

import numpy as np
import pytest
import torch

from llmkern.generation import Tokenizer
from llmkern.train.data import (BOS, EOS, PackedStream, _cu_seqlens, encode_documents, read_texts, save_tokenizer,
                                split_files, stdlib_files, train_tokenizer, unigram_loss)


def test_stdlib_corpus_is_sorted_and_split_by_file():
    files = stdlib_files()
    assert files == sorted(files) and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    train, val = split_files(files[:100], val_every=10)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    with pytest.raises(ValueError, match="val_every"):
        split_files(files, 1)


def test_cu_seqlens_cut_at_document_starts_and_every_seq_len():
    # documents start at 0, 5 and 20 in 30 tokens; pieces at most 8 long
    assert _cu_seqlens([5, 20], 30, 8).tolist() == [0, 5, 13, 20, 28, 30]
    assert _cu_seqlens([], 16, 8).tolist() == [0, 8, 16]


def _docs(lengths, seed=0):
    g = np.random.default_rng(seed)
    return [np.concatenate([[1], g.integers(3, 50, n - 2), [2]]).astype(np.int32) for n in lengths]


def test_packed_stream_is_a_function_of_its_position():
    docs = _docs([7, 30, 3, 12, 25])  # 77 tokens per epoch
    a = PackedStream(docs, micro_batch_tokens=20, seq_len=9, seed=3)
    batches = [next(a) for _ in range(9)]  # crosses two epoch boundaries
    b = PackedStream(docs, micro_batch_tokens=20, seq_len=9, seed=3)
    b.position = 4 * 20  # a restart from a checkpoint
    for want in batches[4:]:
        got = next(b)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.cu_seqlens, want.cu_seqlens)
    for batch in batches:
        ids, cu = batch.input_ids[0], batch.cu_seqlens
        assert cu[0] == 0 and cu[-1] == ids.numel() == 20 and (cu.diff() > 0).all() and (cu.diff() <= 9).all()
        starts = set(torch.nonzero(ids == 1).flatten().tolist())  # every BOS begins a piece
        assert starts <= set(cu.tolist())
        assert batch.num_targets == 20 - (cu.numel() - 1)
    epoch0 = torch.cat([b.input_ids[0] for b in batches])[:77]
    assert sorted(epoch0.tolist()) == sorted(np.concatenate(docs).tolist())  # each epoch reads every token once


def test_tokenizer_round_trips_and_adds_bos(tmp_path):
    texts = read_texts(stdlib_files()[:20])
    tok = train_tokenizer(texts, vocab_size=400)
    save_tokenizer(tok, tmp_path, model_max_length=128)
    loaded = Tokenizer.from_pretrained(tmp_path)  # llmkern's loader of Hugging Face tokenizer files
    assert loaded.bos_token == BOS and loaded.eos_token == EOS and loaded.pad_token_id == 0
    text = "def f(x):\n    return x ** 2  # ünïcode\n"
    ids = loaded.encode(text)
    assert ids[0] == loaded.bos_token_id and loaded.decode(ids) == text
    doc = encode_documents(tok, [text])[0]
    assert doc[0] == loaded.bos_token_id and doc[-1] == loaded.eos_token_id and len(doc) == len(ids) + 1


def test_unigram_loss_is_the_cross_entropy_of_smoothed_frequencies():
    docs = _docs([10, 14])
    batch = next(PackedStream(docs, micro_batch_tokens=24, seq_len=24, seed=0, shuffle=False))
    counts = np.bincount(np.concatenate(docs), minlength=60) + 1.0
    p = counts / counts.sum()
    targets = np.concatenate([docs[0][1:], docs[1][1:]])  # each document's tokens after its first
    assert unigram_loss(docs, [batch], 60) == pytest.approx(-np.log(p[targets]).mean(), rel=1e-12)
