"""`llmkern.LLM`: offline generation for a batch of prompts on a Hugging Face checkpoint directory.

    llm = LLM("path/to/hf_dir", dtype="bfloat16", quant="int4")
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    for piece in (stream := llm.stream("Once upon a time", SamplingParams(seed=0))):
        print(piece, end="")                       # stream.output: the finished GenerationOutput

Each generate call runs its requests through the serving engine (llmkern.serve.Engine: continuous batching
over a paged KV cache, chunked prefill, prefix caching) until each meets its stop condition (EOS from
generation_config, a stop token or string, max_tokens, or the model's length). SamplingParams.n > 1 samples n
completions of a prompt: it is prefilled once and the other n - 1 share its KV blocks. logprobs: each generated
token's log-probability, rank and the top ones (llmkern.generation.compute_logprobs: the model's raw
distribution, before penalties and warpers, as vLLM). Sampling, stop strings and incremental detokenization
are llmkern.generation's.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from llmkern.generation import GenerationConfig, SamplingParams, TokenLogprob, Tokenizer, sample_seeds  # noqa: F401
from llmkern.serve.config import EngineConfig
from llmkern.serve.engine import Engine, token_id_list

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


class GenerationStream:
    """Iterating yields one request's text pieces as they are generated; afterwards `output` holds its
    GenerationOutput."""

    def __init__(self, events: Iterator[tuple[int, str]], outputs: list):
        self._events, self._outputs = events, outputs
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for _, text in self._events:
                if text:
                    yield text
        finally:  # a loop left early (break, an exception) ends the request here: its KV blocks come back
            self.close()
        self.output = self._outputs[0]

    def close(self) -> None:
        """Ends the request now (an iterator kept half-read holds its KV blocks until then)."""
        self._events.close()


class LLM:
    """A model, its tokenizer and its generation_config, ready to generate. `path`: a Hugging Face
    checkpoint directory (quantized ones included: GPTQ, AWQ, `llmkern quantize` output); dtype: a torch.dtype
    or its name (default: config.json's dtype); quant: None, "nf4", "int4" or "int8" (quantized at load time).
    max_prefill_tokens: the engine's per-step token budget; engine_options: further EngineConfig fields
    (max_model_len, kv_cache_memory, enable_prefix_caching, speculative, draft_model, ...)."""

    def __init__(self, path: str | Path, dtype=None, quant: str | None = None, device: str | torch.device = "cpu",
                 block_size: int = 16, max_prefill_tokens: int = 2048, **engine_options):
        config = _engine_config(block_size, max_prefill_tokens, engine_options)
        self._setup(Engine.from_pretrained(path, config, dtype=parse_dtype(dtype), quant=quant, device=device))

    @classmethod
    def from_model(cls, model, tokenizer: Tokenizer | None = None, generation_config: GenerationConfig | None = None,
                   block_size: int = 16, max_prefill_tokens: int = 2048, **engine_options) -> "LLM":
        """An LLM over an already built model (benchmarks, tests). Without a tokenizer, prompts must be
        token ids and outputs carry token ids only (text ""; stop strings are refused)."""
        llm = cls.__new__(cls)
        config = _engine_config(block_size, max_prefill_tokens, engine_options)
        llm._setup(Engine(model, tokenizer, generation_config, config))
        return llm

    def _setup(self, engine: Engine):
        self.engine = engine
        self.model, self.tokenizer, self.generation_config = engine.model, engine.tokenizer, engine.generation_config
        self.max_model_len, self.eos_token_ids = engine.max_model_len, engine.eos_token_ids
        self._request_ids = itertools.count()

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # ---- public API ----

    def generate(self, prompts: str | Sequence[str] | None = None, params: SamplingParams | Sequence | None = None,
                 *, prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> list[GenerationOutput]:
        """One GenerationOutput per prompt and sample, in order (a prompt whose SamplingParams.n > 1 gives its
        n samples in a row). prompts: text (encoded with the tokenizer's special tokens, BOS included where it
        adds one), or prompt_token_ids instead. params: one SamplingParams for all or one per prompt (default:
        the checkpoint's generation_config). on_text(index, piece) is called with each output's text as it is
        generated (index: the output's position in the returned list)."""
        outputs: list[GenerationOutput] = []
        for index, text in self._run(self._requests(prompts, params, prompt_token_ids), outputs):
            if on_text is not None and text:
                on_text(index, text)
        return outputs

    def stream(self, prompt: str | None = None, params: SamplingParams | None = None, *,
               prompt_token_ids: Sequence[int] | None = None) -> GenerationStream:
        """One prompt's text pieces as an iterator (GenerationStream); its `output` is set at the end."""
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("stream: pass either prompt or prompt_token_ids")
        requests = self._requests(None if prompt is None else [prompt], None if params is None else [params],
                                  None if prompt_token_ids is None else [prompt_token_ids])
        if requests[0][2].n > 1:
            raise ValueError("stream: n > 1 gives several outputs; use generate(..., on_text=...)")
        outputs: list[GenerationOutput] = []
        return GenerationStream(self._run(requests, outputs), outputs)

    def chat(self, messages, params: SamplingParams | Sequence | None = None, *,
             on_text: Callable[[int, str], None] | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, **template_kwargs) -> list[GenerationOutput]:
        """Generate the assistant's reply to a conversation ([{"role": ..., "content": ...}, ...]) or to each
        of a list of conversations, rendered by the tokenizer's chat template. As vLLM's LLM.chat:
        add_generation_prompt=False, continue_final_message=True continues the conversation's last message."""
        ids = self.chat_token_ids(messages, add_generation_prompt, continue_final_message, **template_kwargs)
        return self.generate(None, params, prompt_token_ids=ids, on_text=on_text)

    def chat_token_ids(self, messages, add_generation_prompt: bool = True, continue_final_message: bool = False,
                       **template_kwargs) -> list[list[int]]:
        """The prompt token ids of a conversation, or of each of a list of conversations."""
        if self.tokenizer is None:
            raise ValueError("chat: this LLM has no tokenizer")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                   continue_final_message=continue_final_message, **template_kwargs)
                for c in conversations]

    # ---- requests ----

    def _requests(self, prompts, params, prompt_token_ids) -> list[tuple[str | None, list[int], SamplingParams]]:
        """(text, token ids, checked params) per prompt."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("generate: pass either prompts or prompt_token_ids")
        if prompts is not None:
            if self.tokenizer is None:
                raise ValueError("prompts: this LLM has no tokenizer; pass prompt_token_ids")
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = self.tokenizer.encode_batch(texts)
        else:
            texts = [None] * len(prompt_token_ids)
            ids = [token_id_list(p, f"prompt_token_ids[{i}]") for i, p in enumerate(prompt_token_ids)]
        if not ids:
            raise ValueError("generate: no prompts given")
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"params: expected one SamplingParams or one per prompt ({len(ids)}), got {len(params)}")
        requests = []
        for i, (text, p_ids, p) in enumerate(zip(texts, ids, params)):
            try:
                requests.append((text, p_ids, self.engine.check_request(p_ids, self._resolve(p, len(p_ids)))))
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        return requests

    def _resolve(self, params: SamplingParams | None, prompt_len: int) -> SamplingParams:
        """The request's params with max_tokens filled in (checkpoint's max_new_tokens, else 16), and cut to the
        room the model's length leaves (such an output ends with finish_reason "length")."""
        if params is None:
            params = self.generation_config.sampling_params()
        max_tokens = params.max_tokens or self.generation_config.max_new_tokens or DEFAULT_MAX_TOKENS
        room = self.max_model_len - prompt_len
        return dataclasses.replace(params, max_tokens=min(max_tokens, room) if room > 0 else max_tokens)

    def _run(self, requests, outputs: list[GenerationOutput]) -> Iterator[tuple[int, str]]:
        """Runs the requests to their ends through the engine, filling `outputs` (one per prompt and sample) and
        yielding (output index, text piece) as text appears."""
        engine, handles = self.engine, {}
        if engine.has_unfinished_requests():  # their outputs would come back here, to no one
            raise RuntimeError("generate: a stream of this LLM is still open (read part-way): iterate it to its end "
                               "or close() it first")
        for prompt_index, (text, ids, params) in enumerate(requests):
            request_id = f"llm-{next(self._request_ids)}"
            engine.add_request(request_id, ids, params)
            handles[request_id] = (len(outputs), engine.requests[request_id])
            outputs += [GenerationOutput(text, ids, "", [], "", None, prompt_index=prompt_index, sample_index=j,
                                         logprobs=None if params.logprobs is None else []) for j in range(params.n)]
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    first = handles[out.request_id][0]
                    for d in out.deltas:
                        o = outputs[first + d.index]
                        o.text += d.text
                        o.token_ids += d.token_ids
                        if d.logprobs:
                            o.logprobs += d.logprobs
                        o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
                        yield first + d.index, d.text
        finally:  # an abandoned stream: its requests free their blocks
            for request_id in handles:
                engine.abort_request(request_id)
            while engine.has_unfinished_requests():
                engine.step()
        for first, request in handles.values():
            for seq in request.seqs:
                outputs[first + seq.index].prefill_s, outputs[first + seq.index].decode_s = seq.prefill_s, seq.decode_s


def _engine_config(block_size: int, max_prefill_tokens: int, options: dict) -> EngineConfig:
    if block_size <= 0 or max_prefill_tokens <= 0:
        raise ValueError(f"block_size, max_prefill_tokens: expected positive ints, got {block_size}, "
                         f"{max_prefill_tokens}")
    # Offline generation queues every prompt at once: no waiting-queue bound.
    return EngineConfig(block_size=block_size, max_num_batched_tokens=max_prefill_tokens, max_waiting=2**62,
                        **options)
