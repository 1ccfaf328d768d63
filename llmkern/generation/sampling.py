"""Per-request sampling parameters and a batched sampler: logits [B, V] -> next token ids [B].

Each row carries its own SamplingParams. The processing order and semantics are transformers' logits processors
(generation/utils.py `_get_logits_processor`): repetition penalty (RepetitionPenaltyLogitsProcessor, over prompt
and output tokens), then, when sampling, temperature, top-k, top-p, min-p (the *LogitsWarper classes). vLLM's
presence and frequency penalties (OpenAI semantics, over output tokens only) follow the repetition penalty, as in
vLLM's `apply_penalties`. temperature == 0 is greedy: the argmax of the penalized logits (llmkern.ops.argmax: on the
CPU a compiled pass, ~20x torch.argmax over 16 rows of bf16 logits).
Sampling is by inverse CDF with one uniform number per row, drawn from the request's own torch.Generator when it
has a seed, so a seeded request's tokens depend only on its seed and its own logits, never on the other rows.
Top-k and top-p do not sort the whole vocabulary (a 128k sort costs more than the rest of the sampler together): on
the CPU llmkern.ops.top_k_top_p_ finds both cuts from a histogram of each row; elsewhere they work on each row's
top-k candidates. The result is the same as transformers' full sort (which breaks ties with a cut's value
arbitrarily: the compiled filter keeps them all). Penalties, the draw and logprobs are compiled ops on the CPU too.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmkern._ext import available
from llmkern.ops.sampling import apply_penalties_, argmax, logprobs, sample_, top_k_top_p_, top_k_top_p_ref


def _compiled(logits: torch.Tensor) -> bool:
    """Whether the sampler's compiled CPU ops (llmkern.ops.sampling) take these logits."""
    return logits.device.type == "cpu" and available()


def _check_number(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


_INT64_MAX = 2**63 - 1
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing the logits by one overflows float32.
_GREEDY_TEMPERATURE = 1e-5


def _check_int(name: str, value, lo: int | None = None, hi: int = _INT64_MAX):
    """An int in [lo, hi]; hi defaults to int64's largest, as the values end up in int64 tensors."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")


@dataclass
class SamplingParams:
    """How one request picks its tokens (vLLM's names and defaults; greedy is temperature=0, which a temperature
    below 1e-5 becomes, as in vLLM).

    n: completions per prompt (the server shares their prompt). top_k: 0 or -1 keeps every token.
    stop: strings that end the output (excluded from it unless include_stop_str_in_output).
    stop_token_ids: tokens that end the output besides EOS. ignore_eos: keep going past EOS (benchmarks).
    max_tokens: None lets the caller choose (the model length or the checkpoint's max_new_tokens).
    seed: None draws from torch's global generator. logprobs: how many top log-probabilities to return with
    each token (None: none; 0: only the sampled token's).
    """

    n: int = 1
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
    logprobs: int | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        _check_int("n", self.n, lo=1)
        _check_number("temperature", self.temperature, 0.0, math.inf, hi_open=True)
        if self.temperature < _GREEDY_TEMPERATURE:
            self.temperature = 0.0
        _check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=-1)
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True, hi_open=True)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:  # torch.Generator.manual_seed's range
            _check_int("seed", self.seed, lo=-(2**63), hi=2**64 - 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0)
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

    @property
    def penalized(self) -> bool:
        """Whether sampling reads the token history (a repetition, frequency or presence penalty)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def sample_seeds(params: SamplingParams) -> list[int | None]:
    """The seed of each of a request's `n` samples: the request's own for the first (so n=1 and the first of
    n samples agree), then seeds drawn from a generator seeded with it (same seed, same n outputs). Unseeded
    requests stay unseeded (torch's global generator)."""
    if params.seed is None or params.n == 1:
        return [params.seed] * params.n
    more = torch.randint(2**62, (params.n - 1,), generator=torch.Generator().manual_seed(params.seed))
    return [params.seed, *more.tolist()]


def make_generator(params: SamplingParams, device="cpu") -> torch.Generator | None:
    """The request's own generator (seeded requests), or None (torch's global generator). Make it once per
    request and pass it at every step: it carries the request's random stream."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _as_list(ids) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _flat_positions(histories, vocab: int, device, unique: bool):
    """Where each row's token ids sit in the flattened [B * V] logits (each id once per row when `unique`),
    and their rows. Penalties touch only these positions instead of building [B, V] masks."""
    rows, tokens = [], []
    for r, ids in enumerate(histories):
        ids = _as_list(ids)
        if unique:
            ids = list(set(ids))
        rows += [r] * len(ids)
        tokens += ids
    tokens = torch.tensor(tokens, dtype=torch.long)
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(
            f"token ids must be in [0, {vocab}) (the logits' vocabulary), got {tokens.min()}..{tokens.max()}"
        )
    rows = torch.tensor(rows, dtype=torch.long)
    return (rows * vocab + tokens).to(device), rows.to(device)


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
    batch, vocab = logits.shape
    empty = [[] for _ in range(batch)]
    prompt_ids, output_ids = prompt_ids or empty, output_ids or empty
    if not any(p.penalized for p in params):
        return logits.float()
    if _compiled(logits):
        return _compiled_penalties(logits, params, prompt_ids, output_ids)
    repetition = [p.repetition_penalty != 1.0 for p in params]
    counted = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
    flat = logits.float().flatten().clone()  # the caller's logits are never modified
    if any(repetition):
        seen = [[*_as_list(a), *_as_list(b)] if on else [] for a, b, on in zip(prompt_ids, output_ids, repetition)]
        pos, rows = _flat_positions(seen, vocab, flat.device, unique=True)
        penalty = _row_values(params, "repetition_penalty", flat.device)[rows]
        values = flat[pos]
        flat[pos] = torch.where(values < 0, values * penalty, values / penalty)
    if any(counted):
        counted_ids = [o if on else [] for o, on in zip(output_ids, counted)]
        pos, _ = _flat_positions(counted_ids, vocab, flat.device, unique=False)
        pos, counts = pos.unique(return_counts=True)
        rows = pos // vocab
        frequency = _row_values(params, "frequency_penalty", flat.device)[rows]
        presence = _row_values(params, "presence_penalty", flat.device)[rows]
        flat[pos] = flat[pos] - frequency * counts - presence  # vLLM: the frequency term first, then presence
    return flat.view(batch, vocab)


def _compiled_penalties(logits, params, prompt_ids, output_ids) -> torch.Tensor:
    """apply_penalties through llmkern.ops.apply_penalties_: each penalized row's history as one flat id list."""
    # array.array: ~4x faster than torch.tensor(list) for the ~3k ids of 16 sequences (0.24 ms)
    ids, offsets, starts = array.array("q"), array.array("q", [0]), array.array("q")
    for prompt, output, p in zip(prompt_ids, output_ids, params):
        if p.repetition_penalty != 1.0:  # the prompt counts for the repetition penalty only
            ids.extend(_as_list(prompt))
        starts.append(len(ids))
        if p.penalized:
            ids.extend(_as_list(output))
        offsets.append(len(ids))
    x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    as_long = lambda a: torch.frombuffer(a, dtype=torch.long) if a else torch.empty(0, dtype=torch.long)  # noqa: E731
    return apply_penalties_(x, as_long(ids), as_long(offsets), as_long(starts),
                            *(_row_values(params, name, x.device) for name in
                              ("repetition_penalty", "frequency_penalty", "presence_penalty")))


# Top-p first looks for its nucleus among this many most likely tokens, and sorts the whole row only when they
# hold too little probability (very flat distributions): top-k of 1024 out of 128k costs ~10x less than a sort.
TOP_P_CANDIDATES = 1024
_NEG_INF = float("-inf")


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p with transformers' semantics (its order, ties with the k-th value kept, the ascending
    cumulative-probability rule of top-p). On the CPU the compiled filter; elsewhere computed on each row's n most
    likely candidates: a row whose kept tokens are all candidates is rebuilt from them; the others (top-p needing
    more than the candidates, or ties running past them) take the full sort."""
    if _compiled(logits):
        return top_k_top_p_(logits.to(torch.float32, copy=True), top_k, top_p.float())
    batch, vocab = logits.shape
    use_k, use_p = top_k > 0, top_p < 1.0
    k = torch.where(use_k, top_k.clamp(max=vocab), vocab)
    # One candidate more than the largest k: a row whose last candidate still ties with its k-th value may keep
    # tokens beyond the candidates.
    n = int(k[use_k].max()) + 1 if bool(use_k.any()) else 0
    if bool((use_p & ~use_k).any()):
        n = max(n, TOP_P_CANDIDATES)
    n = min(n, vocab)
    values, order = logits.topk(n, dim=-1)  # descending: the first n of a full sort
    kth = torch.where(use_k, values.gather(1, (k - 1).clamp(max=n - 1)[:, None])[:, 0], _NEG_INF)
    keep = values >= kth[:, None]
    # Rows whose kept tokens may lie beyond the candidates: a top-k tie running past the last candidate, or
    # (below) top-p mass outside the candidates.
    dense = use_k & (values[:, -1] == kth) & (n < vocab)
    restricted = use_k.clone()  # top-k cut everything outside the candidates
    if bool(use_p.any()):
        # Candidate probabilities in the (top-k filtered) full row: exp(logit - logsumexp of the row).
        kept_values = values.masked_fill(~keep, _NEG_INF)
        row_lse = kept_values.logsumexp(dim=-1)
        if not bool(restricted.all()):  # top-p rows without top-k: their whole row's normalizer
            row_lse = torch.where(restricted, row_lse, logits.logsumexp(dim=-1))
        probs = (kept_values - row_lse[:, None]).exp()
        outside = torch.where(restricted | (n == vocab), 0.0, (1.0 - probs.sum(dim=-1)).clamp(min=0.0))
        # transformers' rule: drop the tokens whose ascending cumulative probability is <= 1 - top_p (the outside
        # tokens come first in ascending order), keeping the most likely one.
        cumulative = outside[:, None] + probs.flip(-1).cumsum(dim=-1)
        remove = (cumulative <= (1 - top_p)[:, None]).flip(-1) & use_p[:, None]
        remove[:, 0] = False
        keep &= ~remove
        covered = use_p & (outside <= 1 - top_p)  # every token outside the candidates is dropped
        dense |= use_p & ~covered & ~restricted
        restricted |= covered
    out = torch.where(restricted[:, None], _NEG_INF, logits)  # rows with neither filter stay as they are
    rows = restricted.nonzero()[:, 0]
    out[rows] = out[rows].scatter(1, order[rows], values[rows].masked_fill(~keep[rows], _NEG_INF))
    rows = dense.nonzero()[:, 0]
    if rows.numel():
        out[rows] = top_k_top_p_ref(logits[rows], top_k[rows], top_p[rows])
    return out


def apply_warpers(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on penalized fp32 logits, row by row parameters, filtered tokens set to
    -inf (transformers' warpers, min_tokens_to_keep=1). Greedy rows pass through unscaled."""
    device = logits.device
    temperature = _row_values(params, "temperature", device)
    if bool((temperature != 1.0).any()):
        logits = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    top_k = _row_values(params, "top_k", device, torch.long)
    top_p = _row_values(params, "top_p", device)
    if bool((top_k > 0).any() or (top_p < 1.0).any()):
        logits = _top_k_top_p(logits, top_k, top_p)
    min_p = _row_values(params, "min_p", device)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        remove = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(1, argmax(probs)[:, None], False)
        logits = logits.masked_fill(remove, _NEG_INF)
    return logits


def probabilities(logits, params, prompt_ids=None, output_ids=None) -> torch.Tensor:
    """The distribution each row samples from [B, V] (fp32): softmax of the penalized and warped logits; a greedy
    row is one-hot at its argmax. Speculative decoding compares these p (target) and q (draft)."""
    penalized = apply_penalties(logits, params, prompt_ids, output_ids)
    probs = apply_warpers(penalized, params).softmax(dim=-1)
    greedy = torch.tensor([p.greedy for p in params], device=probs.device)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(1, argmax(penalized)[:, None], 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def _uniforms(batch: int, generators: Sequence[torch.Generator | None] | None, device) -> torch.Tensor:
    """One U[0, 1) number per row [batch]: from the row's generator, else from torch's global one."""
    generators = generators or [None] * batch
    if len(generators) != batch:
        raise ValueError(f"generators: one per row expected ({batch}), got {len(generators)}")
    u = torch.rand(batch, device=device)  # from the global generator: kept by the unseeded rows
    for r, g in enumerate(generators):
        if g is not None:
            u[r] = torch.rand(1, generator=g, device=device)[0]
    return u


def _sampled_generators(params, generators):
    """generators with the greedy rows' set to None: greedy rows draw nothing, so their generators do not advance."""
    return None if generators is None else [None if p.greedy else g for p, g in zip(params, generators)]


def sample_from_probabilities(probs: torch.Tensor, generators: Sequence[torch.Generator | None] | None = None):
    """One token per row of `probs` [B, V] by inverse CDF: the first token whose cumulative probability exceeds
    u * total, u ~ U[0, 1) drawn from the row's generator (torch's global one when None). One random number per
    row, so a seeded row's draw depends on nothing but its seed and its own probabilities; zero-probability tokens
    are never picked."""
    vocab = probs.shape[1]
    u = _uniforms(probs.shape[0], generators, probs.device)[:, None]
    cdf = probs.cumsum(dim=-1)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1)[:, 0]
    # u * total can round up to the total: then take the last token with probability > 0.
    rounded = probs.gather(1, tokens[:, None])[:, 0] == 0
    if bool(rounded.any()):
        last = vocab - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
        tokens = torch.where(rounded, last, tokens)
    return tokens


def sample(logits, params, prompt_ids=None, output_ids=None, generators=None) -> torch.Tensor:
    """Next token ids [B] (int64) for logits [B, V]: argmax of the penalized logits for greedy rows, a draw from
    `probabilities` for the others. prompt_ids / output_ids: each row's previous tokens (lists or 1-D tensors),
    needed by the penalties. generators: each row's generator from make_generator (None entries: global RNG).
    On the CPU the warpers and the draw are one compiled op (llmkern.ops.sample_), with the same uniform numbers."""
    if not _compiled(logits) or all(p.greedy for p in params):
        return sample_with_probabilities(logits, params, prompt_ids, output_ids, generators)[0]
    x = apply_penalties(logits, params, prompt_ids, output_ids)  # new fp32 logits unless they were already
    if x is logits or not x.is_contiguous():  # the op writes them; the caller's logits are never modified
        x = x.clone(memory_format=torch.contiguous_format)
    device = x.device
    return sample_(x, _row_values(params, "temperature", device), _row_values(params, "top_k", device, torch.long),
                   _row_values(params, "top_p", device), _row_values(params, "min_p", device),
                   _uniforms(len(params), _sampled_generators(params, generators), device))


def sample_with_probabilities(logits, params, prompt_ids=None, output_ids=None, generators=None):
    """`sample`, and the distribution each row drew from ([B, V], None when every row is greedy: then no
    distribution is computed). Speculative decoding's draft keeps it as q."""
    if all(p.greedy for p in params):
        if not any(p.penalized for p in params):
            _check_inputs(logits, params, prompt_ids, output_ids)
            return argmax(logits), None  # widening to fp32 would change no order: the logits as they are
        return argmax(apply_penalties(logits, params, prompt_ids, output_ids)), None
    probs = probabilities(logits, params, prompt_ids, output_ids)
    greedy = torch.tensor([p.greedy for p in params], device=probs.device)
    drawn = sample_from_probabilities(probs, _sampled_generators(params, generators))
    return torch.where(greedy, argmax(probs), drawn), probs


@dataclass
class Logprobs:
    """Log-probabilities of sampled tokens under the model's raw distribution (log_softmax of the logits,
    before penalties and warpers: vLLM's default). token [B], rank [B] (1 = the most likely token),
    top / top_ids [B, n] the n most likely tokens, descending."""

    token: torch.Tensor
    rank: torch.Tensor
    top: torch.Tensor
    top_ids: torch.Tensor


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int = 0) -> Logprobs:
    if logits.dim() != 2 or token_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"logits [B, V] and token_ids [B] expected, got {tuple(logits.shape)} and {tuple(token_ids.shape)}"
        )
    num_top = min(num_top, logits.shape[1])
    if _compiled(logits):  # one compiled pass per row, no [B, V] log_softmax
        x = logits if logits.dtype in (torch.float32, torch.bfloat16, torch.float16) else logits.float()
        return Logprobs(*logprobs(x, token_ids.long(), num_top))
    lp = logits.float().log_softmax(dim=-1)
    token = lp.gather(1, token_ids[:, None].long())[:, 0]
    rank = (lp > token[:, None]).sum(dim=-1) + 1
    top, top_ids = lp.topk(num_top, dim=-1)
    return Logprobs(token, rank, top, top_ids)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model's raw distribution, its rank there (1: the
    most likely token) and the `SamplingParams.logprobs` most likely (token id, log-probability), descending."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]
