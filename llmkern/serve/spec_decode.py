"""Speculative decoding math: the n-gram (prompt lookup) proposer and exact rejection sampling.

Each round the engine proposes up to k tokens per request (a draft model, or `ngram_propose`), runs the target
once over them and hands its distributions p (and the draft's q) to `rejection_sample`, which decides what to
keep. The rule is speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", Algorithm 1; Chen et al. 2023), as in vLLM's rejection sampler: the emitted tokens are
distributed exactly as if the target had sampled them one at a time.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmkern.generation.sampling import _check_int, sample_from_probabilities


def ngram_propose(token_ids: Sequence[int], k: int, min_n: int = 1, max_n: int = 4) -> list[int]:
    """Prompt lookup (vLLM's ngram proposer): for n from max_n down to min_n, find the most recent earlier
    occurrence of the sequence's last n tokens and propose the (up to k) tokens that followed it; [] when none.
    An occurrence may overlap the suffix itself (repetitive text), so fewer than k tokens can follow it."""
    _check_int("k", k, lo=1)
    _check_int("min_n", min_n, lo=1)
    _check_int("max_n", max_n, lo=1)
    if max_n < min_n:
        raise ValueError(f"max_n must be >= min_n, got max_n={max_n}, min_n={min_n}")
    tokens = _token_array(token_ids)
    last = len(tokens) - 1
    if last < 1:
        return []
    # Plain Python, as this runs per request per step and turning a long list into a tensor costs more than the
    # scan: walk back over the earlier positions holding the last token (array.index runs in C), measure how far
    # each match extends backwards (up to max_n), keep the longest, the most recent on ties; stop at max_n.
    earlier_reversed = tokens[last - 1 :: -1]  # tokens[last - 1], ..., tokens[0]
    best_n, best_end, i = 0, -1, 0
    while best_n < max_n:
        try:
            i = earlier_reversed.index(tokens[last], i)
        except ValueError:
            break
        end = last - 1 - i
        n = 1
        while n < max_n and n <= end and tokens[end - n] == tokens[last - n]:
            n += 1
        if n > best_n:
            best_n, best_end = n, end
        i += 1
    if best_n < min_n:
        return []
    return tokens[best_end + 1 : best_end + 1 + k].tolist()


def _token_array(token_ids) -> array.array:
    """token_ids as an int64 array: C-speed search, and a clear error for anything but ints."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex():
            raise ValueError(f"token_ids must be a flat sequence of int token ids, got {_describe(token_ids)}")
        token_ids = token_ids.tolist()
    try:
        return array.array("q", token_ids)
    except (TypeError, OverflowError) as error:
        raise ValueError(f"token_ids must be a flat sequence of int token ids ({error})") from None


@dataclass
class VerifyResult:
    tokens: list[list[int]]  # per row: the accepted draft tokens then one more (the resampled or bonus token)
    num_accepted: list[int]  # per row: how many draft tokens were accepted (0..num_draft[row])


def rejection_sample(
    target_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_draft: Sequence[int],
    generators: Sequence[torch.Generator | None] | None = None,
) -> VerifyResult:
    """Verify each row's draft tokens against the target and emit 1..num_draft+1 tokens per row.

    target_probs [B, k + 1, V] fp32: the target's p at the k draft positions and the bonus position, after
    penalties and warpers (a greedy row is one-hot: llmkern.generation.probabilities). draft_tokens [B, k] int64:
    row r's first num_draft[r] entries are its proposals, the rest padding (never read). draft_probs [B, k, V] fp32
    q, or None for a deterministic proposer (n-gram, greedy draft): q one-hot at the draft token.
    generators: one per row (seeded requests) or None entries / None for torch's global generator.

    For i < num_draft: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample the
    replacement from normalize(max(p_i - q_i, 0)) and stop; when all are accepted sample a bonus token from
    p_num_draft. A greedy row (one-hot p) accepts while the draft is the target's argmax, then emits the argmax,
    whatever the random numbers. A seeded row draws num_draft[r] + 1 numbers from its own generator, so its
    result depends only on its seed and its own inputs, never on the batch around it (nor on the padding).
    """
    batch, k, vocab, num_draft = _check_verify_inputs(target_probs, draft_tokens, draft_probs, num_draft, generators)
    if batch == 0:
        return VerifyResult(tokens=[], num_accepted=[])
    device = target_probs.device
    num_draft_t = torch.tensor(num_draft, device=device)
    real = torch.arange(k, device=device) < num_draft_t[:, None]  # [B, k]: proposals, not padding
    drafts = torch.where(real, draft_tokens, 0)  # padding may hold any id: gather at 0 instead, then mask
    p_draft = target_probs[:, :k].gather(2, drafts[..., None])[..., 0]  # [B, k] p_i(x_i)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, drafts[..., None])[..., 0]
    # u < p/q written as u * q < p: no division, q(x) = 0 accepts iff p(x) > 0, and with p(x) exactly 0 or 1 (a
    # greedy row) the outcome is the same for every u in [0, 1).
    uniforms = _acceptance_uniforms(num_draft, k, generators, device)
    accepted = (uniforms * q_draft < p_draft) & real
    # Verification stops at the first rejection: only the accepted prefix counts.
    num_accepted = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)
    rejected = num_accepted < num_draft_t
    rows = torch.arange(batch, device=device)
    p_last = target_probs[rows, num_accepted]  # [B, V]: p at the first rejection, or at the bonus position
    final = _final_distribution(p_last, draft_probs, drafts, num_accepted, rejected)
    last_tokens = sample_from_probabilities(final, generators).tolist()
    accepted_tokens, counts = draft_tokens.tolist(), num_accepted.tolist()
    tokens = [accepted_tokens[r][: counts[r]] + [last_tokens[r]] for r in range(batch)]
    return VerifyResult(tokens=tokens, num_accepted=counts)


def _acceptance_uniforms(num_draft: list[int], k: int, generators, device) -> torch.Tensor:
    """u ~ U[0, 1) per draft position [B, k]; a seeded row takes exactly num_draft[r] from its own generator."""
    uniforms = torch.rand(len(num_draft), k, device=device)  # global generator: kept by the unseeded rows
    for r, g in enumerate(generators or ()):
        if g is not None and num_draft[r]:
            uniforms[r, : num_draft[r]] = torch.rand(num_draft[r], generator=g, device=device)
    return uniforms


def _final_distribution(p_last, draft_probs, drafts, num_accepted, rejected) -> torch.Tensor:
    """Each row's distribution for its last token [B, V] (unnormalized: the sampler scales by the total):
    max(p - q, 0) at a rejection, p for the bonus token."""
    k = drafts.shape[1]
    if k == 0:
        return p_last
    rows = torch.arange(p_last.shape[0], device=p_last.device)
    at = num_accepted.clamp(max=k - 1)  # the rejected position; rows with a bonus token read a dummy, unused
    if draft_probs is None:
        # q one-hot at x: max(p - q, 0) is p with x removed.
        residual = p_last.scatter(1, drafts[rows, at][:, None], 0.0)
    else:
        residual = (p_last - draft_probs[rows, at]).clamp_(min=0)
    # An all-zero residual means p <= q everywhere, which two distributions allow only through rounding or a
    # draft token its q gave no mass to: sample from p then (vLLM does the same).
    usable = rejected & (residual.sum(dim=1) > 0)
    return torch.where(usable[:, None], residual, p_last)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)} on {x.device}"
    return type(x).__name__


def _check_verify_inputs(target_probs, draft_tokens, draft_probs, num_draft, generators):
    """Shapes, dtypes, devices and ranges of rejection_sample's arguments; returns (B, k, V, num_draft list)."""
    if not (isinstance(target_probs, torch.Tensor) and target_probs.dtype == torch.float32 and target_probs.dim() == 3):
        raise ValueError(f"target_probs must be a float32 tensor [batch, k + 1, vocab], got {_describe(target_probs)}")
    batch, positions, vocab = target_probs.shape
    if positions < 1 or vocab < 1:
        raise ValueError(
            f"target_probs needs k + 1 >= 1 positions and a vocabulary, got shape {list(target_probs.shape)}"
        )
    k = positions - 1
    expected = f"[batch, k] = [{batch}, {k}] (target_probs is [batch, k + 1, vocab] = {list(target_probs.shape)})"
    if not (isinstance(draft_tokens, torch.Tensor) and draft_tokens.dtype == torch.int64):
        raise ValueError(f"draft_tokens must be an int64 tensor {expected}, got {_describe(draft_tokens)}")
    if tuple(draft_tokens.shape) != (batch, k):
        raise ValueError(f"draft_tokens must have shape {expected}, got {list(draft_tokens.shape)}")
    if draft_probs is not None:
        if not (isinstance(draft_probs, torch.Tensor) and draft_probs.dtype == torch.float32):
            raise ValueError(
                f"draft_probs must be None or a float32 tensor [batch, k, vocab], got {_describe(draft_probs)}"
            )
        if tuple(draft_probs.shape) != (batch, k, vocab):
            raise ValueError(
                f"draft_probs must have shape [batch, k, vocab] = {[batch, k, vocab]}, got {list(draft_probs.shape)}"
            )
    for name, t in (("draft_tokens", draft_tokens), ("draft_probs", draft_probs)):
        if t is not None and t.device != target_probs.device:
            raise ValueError(f"{name} is on {t.device} but target_probs on {target_probs.device}")
    num_draft = num_draft.tolist() if isinstance(num_draft, torch.Tensor) else list(num_draft)
    if len(num_draft) != batch:
        raise ValueError(f"num_draft: one count per row expected ({batch}), got {len(num_draft)}")
    for r, n in enumerate(num_draft):
        _check_int(f"num_draft[{r}]", n, lo=0)
        if n > k:
            raise ValueError(f"num_draft[{r}] must be <= k = {k} (draft_tokens' width), got {n}")
    if generators is not None and len(generators) != batch:
        raise ValueError(f"generators: one per row expected ({batch}), got {len(generators)}")
    real = torch.arange(k, device=draft_tokens.device) < torch.tensor(num_draft, device=draft_tokens.device)[:, None]
    bad = real & ((draft_tokens < 0) | (draft_tokens >= vocab))
    if bool(bad.any()):
        row, pos = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"draft_tokens must be in [0, {vocab}) (the vocabulary), got {int(draft_tokens[row, pos])} at row {row}, "
            f"position {pos}"
        )
    return batch, k, vocab, num_draft
