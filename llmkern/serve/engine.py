"""The serving engine: requests in, token and text deltas out, one scheduler step at a time.

    engine = Engine.from_pretrained("path/to/hf_dir", EngineConfig(speculative="ngram"))
    engine.add_request("r1", engine.tokenizer.encode("def fib(n):"), SamplingParams(temperature=0, max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, "".join(d.text for d in out.deltas))

Each step: the scheduler picks the sequences and token counts (continuous batching, chunked prefill,
preemption); blocks shared by n samples are copied before they are written; the proposer drafts tokens for the
decoding sequences (speculative decoding); one model.step over the paged KV cache computes every scheduled
token; the sequences whose step reached their last token pick their next tokens (sampling, or verification of
the drafts), and their streams turn tokens into text deltas and finish reasons. Not thread-safe: the
AsyncEngine drives it from one thread.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmkern.generation import (GenerationConfig, OutputStream, SamplingParams, TokenLogprob, Tokenizer,
                                compute_logprobs, make_generator, sample, sample_seeds)
from llmkern.models import SequenceChunk, allocate_kv_cache, build_step_input, load_model
from llmkern.models.serving import kv_block_bytes
from llmkern.serve.config import DEFAULT_KV_CACHE_FRACTION, EngineConfig
from llmkern.serve.kv_cache import KVCacheManager
from llmkern.serve.scheduler import Request, Scheduled, Scheduler, Sequence
from llmkern.serve.speculative import Draft, DraftModelProposer, NgramProposer, verify

log = logging.getLogger("llmkern.serve")


class QueueFullError(RuntimeError):
    """The waiting queue holds max_waiting requests already (HTTP 429)."""


@dataclasses.dataclass
class SampleDelta:
    """What one of a request's samples added in a step."""

    index: int  # 0..n-1
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None while it goes on; "stop", "length" or "abort"
    stop_reason: int | str | None = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    deltas: list[SampleDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclasses.dataclass
class EngineStats:
    """Gauges (running, waiting, KV usage) and monotonic totals; all zero before the engine exists."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, and those found
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    spec_rounds: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0
    spec_accepted_per_position: list[int] = dataclasses.field(default_factory=list)


class _NoText:
    """The tokenizer of an engine built without one (token ids in and out): every token decodes to ""."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def token_id_list(ids, name: str = "prompt_token_ids") -> list[int]:
    """A prompt's token ids (a sequence or tensor of ints) as a list of ints; ValueError for anything else, floats
    and bools included, which int() would quietly turn into ids."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, (numbers.Number, str)) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"{name}: expected a sequence of int token ids, got {ids!r:.80}")
    return [int(t) for t in ids]


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("available memory unknown (no MemAvailable in /proc/meminfo): pass kv_cache_memory")


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The given rows of logits: logits itself when they are all its rows in order (a decode step's), else a copy by
    index_select. Not logits[rows]: advanced indexing starts an OpenMP region, whose threads are cold and then
    spin on the cores llmkern's pool needs (`llmkern serve` runs the kernels there)."""
    if rows == list(range(logits.shape[0])):
        return logits
    return logits.index_select(0, torch.tensor(rows, device=logits.device))


class Engine:
    def __init__(self, model, tokenizer: Tokenizer | None = None, generation_config: GenerationConfig | None = None,
                 config: EngineConfig | None = None, draft_model=None):
        config = config or EngineConfig()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.generation_config = generation_config or GenerationConfig()
        self.device = model.model.embed_tokens.weight.device
        self.max_model_len = self._max_model_len(model, draft_model)
        eos = self.generation_config.eos_token_ids
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = (tokenizer.eos_token_id,)  # no generation_config.json: the tokenizer's EOS, as transformers does
        self.eos_token_ids = tuple(eos)

        bs = config.block_size
        per_block = kv_block_bytes(model, bs) + (kv_block_bytes(draft_model, bs) if draft_model is not None else 0)
        need = -(-self.max_model_len // bs)  # blocks of one sequence at full length
        budget = config.kv_cache_memory
        if budget is None:
            budget = min(int(available_memory(self.device) * DEFAULT_KV_CACHE_FRACTION),
                         config.max_num_seqs * need * per_block)
        num_blocks = budget // per_block
        if num_blocks < need:
            message = (f"max_model_len {self.max_model_len} needs {need} KV-cache blocks of {bs} tokens "
                       f"({need * per_block / 2**20:.1f} MiB), but the KV cache budget of {budget / 2**20:.1f} MiB "
                       f"holds {num_blocks}")
            if config.max_model_len is not None or num_blocks == 0:
                raise ValueError(f"{message}: raise kv_cache_memory (--kv-cache-memory) or lower max_model_len "
                                 f"(--max-model-len)")
            # No length was asked for (a 128k-context checkpoint on a CPU): serve what the budget holds.
            self.max_model_len = num_blocks * bs
            log.warning("%s: serving sequences of up to %d tokens (set kv_cache_memory for more)", message,
                        self.max_model_len)
        dtype = model.model.embed_tokens.weight.dtype
        self.kv_caches = allocate_kv_cache(model.config, num_blocks, bs, dtype, self.device)
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.proposer = None
        if config.speculative == "draft":
            if draft_model is None:
                raise ValueError("draft_model: speculative='draft' needs the draft model")
            self.proposer = DraftModelProposer(draft_model, num_blocks, bs, self.device)
        elif config.speculative == "ngram":
            self.proposer = NgramProposer(config.ngram_min, config.ngram_max)
        self.requests: dict[str, Request] = {}
        self._aborted: list[RequestOutput] = []
        # The engine's own monotonic totals; stats() adds the scheduler's and the KV cache's.
        self.totals = EngineStats(spec_accepted_per_position=[0] * config.lookahead)

    def _max_model_len(self, model, draft_model) -> int:
        limit = model.config.max_position_embeddings
        if draft_model is not None:
            limit = min(limit, draft_model.config.max_position_embeddings)
            if draft_model.config.vocab_size != model.config.vocab_size:
                raise ValueError(f"draft_model: its vocabulary ({draft_model.config.vocab_size}) differs from the "
                                 f"target's ({model.config.vocab_size}); a draft model must share the tokenizer")
        wanted = self.config.max_model_len
        if wanted is not None and wanted > limit:
            raise ValueError(f"max_model_len: {wanted} exceeds the model's max_position_embeddings ({limit})")
        return wanted or limit

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, dtype: torch.dtype | None = None,
                        quant: str | None = None, device: str | torch.device = "cpu") -> "Engine":
        config = config or EngineConfig()
        path = Path(path)
        model = load_model(path, dtype=dtype, device=device, quant=quant)
        draft = None
        if config.draft_model is not None:
            draft = load_model(config.draft_model, dtype=model.model.embed_tokens.weight.dtype, device=device)
        return cls(model, Tokenizer.from_pretrained(path), GenerationConfig.from_pretrained(path), config, draft)

    # ---- requests ----

    def resolve_params(self, prompt_len: int, params: SamplingParams | None) -> SamplingParams:
        """params with max_tokens filled in: the checkpoint's max_new_tokens, else the rest of the model's length."""
        params = params or self.generation_config.sampling_params()
        if params.max_tokens is None:
            default = self.generation_config.max_new_tokens or self.max_model_len - prompt_len
            params = dataclasses.replace(params, max_tokens=max(1, min(default, self.max_model_len - prompt_len)))
        return params

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams | None) -> SamplingParams:
        """The request's params with max_tokens resolved; ValueError (its message is the HTTP 400's) if it cannot
        run: an empty prompt, token ids outside the vocabulary, prompt + max_tokens beyond the model's length."""
        ids = prompt_token_ids
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                             f"prompt has {len(ids)} tokens, leaving no room for a completion. Please reduce the "
                             f"length of the prompt.")
        params = self.resolve_params(len(ids), params)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, {params.max_tokens} for the "
                f"completion). Please reduce the length of the prompt or the completion.")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n: {params.n} samples exceed the engine's max_num_seqs ({self.config.max_num_seqs})")
        if self.tokenizer is None and params.stop_strings:
            raise ValueError("stop: stop strings need a tokenizer")
        return params

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        """Queue a request (ValueError for a bad one, QueueFullError when max_waiting requests wait already)."""
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        ids = token_id_list(prompt_token_ids)
        params = self.check_request(ids, params)
        if self.scheduler.num_waiting_requests >= self.config.max_waiting:
            raise QueueFullError(f"the server is busy: {self.config.max_waiting} requests are waiting already")
        request = Request(request_id, ids, params)
        seq = self._new_sequence(request, 0, sample_seeds(params)[0])  # before the request counts as running
        self.requests[request_id] = request
        self.totals.prompt_tokens += len(ids)
        self.scheduler.add(seq)

    def _new_sequence(self, request: Request, index: int, seed: int | None) -> Sequence:
        params = dataclasses.replace(request.params, seed=seed)
        stream = OutputStream(self.tokenizer or _NoText(), params, request.prompt_ids, self.eos_token_ids)
        seq = Sequence(request, index, stream, make_generator(params, self.device),
                       logprobs=None if params.logprobs is None else [])
        request.seqs.append(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; its last RequestOutput (finish_reason "abort") comes with the next
        step. Unknown or finished ids are ignored (the request may have just finished)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        deltas = []
        for seq in request.seqs:
            if not seq.stream.finished:
                self.scheduler.finish(seq)
                seq.stream.finish_reason = "abort"
                deltas.append(SampleDelta(seq.index, "", [], None if seq.logprobs is None else [], "abort"))
        logprobs = None if request.params.logprobs is None else []
        for index in range(len(request.seqs), request.params.n):  # samples the prompt's prefill had yet to fork
            deltas.append(SampleDelta(index, "", [], logprobs, "abort"))
        self._aborted.append(RequestOutput(request_id, deltas, True, len(request.prompt_ids),
                                           request.num_cached_tokens))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._aborted)

    def stats(self) -> EngineStats:
        return dataclasses.replace(
            self.totals, num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage, prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits, num_preemptions=self.scheduler.num_preemptions,
            spec_accepted_per_position=list(self.totals.spec_accepted_per_position))

    # ---- the step ----

    def step(self, on_model_start: Callable[[], None] | None = None) -> list[RequestOutput]:
        """One engine step: schedule, run the model over the scheduled tokens, sample, and return the outputs of
        the requests that advanced (and of those aborted since the last step). on_model_start is called once the
        step's input is built, just before the model runs (not at all when nothing is scheduled)."""
        t0 = time.perf_counter()
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return outputs
        decoding = [bool(s.seq.output_ids) for s in plan.scheduled]
        self._copy_blocks(plan.copies)
        drafts = self._propose(plan.scheduled)
        chunks = []
        for s, draft in zip(plan.scheduled, drafts):
            seq, start = s.seq, s.seq.num_computed
            tokens = seq.token_slice(start, start + s.num_tokens) + draft.tokens
            chunks.append(SequenceChunk(tokens, start, seq.blocks, num_logits=(1 + len(draft.tokens)) * s.completes))
        step_input = build_step_input(chunks, self.config.block_size, self.device)
        if on_model_start is not None:
            on_model_start()
        logits = self.model.step(step_input, self.kv_caches)

        # Each completing sequence's rows of logits: one, or 1 + its draft tokens.
        plain, plain_rows, speculated, row = [], [], [], 0
        for s, draft in zip(plan.scheduled, drafts):
            completes = s.completes
            s.seq.num_computed += s.num_tokens
            if not completes:
                self.scheduler.commit(s.seq)
                continue
            if draft.tokens:
                speculated.append((s.seq, draft, row))
            else:
                for seq in self._fork(s.seq):
                    plain.append(seq)
                    plain_rows.append(row)
            row += 1 + len(draft.tokens)
        emitted: dict[Sequence, list[int]] = {}
        if plain:
            for seq, token in zip(plain, self._sample(plain, _rows(logits, plain_rows))):
                emitted[seq] = [token]
        if speculated:
            emitted.update(self._verify(speculated, logits))
        outputs += self._emit(emitted)
        elapsed = time.perf_counter() - t0
        for s, decoded in zip(plan.scheduled, decoding):
            if decoded:
                s.seq.decode_s += elapsed
            else:
                for seq in s.seq.request.seqs if s.seq.index == 0 else [s.seq]:  # forks share the prefill
                    seq.prefill_s += elapsed
        return outputs

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches + (self.proposer.kv_caches if self.proposer else []):
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def _propose(self, scheduled: list[Scheduled]) -> list[Draft]:
        drafts = [Draft([], None)] * len(scheduled)
        wanted = [(i, s.seq, s.lookahead) for i, s in enumerate(scheduled) if s.lookahead and s.completes]
        if self.proposer is not None and wanted:
            for (i, _, _), draft in zip(wanted, self.proposer.propose([(seq, k) for _, seq, k in wanted])):
                drafts[i] = draft
        return drafts

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """The sequence, and when it is the first sample of a request with n > 1 that just finished its prompt,
        the request's other samples: they share its blocks (copied when written) and pick their first tokens
        from the same logits."""
        request = seq.request
        if seq.index != 0 or len(request.seqs) == request.params.n:
            return [seq]
        forks = []
        for index, seed in enumerate(sample_seeds(request.params)[1:], start=1):
            fork = self._new_sequence(request, index, seed)
            fork.blocks, fork.block_keys = list(seq.blocks), list(seq.block_keys)
            fork.num_computed = seq.num_computed
            self.kv.acquire(fork.blocks)
            forks.append(fork)
        at = self.scheduler.running.index(seq) + 1
        self.scheduler.running[at:at] = forks
        return [seq, *forks]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Each sequence's next token from its row of logits; the sequences wanting logprobs record them."""
        params = [s.stream.params for s in seqs]
        tokens = sample(logits, params, [s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
                        generators=[s.generator for s in seqs])
        self._record_logprobs(seqs, logits, tokens)
        return tokens.tolist()

    def _record_logprobs(self, seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> None:
        rows = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        if not rows:
            return
        index = torch.tensor(rows, device=logits.device)
        num_top = max(seqs[i].stream.params.logprobs for i in rows)
        lp = compute_logprobs(logits.index_select(0, index), tokens.index_select(0, index), num_top)
        token, rank, top, top_ids = lp.token.tolist(), lp.rank.tolist(), lp.top.tolist(), lp.top_ids.tolist()
        for j, i in enumerate(rows):
            k = seqs[i].stream.params.logprobs
            top_k = list(zip(top_ids[j][:k], top[j][:k]))
            seqs[i].logprobs.append(TokenLogprob(int(tokens[i]), token[j], rank[j], top_k))

    def _verify(self, speculated, logits: torch.Tensor) -> dict[Sequence, list[int]]:
        """Exact speculative sampling over each sequence's 1 + k rows of target logits."""
        seqs = [seq for seq, _, _ in speculated]
        drafts = [draft for _, draft, _ in speculated]
        target = _rows(logits, [r for _, d, row in speculated for r in range(row, row + 1 + len(d.tokens))])
        out, at = {}, 0
        for seq, draft, tokens in zip(seqs, drafts, verify(target, drafts, seqs)):
            accepted = len(tokens) - 1
            seq.num_computed += accepted  # the accepted draft tokens' keys and values are in the cache
            self.proposer.rollback(seq)
            totals = self.totals
            totals.spec_rounds += 1
            totals.spec_drafted += len(draft.tokens)
            totals.spec_accepted += accepted
            for i in range(accepted):
                totals.spec_accepted_per_position[i] += 1
            if seq.logprobs is not None:  # token j was picked from row j of the target's raw logits
                picked = torch.tensor(tokens, device=logits.device)
                self._record_logprobs([seq] * len(tokens), target[at : at + len(tokens)], picked)
            at += 1 + len(draft.tokens)
            out[seq] = tokens
        return out

    def _emit(self, emitted: dict[Sequence, list[int]]) -> list[RequestOutput]:
        """Feed the new tokens to the streams; finished sequences free their blocks."""
        by_request: dict[Request, list[SampleDelta]] = {}
        for seq, tokens in emitted.items():
            text, used = "", 0
            before = None if seq.logprobs is None else len(seq.logprobs) - len(tokens)
            for token in tokens:  # max_tokens ends a sequence before the model's length (check_request)
                delta, finished = seq.stream.append(token)
                text += delta
                used += 1
                if finished:
                    break
            self.totals.generation_tokens += used
            logprobs = None
            if seq.logprobs is not None:
                del seq.logprobs[before + used :]  # tokens after a stop were never emitted
                logprobs = seq.logprobs[before:]
            if seq.stream.finished:
                self.scheduler.finish(seq)
            else:
                self.scheduler.commit(seq)
            by_request.setdefault(seq.request, []).append(
                SampleDelta(seq.index, text, tokens[:used], logprobs, seq.stream.finish_reason, seq.stream.stop_reason))
        outputs = []
        for request, deltas in by_request.items():
            finished = request.finished
            if finished:
                del self.requests[request.request_id]
            outputs.append(RequestOutput(request.request_id, deltas, finished, len(request.prompt_ids),
                                         request.num_cached_tokens))
        return outputs
