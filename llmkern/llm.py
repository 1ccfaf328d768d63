"""`llmkern.LLM`: offline generation for a batch of prompts on a Hugging Face checkpoint directory.

    llm = LLM("path/to/hf_dir", dtype="bfloat16", quant="int4")
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    for piece in (stream := llm.stream("Once upon a time", SamplingParams(seed=0))):
        print(piece, end="")                       # stream.output: the finished GenerationOutput

Each generate call drives the model's serving step (model.step) over a paged KV cache: every prompt is
prefilled on its own (in chunks of at most `max_prefill_tokens`), then all unfinished requests decode
together, one token each per step, until each meets its stop condition (EOS from generation_config, a
stop token or string, max_tokens, or the model's length). SamplingParams.n > 1 samples n completions of
a prompt: it is prefilled once and its KV blocks copied to the other n - 1. logprobs: each generated
token's log-probability, rank and the top ones (llmkern.generation.compute_logprobs: the model's raw
distribution, before penalties and warpers, as vLLM). Sampling, stop strings and incremental
detokenization are llmkern.generation's; blocks are handed out as sequences grow and returned when
they finish. (The continuous-batching serving engine is a later issue; this is its single-batch core.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from llmkern.generation import (GenerationConfig, OutputStream, SamplingParams, TokenLogprob, Tokenizer,  # noqa: F401
                                compute_logprobs, make_generator, sample, sample_seeds)
from llmkern.models import SequenceChunk, allocate_kv_cache, build_step_input, load_model

# Spellings accepted for dtype (the CLI passes these strings through).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}  # fmt: skip
# max_tokens when neither the request nor the checkpoint's generation_config sets one (vLLM's default).
DEFAULT_MAX_TOKENS = 16


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype: expected one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")


@dataclasses.dataclass
class GenerationOutput:
    """One completion's result. prefill_s: time of its prompt's steps (they also pick the first token);
    decode_s: time of the decode steps it took part in (shared with the batch's other requests).
    prompt_index / sample_index: which prompt, and which of its SamplingParams.n samples.
    logprobs: one TokenLogprob per generated token when SamplingParams.logprobs is set, else None."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or string) or "length" (max_tokens or the model's length)
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_index: int = 0
    sample_index: int = 0
    logprobs: list[TokenLogprob] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.num_prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens of the decode steps (all but the first, which the prefill picks) per second."""
        return (self.num_generated_tokens - 1) / self.decode_s if self.decode_s else float("nan")


class BlockAllocator:
    """Free list of KV-cache block ids: `allocate(n)` hands out n of them, `free(ids)` takes them back."""

    def __init__(self, num_blocks: int):
        self.free_ids = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise RuntimeError(f"KV cache: {n} blocks wanted, {len(self.free_ids)} free")
        return [self.free_ids.pop() for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        self.free_ids += reversed(ids)


class _NoText:
    """The tokenizer of an LLM built without one (token ids in and out): every token decodes to ""."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


@dataclasses.dataclass
class _Request:
    index: int  # in the returned list
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stream: OutputStream
    generator: torch.Generator | None
    prompt_index: int = 0
    sample_index: int = 0  # > 0: a further sample of its prompt (sample 0 prefills, this one copies the KV)
    blocks: list[int] = dataclasses.field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    logprobs: list[TokenLogprob] | None = None

    @property
    def length(self) -> int:  # tokens in the sequence so far (prompt + generated)
        return len(self.prompt_ids) + len(self.stream.token_ids)

    def output(self) -> GenerationOutput:
        s = self.stream
        return GenerationOutput(self.prompt, self.prompt_ids, s.text, s.token_ids, s.finish_reason, s.stop_reason,
                                self.prefill_s, self.decode_s, self.prompt_index, self.sample_index,
                                None if self.logprobs is None else list(self.logprobs))


class GenerationStream:
    """Iterating yields one request's text pieces as they are generated; afterwards `output` holds its
    GenerationOutput."""

    def __init__(self, events: Iterator[tuple[int, str]], outputs: list):
        self._events, self._outputs = events, outputs
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        for _, text in self._events:
            if text:
                yield text
        self.output = self._outputs[0]


class LLM:
    """A model, its tokenizer and its generation_config, ready to generate. `path`: a Hugging Face
    checkpoint directory (quantized ones included: GPTQ, AWQ, `llmkern quantize` output); dtype: a torch.dtype
    or its name (default: config.json's dtype); quant: None, "nf4", "int4" or "int8" (quantized at load time)."""

    def __init__(self, path: str | Path, dtype=None, quant: str | None = None, device: str | torch.device = "cpu",
                 block_size: int = 16, max_prefill_tokens: int = 2048):
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a model directory")
        model = load_model(path, dtype=parse_dtype(dtype), device=device, quant=quant)
        self._setup(model, Tokenizer.from_pretrained(path), GenerationConfig.from_pretrained(path), block_size,
                    max_prefill_tokens)

    @classmethod
    def from_model(cls, model, tokenizer: Tokenizer | None = None, generation_config: GenerationConfig | None = None,
                   block_size: int = 16, max_prefill_tokens: int = 2048) -> "LLM":
        """An LLM over an already built model (benchmarks, tests). Without a tokenizer, prompts must be
        token ids and outputs carry token ids only (text ""; stop strings are refused)."""
        llm = cls.__new__(cls)
        llm._setup(model, tokenizer, generation_config or GenerationConfig(), block_size, max_prefill_tokens)
        return llm

    def _setup(self, model, tokenizer, generation_config, block_size, max_prefill_tokens):
        if block_size <= 0 or max_prefill_tokens <= 0:
            raise ValueError(f"block_size, max_prefill_tokens: expected positive ints, got {block_size}, "
                             f"{max_prefill_tokens}")
        self.model, self.tokenizer, self.generation_config = model, tokenizer, generation_config
        self.block_size, self.max_prefill_tokens = block_size, max_prefill_tokens
        self.max_model_len = model.config.max_position_embeddings
        eos = generation_config.eos_token_ids
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = (tokenizer.eos_token_id,)  # no generation_config.json: the tokenizer's EOS, as transformers does
        self.eos_token_ids = tuple(eos)
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._kv_blocks = 0

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    # ---- public API ----

    def generate(self, prompts: str | Sequence[str] | None = None, params: SamplingParams | Sequence | None = None,
                 *, prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> list[GenerationOutput]:
        """One GenerationOutput per prompt and sample, in order (a prompt whose SamplingParams.n > 1 gives its
        n samples in a row). prompts: text (encoded with the tokenizer's special tokens, BOS included where it
        adds one), or prompt_token_ids instead. params: one SamplingParams for all or one per prompt (default:
        the checkpoint's generation_config). on_text(index, piece) is called with each output's text as it is
        generated (index: the output's position in the returned list)."""
        requests = self._requests(prompts, params, prompt_token_ids)
        for index, text in self._run(requests):
            if on_text is not None and text:
                on_text(index, text)
        return [r.output() for r in requests]

    def stream(self, prompt: str | None = None, params: SamplingParams | None = None, *,
               prompt_token_ids: Sequence[int] | None = None) -> GenerationStream:
        """One prompt's text pieces as an iterator (GenerationStream); its `output` is set at the end."""
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("stream: pass either prompt or prompt_token_ids")
        requests = self._requests(None if prompt is None else [prompt], None if params is None else [params],
                                  None if prompt_token_ids is None else [prompt_token_ids])
        if len(requests) > 1:
            raise ValueError("stream: n > 1 gives several outputs; use generate(..., on_text=...)")
        outputs: list[GenerationOutput] = []

        def events():
            yield from self._run(requests)
            outputs.append(requests[0].output())

        return GenerationStream(events(), outputs)

    def chat(self, messages, params: SamplingParams | Sequence | None = None, *,
             on_text: Callable[[int, str], None] | None = None, **template_kwargs) -> list[GenerationOutput]:
        """Generate the assistant's reply to a conversation ([{"role": ..., "content": ...}, ...]) or to each
        of a list of conversations, rendered by the tokenizer's chat template."""
        return self.generate(None, params, prompt_token_ids=self.chat_token_ids(messages, **template_kwargs),
                             on_text=on_text)

    def chat_token_ids(self, messages, **template_kwargs) -> list[list[int]]:
        """The prompt token ids of a conversation, or of each of a list of conversations."""
        if self.tokenizer is None:
            raise ValueError("chat: this LLM has no tokenizer")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, **template_kwargs)
                for c in conversations]

    # ---- requests ----

    def _requests(self, prompts, params, prompt_token_ids) -> list[_Request]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("generate: pass either prompts or prompt_token_ids")
        if prompts is not None:
            if self.tokenizer is None:
                raise ValueError("prompts: this LLM has no tokenizer; pass prompt_token_ids")
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = self.tokenizer.encode_batch(texts)
        else:
            texts, ids = [None] * len(prompt_token_ids), [list(map(int, p)) for p in prompt_token_ids]
        if not ids:
            raise ValueError("generate: no prompts given")
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"params: expected one SamplingParams or one per prompt ({len(ids)}), got {len(params)}")
        vocab = self.model.config.vocab_size
        requests: list[_Request] = []
        for i, (text, p_ids, p) in enumerate(zip(texts, ids, params)):
            if not p_ids:
                raise ValueError(f"prompts[{i}]: empty prompt (no tokens)")
            if min(p_ids) < 0 or max(p_ids) >= vocab:
                raise ValueError(f"prompts[{i}]: token ids must be in [0, {vocab}), got {min(p_ids)}..{max(p_ids)}")
            if len(p_ids) >= self.max_model_len:
                raise ValueError(f"prompts[{i}]: {len(p_ids)} tokens leave no room in the model's length "
                                 f"{self.max_model_len}")
            p = self._resolve(p)
            if self.tokenizer is None and p.stop_strings:
                raise ValueError(f"params[{i}].stop: stop strings need a tokenizer")
            for j, seed in enumerate(sample_seeds(p)):
                sample_params = dataclasses.replace(p, seed=seed)
                stream = OutputStream(self.tokenizer or _NoText(), sample_params, p_ids, self.eos_token_ids)
                requests.append(_Request(len(requests), text, p_ids, sample_params, stream,
                                         make_generator(sample_params, self.device), prompt_index=i, sample_index=j,
                                         logprobs=None if p.logprobs is None else []))
        return requests

    def _resolve(self, params: SamplingParams | None) -> SamplingParams:
        """The request's params with max_tokens filled in (checkpoint's max_new_tokens, else 16)."""
        if params is None:
            params = self.generation_config.sampling_params()
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.generation_config.max_new_tokens or DEFAULT_MAX_TOKENS)
        return params

    # ---- the generation loop ----

    def _kv_cache(self, requests: list[_Request]):
        """A KV cache with room for every request at its longest (kept for later calls when large enough)."""
        need = sum(-(-min(len(r.prompt_ids) + r.params.max_tokens, self.max_model_len) // self.block_size)
                   for r in requests)
        if self._kv is None or self._kv_blocks < need:
            self._kv = None  # free the old cache before allocating the new one
            dtype = self.model.model.embed_tokens.weight.dtype
            self._kv = allocate_kv_cache(self.model.config, need, self.block_size, dtype, self.device)
            self._kv_blocks = need
        return self._kv, BlockAllocator(self._kv_blocks)

    def _grow(self, r: _Request, length: int, allocator: BlockAllocator) -> None:
        more = -(-length // self.block_size) - len(r.blocks)
        if more > 0:
            r.blocks += allocator.allocate(more)

    def _pick(self, requests: list[_Request], logits: torch.Tensor) -> list[int]:
        """Each request's next token from its row of logits; the requests wanting logprobs record them."""
        # Each request's prompt and output so far: read only by the requests that set a penalty.
        tokens = sample(logits, [r.params for r in requests], [r.prompt_ids for r in requests],
                        [r.stream.token_ids for r in requests], generators=[r.generator for r in requests])
        rows = [i for i, r in enumerate(requests) if r.logprobs is not None]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            lp = compute_logprobs(logits[index], tokens[index], max(requests[i].params.logprobs for i in rows))
            token, rank, top, top_ids = lp.token.tolist(), lp.rank.tolist(), lp.top.tolist(), lp.top_ids.tolist()
            for j, i in enumerate(rows):
                k = requests[i].params.logprobs
                requests[i].logprobs.append(TokenLogprob(int(tokens[i]), token[j], rank[j],
                                                         list(zip(top_ids[j][:k], top[j][:k]))))
        return tokens.tolist()

    def _share_prompt(self, source: _Request, r: _Request, kv, allocator: BlockAllocator) -> None:
        """r's prompt KV = source's (the same prompt, just prefilled): its own blocks, copied."""
        self._grow(r, len(r.prompt_ids), allocator)
        src = torch.tensor(source.blocks[: len(r.blocks)], device=self.device)
        dst = torch.tensor(r.blocks, device=self.device)
        for k_cache, v_cache in kv:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def _accept(self, r: _Request, token: int, allocator: BlockAllocator) -> tuple[int, str]:
        text, finished = r.stream.append(token)
        if not finished and r.length >= self.max_model_len:
            text += r.stream.finish("length")  # the model's context is full
        if r.stream.finished:
            allocator.free(r.blocks)
            r.blocks = []
        return r.index, text

    def _run(self, requests: list[_Request]) -> Iterator[tuple[int, str]]:
        """Generates every request to its end, yielding (request index, text piece) as text appears."""
        kv, allocator = self._kv_cache(requests)
        step = lambda chunks: self.model.step(build_step_input(chunks, self.block_size, self.device), kv)  # noqa: E731
        # Prefill, prompt by prompt, in chunks; a prompt's further samples copy its KV blocks and pick their
        # first tokens from the same logits (before any of them can finish and free its blocks).
        groups = [[r] for r in requests if r.sample_index == 0]
        for r in requests:
            if r.sample_index > 0:
                groups[r.prompt_index].append(r)
        for group in groups:
            t0 = time.perf_counter()
            first, ids = group[0], group[0].prompt_ids
            for start in range(0, len(ids), self.max_prefill_tokens):
                end = min(start + self.max_prefill_tokens, len(ids))
                self._grow(first, end, allocator)
                logits = step([SequenceChunk(ids[start:end], start, first.blocks, num_logits=int(end == len(ids)))])
            for r in group[1:]:
                self._share_prompt(first, r, kv, allocator)
            tokens = self._pick(group, logits.expand(len(group), -1))
            for r, token in zip(group, tokens):
                r.prefill_s = time.perf_counter() - t0
                yield self._accept(r, token, allocator)
        running = [r for r in requests if not r.stream.finished]
        while running:
            t0 = time.perf_counter()
            chunks = []
            for r in running:
                self._grow(r, r.length, allocator)
                chunks.append(SequenceChunk([r.stream.token_ids[-1]], r.length - 1, r.blocks))
            tokens = self._pick(running, step(chunks))
            elapsed = time.perf_counter() - t0
            for r, token in zip(running, tokens):
                r.decode_s += elapsed
                yield self._accept(r, token, allocator)
            running = [r for r in running if not r.stream.finished]
