"""Token selection: the argmax over the vocabulary of a step's logits (greedy), and the sampler's compiled pieces
(the top-k / top-p filter, the whole draw, penalties, logprobs), CPU ops.

torch.argmax on the CPU reduces one element at a time (~250 us for 16 rows of an 8k vocabulary in bf16 on Zen 4, a
tenth of a 16-sequence decode step of the demo model); the CPU kernel keeps a running maximum and its index per
vector lane, with torch.argmax's answer on ties (the first maximum) and on NaN (the first NaN).

top_k_top_p_ is transformers' TopKLogitsWarper then TopPLogitsWarper without sorting the row: each cut is a threshold
found from a histogram of the row's values (csrc/kernels/sampling.cpp). 16 rows of 8192 float32 logits, top_p 0.95:
~0.27 ms against ~3.4 ms for torch's topk-candidates path (in process, 2 threads), which made a sampled 16-sequence
decode step of the demo model 3x a greedy one. sample_ is the whole draw of a sampled row in one op: temperature,
the filter, min-p and the inverse CDF; apply_penalties_ the repetition, frequency and presence penalties (~1 ms of
Python list and index work a 16-sequence step before); logprobs the chosen tokens' log-probabilities, ranks and top
alternatives without a [B, V] log_softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkern._ext import available, ops


def argmax_ref(x: Tensor) -> Tensor:
    """The index of each row's first maximum over the last dim (its first NaN if it holds one), int64 [...]."""
    return torch.argmax(x, dim=-1)


def argmax(x: Tensor) -> Tensor:
    """argmax_ref(x [..., n]) for float32, bfloat16, float16 or float64 x: on the CPU llmkern's kernel; on other
    devices torch.argmax itself (one fused reduction there already). n must be at least 1."""
    if x.device.type != "cpu":
        return torch.argmax(x, dim=-1)
    return ops().argmax(x)


def top_k_top_p_ref(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper on rows of logits [B, V] (a full sort), per-row top_k
    int64 [B] (<= 0: none) and top_p [B] (1: none); removed tokens are -inf."""
    vocab = logits.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    kth = sorted_logits.gather(1, (vocab - k)[:, None])
    logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th value are kept
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = (cumulative <= (1 - top_p)[:, None]) & (top_p < 1.0)[:, None]
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def top_k_top_p_(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """top_k_top_p_ref in place on float32 logits [B, V] (unit stride along V) on the CPU; returns logits. top_k
    int64 [B], top_p float32 [B] in (0, 1]. Where the reference's sort would break a tie with a cut's value
    arbitrarily, every token of the tie is kept. A row holding NaN is left as it is."""
    ops().top_k_top_p_(logits, top_k, top_p)
    return logits


def apply_penalties_(logits: Tensor, ids: Tensor, offsets: Tensor, output_start: Tensor, repetition: Tensor,
                     frequency: Tensor, presence: Tensor) -> Tensor:
    """Penalties on float32 logits [B, V] in place on the CPU (returns logits), from each row's token history
    ids[offsets[r]:offsets[r + 1]] (int64, ids in [0, V): a ValueError otherwise) whose output tokens start at
    output_start[r]: transformers' repetition penalty over every distinct token of the history (logit * penalty
    where negative, / penalty otherwise), then vLLM's frequency and presence penalties over the output tokens
    (logit - frequency * count - presence). Per-row float32 repetition (> 0; 1: none), frequency, presence."""
    ops().apply_penalties_(logits, ids, offsets, output_start, repetition, frequency, presence)
    return logits


def logprobs(logits: Tensor, tokens: Tensor, num_top: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log_softmax(logits [B, V]) at tokens (int64 [B]) on the CPU, in one pass per row with no [B, V] output:
    (token log-probabilities float32 [B], ranks int64 [B] (1 = the most likely), the num_top largest log-probabilities
    float32 [B, num_top] descending, their ids int64 [B, num_top]; ties: the lower id first). logits float32,
    bfloat16 or float16, computed in float32 as log_softmax((x - max) - log(sum(exp(x - max))))."""
    return ops().logprobs(logits, tokens, num_top)


def sample_(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, u: Tensor) -> Tensor:
    """One token per row of float32 logits [B, V] (scratch: overwritten) on the CPU, int64 [B]: temperature 0 gives
    the argmax; otherwise logits / temperature, top_k_top_p_, min-p (transformers' MinPLogitsWarper), then the first
    token whose cumulative probability exceeds u times the total (u in [0, 1): an inverse CDF draw). Per-row float32
    temperature >= 0, top_p in (0, 1], min_p in [0, 1], u in [0, 1), and int64 top_k. A row holding NaN gives its
    first NaN."""
    return ops().sample_(logits, temperature, top_k, top_p, min_p, u)


def _register() -> None:
    @torch.library.register_fake("llmkern::argmax")
    def _(x):
        torch._check(x.dim() >= 1 and x.shape[-1] != 0, lambda: "x: expected a non-empty last dim")
        return x.new_empty(x.shape[:-1], dtype=torch.int64)

    @torch.library.register_fake("llmkern::top_k_top_p_")
    def _(logits, top_k, top_p):
        return None

    @torch.library.register_fake("llmkern::apply_penalties_")
    def _(logits, ids, offsets, output_start, repetition, frequency, presence):
        return None

    @torch.library.register_fake("llmkern::logprobs")
    def _(logits, tokens, num_top):
        rows = logits.shape[0]
        return (logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.int64),
                logits.new_empty(rows, num_top, dtype=torch.float32), logits.new_empty(rows, num_top, dtype=torch.int64))

    @torch.library.register_fake("llmkern::sample_")
    def _(logits, temperature, top_k, top_p, min_p, u):
        return logits.new_empty(logits.shape[:1], dtype=torch.int64)


if available():
    _register()
