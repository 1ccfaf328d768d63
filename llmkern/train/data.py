"""Pretraining data: the Python standard library as a corpus, a byte-level BPE tokenizer, packed batches.

The corpus is what every machine has offline: the `.py` files under the running interpreter's `Lib/` (site-packages
excluded), read in sorted order and split into train and validation by file. Documents are `<|bos|> text <|eos|>`;
each epoch concatenates them in a seeded shuffled order into one token stream, and a micro-batch is the next
`micro_batch_tokens` of that stream, packed varlen: it is cut at every document start and every `seq_len` tokens,
and the cuts become `cu_seqlens` (each piece attends only to itself, as in flash-attn's varlen training).
"""

from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmkern.models.llama import shifted_targets

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The interpreter's standard-library `.py` files (or those under `root`), sorted for a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    if not files:
        raise FileNotFoundError(f"corpus: no .py files under {root}")
    return files


def split_files(files: list[Path], val_every: int) -> tuple[list[Path], list[Path]]:
    """Every `val_every`-th file (from the middle of each run of `val_every`) is held out for validation."""
    if val_every < 2:
        raise ValueError(f"val_every: expected >= 2, got {val_every}")
    val = [f for i, f in enumerate(files) if i % val_every == val_every // 2]
    train = [f for i, f in enumerate(files) if i % val_every != val_every // 2]
    return train, val


def read_texts(files: list[Path]) -> list[str]:
    # A few stdlib files are latin-1 test data; replacement characters keep them as (mostly) code.
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's pre-tokenizer and alphabet: any text encodes, nothing is unknown) with the pad,
    BOS and EOS special tokens at ids 0-2; encoding prepends BOS, as Llama's tokenizers do."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


# The demo models write Python, so a conversation becomes a Python file: system and user messages are comment
# lines, assistant messages are code, and the reply continues the file (chat requests to `llmkern serve` work).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}\n"
    "{% else %}{% for line in m['content'].split('\n') %}# {{ line }}\n{% endfor %}{% endif %}{% endfor %}"
)


def save_tokenizer(tok: Tokenizer, directory: str | Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json, as transformers' PreTrainedTokenizerFast.save_pretrained writes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text as int32 token ids `<|bos|> ... <|eos|>` (the tokenizer's post-processor adds the BOS)."""
    eos = tok.token_to_id(EOS)
    return [np.array(e.ids + [eos], dtype=np.int32) for e in tok.encode_batch(texts)]


@dataclass
class Batch:
    """One packed micro-batch. input_ids [1, T] int64, cu_seqlens int32 [pieces + 1]; the model scores token i
    against token i + 1 within each piece, so a piece of n tokens has n - 1 targets."""

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def num_targets(self) -> int:
        return self.input_ids.shape[1] - (self.cu_seqlens.numel() - 1)

    def targets(self) -> torch.Tensor:
        """The token each position is scored against [T] (-100 at each piece's last token), as the model scores."""
        return shifted_targets(self.input_ids, tuple(self.input_ids.shape), self.cu_seqlens)


class PackedStream:
    """Micro-batches from documents at a token position that survives a restart (`position`): the stream of epoch
    e is the documents shuffled with Random(seed + e), so position p alone fixes what comes next."""

    def __init__(self, documents: list[np.ndarray], micro_batch_tokens: int, seq_len: int, seed: int,
                 shuffle: bool = True):
        if not documents:
            raise ValueError("PackedStream: no documents")
        self.documents, self.tokens, self.seq_len = documents, micro_batch_tokens, seq_len
        self.seed, self.shuffle = seed, shuffle
        self.epoch_tokens = sum(len(d) for d in documents)
        self.position = 0
        self._epoch, self._stream, self._starts = -1, None, None

    def _load_epoch(self, epoch: int) -> None:
        order = list(range(len(self.documents)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        docs = [self.documents[i] for i in order]
        self._stream = np.concatenate(docs)
        self._starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
        self._epoch = epoch

    def _take(self, start: int, n: int) -> tuple[np.ndarray, list[int]]:
        """n tokens from global position `start` (crossing into the next epoch if needed) and where documents
        start within them."""
        ids, cuts = [], []
        while n > 0:
            epoch, offset = divmod(start, self.epoch_tokens)
            if epoch != self._epoch:
                self._load_epoch(epoch)
            piece = self._stream[offset:offset + n]
            lo, hi = np.searchsorted(self._starts, [offset, offset + len(piece)])
            cuts += [int(s) - offset + sum(len(p) for p in ids) for s in self._starts[lo:hi]]
            ids.append(piece)
            start, n = start + len(piece), n - len(piece)
        return np.concatenate(ids), cuts

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        ids, doc_starts = self._take(self.position, self.tokens)
        self.position += self.tokens
        return Batch(torch.from_numpy(ids.astype(np.int64))[None], _cu_seqlens(doc_starts, len(ids), self.seq_len))


def _cu_seqlens(doc_starts: list[int], total: int, seq_len: int) -> torch.Tensor:
    """Piece boundaries: 0, every document start, every seq_len tokens within a document, and total."""
    bounds = sorted({0, total, *doc_starts})
    cuts = [0]
    for lo, hi in zip(bounds, bounds[1:]):
        cuts += list(range(lo + seq_len, hi, seq_len)) + [hi]
    return torch.tensor(cuts, dtype=torch.int32)


def unigram_loss(train_documents: list[np.ndarray], batches: list[Batch], vocab_size: int) -> float:
    """The held-out loss (nats per target token) of a unigram model: each token's add-one-smoothed frequency in
    the training documents, whatever came before it. The floor a language model must clearly beat."""
    counts = np.bincount(np.concatenate(train_documents), minlength=vocab_size).astype(np.float64) + 1.0
    logp = torch.from_numpy(np.log(counts / counts.sum()))
    total, n = 0.0, 0
    for b in batches:
        targets = b.targets()
        targets = targets[targets != -100]
        total -= float(logp[targets].sum())
        n += targets.numel()
    return total / n
