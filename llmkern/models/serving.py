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

import itertools
from dataclasses import dataclass

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
    """The StepInput of a list of per-sequence chunks (the serving engine's scheduler output)."""
    if not chunks:
        raise ValueError("chunks: expected at least one sequence")
    ids, positions, slots, wanted, q_lens, k_lens = [], [], [], [], [], []
    for i, c in enumerate(chunks):
        end = c.start + len(c.tokens)
        if len(c.block_table) * block_size < end:
            raise ValueError(f"chunks[{i}].block_table: {len(c.block_table)} blocks of {block_size} hold fewer "
                             f"than the {end} tokens the sequence reaches")
        pos = range(c.start, end)
        ids += c.tokens
        positions += pos
        slots += [c.block_table[p // block_size] * block_size + p % block_size for p in pos]
        wanted += range(len(ids) - c.num_logits, len(ids))
        q_lens.append(len(c.tokens))
        k_lens.append(end)
    max_blocks = max(len(c.block_table) for c in chunks)
    tables = [b for c in chunks for b in (c.block_table + [0] * (max_blocks - len(c.block_table)))]
    # Two tensors split into views, not seven tensors: each torch.tensor call costs ~3 us (a batch-1 decode step's
    # inputs: 27 -> 22 us) and, on CUDA, a host-to-device copy.
    t, b, n = len(ids), len(chunks), len(wanted)
    longs = torch.tensor(ids + positions + slots + wanted, dtype=torch.int64, device=device).split([t, t, t, n])
    ints = torch.tensor([*itertools.accumulate(q_lens, initial=0), *itertools.accumulate(k_lens, initial=0), *tables],
                        dtype=torch.int32, device=device).split([b + 1, b + 1, b * max_blocks])
    attn = AttentionInput(ints[0], ints[1], max(q_lens), max(k_lens), ints[2].view(b, max_blocks), longs[2])
    return StepInput(longs[0], longs[1], attn, longs[3])
