"""Serving-mode inputs: the paged KV cache and the step over ragged sequences (vLLM's contract).

A step packs the new tokens of B sequences, each either a chunk of its prompt (prefill) or one token
(decode), sequence after sequence. Each layer writes the new keys and values into its paged cache at
slot_mapping, then every query attends (causally, bottom-right aligned) to its sequence's keys through
the block table: the last cu_seqlens_k-count keys of a sequence end with its new tokens.

KV cache layout (one (k_cache, v_cache) pair per layer), flash-attn's paged layout:
    k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]  in the model's dtype
    token p of a sequence lives in block block_table[p // block_size], row p % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from llmkern.memory import empty_on_huge_pages
from llmkern.models.config import ModelConfig
from llmkern.models.llama import AttentionInput


@dataclass
class StepInput:
    """One serving step. Shape legend: T new tokens in all, B sequences, N wanted logits.

    input_ids       int64 [T]      new tokens, sequence after sequence
    positions       int64 [T]      position of each new token in its sequence
    attn            AttentionInput cu_seqlens_q [B + 1] (offsets into T), cu_seqlens_k [B + 1] (cumulative
                                   cached + new key counts), block_tables int32 [B, max_blocks],
                                   slot_mapping int64 [T]
    logits_indices  int64 [N]      rows of T whose logits step() returns (usually each sequence's last)
    """

    input_ids: Tensor
    positions: Tensor
    attn: AttentionInput
    logits_indices: Tensor


@dataclass
class SequenceChunk:
    """One sequence's part of a step: `tokens` at positions start .. start + len - 1 (start = tokens
    already in its cache), its block table (block ids, enough for start + len tokens), and how many of its
    last tokens' logits the step returns (1: the next token's; 0: a prompt chunk before the last; k + 1: a
    speculative verification of k draft tokens)."""

    tokens: list[int]
    start: int
    block_table: list[int]
    num_logits: int = 1

    def __post_init__(self):
        if not self.tokens:
            raise ValueError("SequenceChunk.tokens: expected at least one token")
        if self.start < 0:
            raise ValueError(f"SequenceChunk.start: expected >= 0, got {self.start}")
        if not 0 <= self.num_logits <= len(self.tokens):
            raise ValueError(f"SequenceChunk.num_logits: expected 0..{len(self.tokens)} (its tokens), "
                             f"got {self.num_logits}")


def kv_block_bytes(model, block_size: int) -> int:
    """Bytes of one KV-cache block over all layers (keys and values) in the model's dtype."""
    c = model.config
    itemsize = model.model.embed_tokens.weight.element_size()
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * itemsize


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: str | torch.device = "cpu") -> list[tuple[Tensor, Tensor]]:
    """One (k_cache, v_cache) per layer, each [num_blocks, block_size, num_kv_heads, head_dim], uninitialized:
    attention reads only the slots a step has written, and on the CPU a large cache's pages are then committed
    as its blocks are first used rather than all at startup. CPU caches are advised for transparent huge pages
    (llmkern.memory: random block reads then miss the TLB far less)."""
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks, block_size: expected positive ints, got {num_blocks}, {block_size}")
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    cpu = torch.device(device).type == "cpu"

    def new() -> Tensor:
        return empty_on_huge_pages(shape, dtype) if cpu else torch.empty(shape, dtype=dtype, device=device)

    return [(new(), new()) for _ in range(config.num_layers)]


def build_step_input(chunks: list[SequenceChunk], block_size: int, device: str | torch.device = "cpu") -> StepInput:
    """The StepInput of a list of per-sequence chunks (the serving engine's scheduler output).

    Built in plain Python lists and numpy, one array per integer type, the tensors views of them: this runs
    before every model step (and every draft step), right after the last step's weights went through the caches.
    The older form (a range for each decode, `torch.tensor` of lists, `split`) took 76 / 30 / 229 us for 16 decodes /
    one decode / 3 prompts of 128 tokens and 13 decodes, against 34 / 17 / 107 us here (one process, in turn)."""
    if not chunks:
        raise ValueError("chunks: expected at least one sequence")
    ids, positions, slots, wanted, cu_q, cu_k = [], [], [], [], [0], [0]
    q = k = max_q = max_k = max_blocks = 0
    for i, c in enumerate(chunks):
        tokens, start, table = c.tokens, c.start, c.block_table
        n, blocks = len(tokens), len(table)
        end = start + n
        if blocks * block_size < end:
            raise ValueError(f"chunks[{i}].block_table: {blocks} blocks of {block_size} hold fewer "
                             f"than the {end} tokens the sequence reaches")
        ids += tokens
        if n == 1:  # a decode
            positions.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            pos = range(start, end)
            positions += pos
            slots += [table[p // block_size] * block_size + p % block_size for p in pos]
        q += n
        k += end
        cu_q.append(q)
        cu_k.append(k)
        if c.num_logits == 1:
            wanted.append(q - 1)
        elif c.num_logits:
            wanted += range(q - c.num_logits, q)
        if n > max_q:  # not max(): 7 us of 16 decodes' 41
            max_q = n
        if end > max_k:
            max_k = end
        if blocks > max_blocks:
            max_blocks = blocks
    b = len(chunks)
    tables = np.zeros((b, max_blocks), dtype=np.int32)
    for j, c in enumerate(chunks):
        tables[j, : len(c.block_table)] = c.block_table
    longs = torch.from_numpy(np.array(ids + positions + slots + wanted, dtype=np.int64))
    ints = torch.from_numpy(np.array(cu_q + cu_k, dtype=np.int32))
    block_tables = torch.from_numpy(tables)
    if torch.device(device).type != "cpu":
        longs, ints, block_tables = longs.to(device), ints.to(device), block_tables.to(device)
    attn = AttentionInput(ints[: b + 1], ints[b + 1 :], max_q, max_k, block_tables, longs[2 * q : 3 * q])
    return StepInput(longs[:q], longs[q : 2 * q], attn, longs[3 * q :])
