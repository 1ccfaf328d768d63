"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step has a token budget (max_num_batched_tokens). Running sequences go first, in arrival order: a decoding
one needs 1 token (1 + its draft tokens when speculating), one in prefill the next chunk of its prompt. Then
waiting sequences are admitted first-come first-served while the budget, max_num_seqs and the KV cache allow;
a long prompt is prefilled in chunks over several steps, mixed with the others' decodes.

A sequence's tokens are its prompt then its output; num_computed of them have their keys and values in its
blocks. A step computes tokens[num_computed : num_computed + n]; when that reaches the end, its logits pick the
next token. The same rule prefills, chunks, decodes, and recomputes a preempted sequence: when a running
sequence finds no free block, the most recently arrived running sequence is preempted (its blocks freed, its
tokens kept) and goes back to the front of the waiting queue, to be recomputed when blocks free up. A lone
sequence always fits (the engine refuses a max_model_len the cache cannot hold), so every request completes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from llmkern.generation import OutputStream, SamplingParams
from llmkern.serve.config import EngineConfig
from llmkern.serve.kv_cache import KVCacheManager


@dataclass(eq=False)
class Request:
    """One API request: its prompt, its parameters and its params.n sequences (the first prefills the prompt,
    the others are forked from it when its prefill ends, sharing its blocks)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list["Sequence"] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    admitted: bool = False  # scheduled at least once

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.stream.finished for s in self.seqs)


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # sample index, 0..n-1
    stream: OutputStream
    generator: torch.Generator | None
    blocks: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its first full, computed blocks
    num_computed: int = 0
    draft_computed: int = 0  # tokens in the draft model's cache (speculative decoding with a draft model)
    logprobs: list | None = None
    prefill_s: float = 0.0  # time of the steps before its first token (they pick it)
    decode_s: float = 0.0  # time of the steps that decoded it afterwards (shared with the batch)

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def output_ids(self) -> list[int]:
        return self.stream.token_ids

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.stream.token_ids

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.stream.token_ids)

    def token_slice(self, start: int, end: int | None = None) -> list[int]:
        """tokens[start:end] without building the whole list (decode steps read one token of a long sequence)."""
        prompt, output = self.request.prompt_ids, self.stream.token_ids
        end = self.length if end is None else end
        if start >= len(prompt):
            return output[start - len(prompt) : end - len(prompt)]
        return prompt[start:end] + output[: max(0, end - len(prompt))]


@dataclass
class Scheduled:
    """A sequence's part of the next step: its tokens[num_computed : num_computed + num_tokens], plus up to
    `lookahead` draft tokens for which KV slots are reserved."""

    seq: Sequence
    num_tokens: int
    lookahead: int = 0

    @property
    def completes(self) -> bool:
        """The step reaches the sequence's last token, so its logits pick the next one."""
        return self.seq.num_computed + self.num_tokens == self.seq.length


@dataclass
class SchedulerOutput:
    scheduled: list[Scheduled]
    copies: list[tuple[int, int]]  # (source block, destination block): copy-on-write, applied before the step


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int):
        self.config, self.kv, self.max_model_len = config, kv, max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting_requests(self) -> int:
        """Waiting sequences: new requests and preempted sequences (the bound on new requests counts both)."""
        return len(self.waiting)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def lookahead(self, seq: Sequence) -> int:
        """Draft tokens a decoding sequence may propose: at most k, leaving room for the one token the
        verification adds, within max_tokens and the model's length."""
        k = self.config.lookahead
        if not k:
            return 0
        left = min(seq.request.params.max_tokens - len(seq.output_ids), self.max_model_len - seq.length)
        return max(0, min(k, left - 1))

    def _reserve(self, seq: Sequence, num_tokens: int, copies: list) -> bool:
        """Blocks (and a private copy of a shared block about to be written) for num_tokens more tokens."""
        new = self.kv.blocks_for(seq.num_computed + num_tokens) - len(seq.blocks)
        at = seq.num_computed // self.kv.block_size
        shared = at < len(seq.blocks) and self.kv.ref_count[seq.blocks[at]] > 1
        if not self.kv.can_allocate(max(new, 0) + shared):
            return False
        if shared:
            fresh = self.kv.copy_on_write(seq.blocks[at])
            copies.append((seq.blocks[at], fresh))
            seq.blocks[at] = fresh
        if new > 0:
            seq.blocks += self.kv.allocate(new)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.free(seq)
        seq.num_computed = seq.draft_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def free(self, seq: Sequence) -> None:
        self.kv.release(seq.blocks)
        seq.blocks, seq.block_keys = [], []

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled, copies, preempted = [], [], []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.length - seq.num_computed
            n = min(remaining, budget)
            # Only decoding sequences speculate (a prompt's last token picks the first one plainly: forks need it).
            extra = self.lookahead(seq) if remaining == 1 and seq.output_ids else 0
            extra = min(extra, budget - n)
            while not self._reserve(seq, n + extra, copies):
                victim = self.running.pop()
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(Scheduled(seq, n, extra))
                budget -= n + extra
                i += 1
                continue
            break
        if not preempted:
            self._admit(scheduled, budget)
        return SchedulerOutput(scheduled, copies)

    def _admit(self, scheduled: list[Scheduled], budget: int) -> None:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            request = seq.request
            # A request's other samples are forked from its first when its prefill ends: leave room for them.
            unforked = request.params.n - len(request.seqs)
            if len(self.running) + 1 + unforked > self.config.max_num_seqs:
                break
            hit_blocks, hit_keys = self.kv.find_prefix(seq.tokens)
            num_computed = len(hit_blocks) * self.kv.block_size
            n = min(seq.length - num_computed, budget)
            new = self.kv.blocks_for(num_computed + n) - len(hit_blocks)
            if not self.kv.can_allocate(new, hit_blocks):
                break
            self.waiting.popleft()
            self.kv.acquire(hit_blocks)
            seq.blocks = hit_blocks + self.kv.allocate(new)
            seq.block_keys, seq.num_computed = hit_keys, num_computed
            if not request.admitted:  # the hit rate counts each prompt once, not its recomputations
                request.admitted = True
                self.kv.record_prefix_lookup(seq.length, num_computed)
                request.num_cached_tokens = num_computed
            self.running.append(seq)
            scheduled.append(Scheduled(seq, n))
            budget -= n

    def commit(self, seq: Sequence) -> None:
        """After a step: release the blocks beyond the sequence's tokens (rejected draft tokens' slots) and make
        its newly full, computed blocks findable in the prefix cache."""
        keep = self.kv.blocks_for(seq.length)
        if len(seq.blocks) > keep:
            self.kv.release(seq.blocks[keep:])
            del seq.blocks[keep:]
        if self.kv.enable_prefix_caching:
            full = seq.num_computed // self.kv.block_size
            if full > len(seq.block_keys):
                seq.block_keys = self.kv.block_keys(seq.tokens, full, seq.block_keys)
                self.kv.cache_blocks(seq.blocks[:full], seq.block_keys)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free(seq)
