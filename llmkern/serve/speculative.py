"""Speculative decoding in the engine: the proposers and the verification of their drafts.

A decoding sequence whose scheduler reserved k lookahead slots gets a Draft of up to k tokens from the
proposer; the target model then computes its last token and the draft tokens in one step (the paged
multi-token attention path), and `verify` accepts a prefix of the draft plus one token of the target's
(llmkern.serve.spec_decode.rejection_sample: exact, so the output is distributed as without speculation). The
rejected tokens' KV slots are rolled back by the engine (num_computed stops after the accepted ones and the
blocks past the sequence's end are released).

- NgramProposer: prompt lookup over the sequence's own tokens (no second model); q is one-hot.
- DraftModelProposer: a small model with the same tokenizer, its own KV cache over the same block ids (so the
  target's block tables and copy-on-write serve both), run k times autoregressively. It catches up lazily: each
  round first computes the tokens its cache lacks (the prompt, the tokens accepted last round). Greedy requests
  draft greedily (q one-hot); the others sample from the draft's distribution under the request's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkern.generation import probabilities, sample, sample_with_probabilities
from llmkern.models import SequenceChunk, allocate_kv_cache, build_step_input
from llmkern.serve.spec_decode import ngram_propose, rejection_sample


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V] the draft's q for each token; None: deterministic (one-hot)


class NgramProposer:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.kv_caches = []  # none (the engine copies shared blocks in every proposer's caches)

    def propose(self, items) -> list[Draft]:
        """items: (sequence, k) pairs."""
        return [Draft(ngram_propose(seq.tokens, k, self.min_n, self.max_n)) for seq, k in items]

    def rollback(self, seq) -> None:
        pass


class DraftModelProposer:
    def __init__(self, model, num_blocks: int, block_size: int, device):
        self.model, self.block_size, self.device = model, block_size, device
        dtype = model.model.embed_tokens.weight.dtype
        self.kv_caches = allocate_kv_cache(model.config, num_blocks, block_size, dtype, device)

    def propose(self, items) -> list[Draft]:
        """items: (sequence, k) pairs; k draft tokens for each."""
        tokens: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        active = list(range(len(items)))
        step = 0
        while active:
            chunks = []
            for i in active:
                seq = items[i][0]
                if step == 0:  # everything the draft's cache lacks, up to the sequence's last token
                    chunks.append(SequenceChunk(seq.token_slice(seq.draft_computed), seq.draft_computed, seq.blocks))
                else:
                    chunks.append(SequenceChunk([tokens[i][-1]], seq.length + step - 1, seq.blocks))
            logits = self.model.step(build_step_input(chunks, self.block_size, self.device), self.kv_caches)
            seqs = [items[i][0] for i in active]
            params = [s.stream.params for s in seqs]
            # The history only where a penalty reads it (the copy grows with the output, every draft step).
            prompts = [s.prompt_ids for s in seqs]
            histories = [s.output_ids + tokens[i] if p.penalized else [] for s, i, p in zip(seqs, active, params)]
            # Greedy rows draft the argmax of the penalized logits (q one-hot), the others keep their q.
            drawn, q = sample_with_probabilities(logits, params, prompts, histories, [s.generator for s in seqs])
            for j, (i, seq) in enumerate(zip(active, seqs)):
                tokens[i].append(int(drawn[j]))
                if not params[j].greedy:
                    probs[i].append(q[j])
            step += 1
            active = [i for i in active if len(tokens[i]) < items[i][1]]
        for (seq, k) in items:
            seq.draft_computed = seq.length + k - 1  # its inputs: the sequence, then the first k - 1 draft tokens
        return [Draft(t, torch.stack(p) if p else None) for t, p in zip(tokens, probs)]

    def rollback(self, seq) -> None:
        """After verification: the draft's cache is valid up to the tokens the target kept."""
        seq.draft_computed = min(seq.draft_computed, seq.num_computed)


def verify(target_logits: torch.Tensor, drafts: list[Draft], seqs) -> list[list[int]]:
    """target_logits: [sum(1 + len(draft)), V], each sequence's rows in order (the target's logits at each draft
    position and the bonus one). Returns each sequence's accepted draft tokens plus one more."""
    params, prompts, histories = [], [], []
    for seq, d in zip(seqs, drafts):
        for j in range(len(d.tokens) + 1):  # the target's distribution after the first j draft tokens
            params.append(seq.stream.params)
            prompts.append(seq.prompt_ids)
            histories.append(seq.output_ids + d.tokens[:j] if seq.stream.params.penalized else [])
    if all(p.greedy for p in params):
        # p is one-hot at the argmax of the penalized logits, so rejection sampling accepts while the draft
        # equals that argmax and then emits it: no distributions needed.
        best, out, at = sample(target_logits, params, prompts, histories).tolist(), [], 0
        for d in drafts:
            n, a = len(d.tokens), 0
            while a < n and d.tokens[a] == best[at + a]:
                a += 1
            out.append(d.tokens[:a] + [best[at + a]])
            at += n + 1
        return out
    target_probs = probabilities(target_logits, params, prompts, histories)
    batch, k = len(drafts), max(len(d.tokens) for d in drafts)
    vocab = target_probs.shape[-1]
    p = target_probs.new_zeros(batch, k + 1, vocab)
    tokens = torch.zeros(batch, k, dtype=torch.long, device=target_probs.device)
    q = None
    if any(d.probs is not None for d in drafts):
        q = target_probs.new_zeros(batch, k, vocab)
    at = 0
    for i, d in enumerate(drafts):
        n = len(d.tokens)
        p[i, : n + 1] = target_probs[at : at + n + 1]
        tokens[i, :n] = torch.tensor(d.tokens, dtype=torch.long)
        if q is not None:
            if d.probs is not None:
                q[i, :n] = d.probs
            else:  # a deterministic draft: one-hot q
                q[i, torch.arange(n), tokens[i, :n]] = 1.0
        at += n + 1
    return rejection_sample(p, tokens, q, [len(d.tokens) for d in drafts], [s.generator for s in seqs]).tokens
