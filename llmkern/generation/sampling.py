"""Per-request sampling parameters and a batched sampler: logits [B, V] -> next token ids [B].

Each row carries its own SamplingParams. The processing order and semantics are transformers' logits processors
(generation/utils.py `_get_logits_processor`): repetition penalty (RepetitionPenaltyLogitsProcessor, over prompt
and output tokens), then, when sampling, temperature, top-k, top-p, min-p (the *LogitsWarper classes). vLLM's
presence and frequency penalties (OpenAI semantics, over output tokens only) follow the repetition penalty, as in
vLLM's `apply_penalties`. temperature == 0 is greedy: the argmax of the penalized logits.
Sampling uses the exponential race (argmax of p / E with E ~ Exp(1), exact categorical sampling, as vLLM does),
with one torch.Generator per seeded request, so a seeded request's tokens depend only on its seed and its own
logits, never on the other rows of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def _check_number(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def _check_int(name: str, value, lo: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


@dataclass
class SamplingParams:
    """How one request picks its tokens (vLLM's names and defaults; greedy is temperature=0).

    top_k: 0 or -1 keeps every token. stop: strings that end the output (excluded from it unless
    include_stop_str_in_output). stop_token_ids: tokens that end the output besides EOS. ignore_eos: keep going
    past EOS (benchmarks). max_tokens: None lets the caller choose (the model length or the checkpoint's
    max_new_tokens). seed: None draws from torch's global generator.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop: Sequence[str] | str | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        _check_number("temperature", self.temperature, 0.0, math.inf, hi_open=True)
        _check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=-1)
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True, hi_open=True)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.stop_strings = tuple(stop)
        ids = list(self.stop_token_ids or [])
        for i, t in enumerate(ids):
            _check_int(f"stop_token_ids[{i}]", t, lo=0)
        self.stop_token_ids = tuple(ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device="cpu") -> torch.Generator | None:
    """The request's own generator (seeded requests), or None (torch's global generator). Make it once per
    request and pass it at every step: it carries the request's random stream."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _as_list(ids) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _token_mask_and_counts(histories, batch: int, vocab: int, device, counts: bool):
    """[B, V] presence (bool) or occurrence counts (float32) of each row's token ids."""
    rows = [r for r, ids in enumerate(histories) for _ in range(len(ids))]
    flat = torch.tensor([t for ids in histories for t in _as_list(ids)], dtype=torch.long)
    if flat.numel() and (flat.min() < 0 or flat.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}) (the logits' vocabulary), got {flat.min()}..{flat.max()}")
    flat = (torch.tensor(rows, dtype=torch.long) * vocab + flat).to(device)
    if counts:
        out = torch.zeros(batch * vocab, dtype=torch.float32, device=device)
        out.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    else:
        out = torch.zeros(batch * vocab, dtype=torch.bool, device=device)
        out[flat] = True
    return out.view(batch, vocab)


def _check_inputs(logits, params, prompt_ids, output_ids):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [batch, vocab], got {getattr(logits, 'shape', type(logits))}")
    batch = logits.shape[0]
    if len(params) != batch:
        raise ValueError(f"params: one SamplingParams per logits row expected ({batch}), got {len(params)}")
    for name, hist in (("prompt_ids", prompt_ids), ("output_ids", output_ids)):
        if hist is not None and len(hist) != batch:
            raise ValueError(f"{name}: one token list per logits row expected ({batch}), got {len(hist)}")


def _row_values(params, name, device, dtype=torch.float32):
    return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)


def apply_penalties(logits, params, prompt_ids=None, output_ids=None) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (transformers: a seen token's logit is divided by the
    penalty when positive, multiplied when negative), then vLLM's frequency and presence penalties over output
    tokens (logit -= frequency * count + presence * [count > 0]). Returns new fp32 logits."""
    _check_inputs(logits, params, prompt_ids, output_ids)
    logits = logits.float().clone()
    batch, vocab = logits.shape
    empty = [[] for _ in range(batch)]
    prompt_ids, output_ids = prompt_ids or empty, output_ids or empty
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _token_mask_and_counts([[*_as_list(a), *_as_list(b)] for a, b in zip(prompt_ids, output_ids)],
                                      batch, vocab, logits.device, counts=False)
        penalty = _row_values(params, "repetition_penalty", logits.device)[:, None]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalized, logits)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        counts = _token_mask_and_counts(output_ids, batch, vocab, logits.device, counts=True)
        logits -= _row_values(params, "frequency_penalty", logits.device)[:, None] * counts
        logits -= _row_values(params, "presence_penalty", logits.device)[:, None] * (counts > 0)
    return logits


def apply_warpers(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on penalized fp32 logits, row by row parameters, filtered tokens set to
    -inf (transformers' warpers, min_tokens_to_keep=1). Greedy rows pass through unscaled."""
    batch, vocab = logits.shape
    device = logits.device
    temperature = _row_values(params, "temperature", device)
    logits = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    neg_inf = float("-inf")

    top_k = _row_values(params, "top_k", device, torch.long)
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, neg_inf)  # ties with the k-th value are kept, as in transformers

    top_p = _row_values(params, "top_p", device)
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)[:, None]
        remove[:, -1] = False  # keep at least the most likely token
        remove &= (top_p < 1.0)[:, None]
        logits = logits.masked_fill(remove.scatter(1, order, remove), neg_inf)

    min_p = _row_values(params, "min_p", device)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        top = probs.amax(dim=-1, keepdim=True)
        remove = probs < min_p[:, None] * top
        remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
        logits = logits.masked_fill(remove, neg_inf)
    return logits


def probabilities(logits, params, prompt_ids=None, output_ids=None) -> torch.Tensor:
    """The distribution each row samples from [B, V] (fp32): softmax of the penalized and warped logits; a greedy
    row is one-hot at its argmax. Speculative decoding compares these p (target) and q (draft)."""
    penalized = apply_penalties(logits, params, prompt_ids, output_ids)
    probs = apply_warpers(penalized, params).softmax(dim=-1)
    greedy = torch.tensor([p.greedy for p in params], device=probs.device)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(1, penalized.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def sample_from_probabilities(probs: torch.Tensor, generators: Sequence[torch.Generator | None] | None = None):
    """One token per row of `probs` [B, V]: argmax(p / E), E ~ Exp(1) drawn from the row's generator (torch's
    global one when None). Exact categorical sampling; zero-probability tokens are never picked."""
    generators = generators or [None] * probs.shape[0]
    if len(generators) != probs.shape[0]:
        raise ValueError(f"generators: one per row expected ({probs.shape[0]}), got {len(generators)}")
    noise = torch.empty_like(probs)
    unseeded = [r for r, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty((len(unseeded), probs.shape[1]), device=probs.device).exponential_()
    for r, g in enumerate(generators):
        if g is not None:
            noise[r].exponential_(generator=g)
    # Exp(1) draws can round to 0; clamping keeps p / E finite (and 0 for p = 0).
    return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def sample(logits, params, prompt_ids=None, output_ids=None, generators=None) -> torch.Tensor:
    """Next token ids [B] (int64) for logits [B, V]: argmax of the penalized logits for greedy rows, a draw from
    `probabilities` for the others. prompt_ids / output_ids: each row's previous tokens (lists or 1-D tensors),
    needed by the penalties. generators: each row's generator from make_generator (None entries: global RNG)."""
    probs = probabilities(logits, params, prompt_ids, output_ids)
    greedy = torch.tensor([p.greedy for p in params], device=probs.device)
    if bool(greedy.all()):
        return probs.argmax(dim=-1)
    if generators is not None:  # greedy rows draw nothing, so their generators do not advance
        generators = [None if p.greedy else g for p, g in zip(params, generators)]
    drawn = sample_from_probabilities(probs, generators)
    return torch.where(greedy, probs.argmax(dim=-1), drawn)
