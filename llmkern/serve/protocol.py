"""Request and response bodies of the OpenAI-compatible API (the shapes of openai-python's types: Completion,
ChatCompletion, ChatCompletionChunk, CompletionUsage; vLLM's extra sampling fields).

Requests ignore unknown fields (clients send many) but reject known fields of the wrong type. Fields the server
cannot honour and that would change the result (best_of > 1, suffix, logit_bias, tools, ...) are refused by
`unsupported()` instead of being silently dropped. Value checks (temperature >= 0, max_tokens >= 1, ...) are
SamplingParams' own, so the server and `llmkern generate` say the same thing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmkern.generation import SamplingParams

# The most top log-probabilities per token a request may ask for (OpenAI allows 20 for chat, 5 for completions).
MAX_LOGPROBS = 20

# Request fields that map one to one onto SamplingParams (None: the request left it unset).
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos",
                    "include_stop_str_in_output", "skip_special_tokens")  # fmt: skip


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = False


class _SamplingRequest(_Request):
    """The sampling fields completions and chat share. Unset fields take the checkpoint's generation_config
    values (temperature, top_p, top_k, min_p, repetition_penalty), else SamplingParams' defaults, which are
    OpenAI's (temperature 1, top_p 1): vLLM's behaviour."""

    model: str | None = None  # None: the served model
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> tuple[str, str] | None:
        """The first field set to a value this server cannot honour, as (message, param), else None."""
        if self.logit_bias:
            return "logit_bias is not supported", "logit_bias"
        if self.stream_options is not None and not self.stream:
            return "stream_options is only allowed with stream: true", "stream_options"
        return None

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict | None = None) -> SamplingParams:
        """The request's SamplingParams: its set fields over `defaults` (the checkpoint's sampling values) over
        SamplingParams' own. Raises ValueError (SamplingParams' message, naming the field) for out-of-range values."""
        values = {name: getattr(self, name) for name in _SAMPLING_FIELDS if getattr(self, name) is not None}
        return SamplingParams(**{**(defaults or {}), **values}, max_tokens=max_tokens, logprobs=logprobs)


class CompletionRequest(_SamplingRequest):
    # A prompt, several prompts, a prompt of token ids, or several of them.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self):
        if self.best_of is not None and self.best_of > 1:
            return "best_of > 1 is not supported (ask for n completions instead)", "best_of"
        if self.suffix:
            return "suffix is not supported", "suffix"
        if self.echo and self.logprobs is not None:
            return "echo with logprobs is not supported (the server does not score prompt tokens)", "echo"
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            return f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs"
        return super().unsupported()


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_role(self) -> str:
        """The role the chat template sees: OpenAI's "developer" messages are the system messages of its newer
        models, and chat templates know only "system"."""
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        """The content as one string: text parts joined by newlines, as vLLM does."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self):
        if self.tools or self.functions:
            return "tools and functions are not supported", "tools" if self.tools else "functions"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format other than text is not supported", "response_format"
        if self.top_logprobs is not None:
            if not self.logprobs:
                return "top_logprobs needs logprobs: true", "top_logprobs"
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                return f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}", "top_logprobs"
        return super().unsupported()


# ---- responses ----
class _Response(BaseModel):
    pass


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[TokenLogprob]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmkern"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


class TextChunks:
    """The JSON of one request's streamed chunks that carry a choice's text alone (no logprobs):
    `render(index, text, finish_reason)` returns what `dump(index, text, finish_reason)` does (a chunk model's
    model_dump_json), joined from that dump's own parts. Building and dumping the models took ~10 us a streamed
    token, most of what the event loop spent on a chunk besides the socket; the parts take ~2.5.

    The parts are cut out of dumps of sentinel values: two indices differ in one place, and the text and the
    reason are private-use characters, which JSON leaves as they are (json.dumps and pydantic escape every other
    character alike, tests/serve/test_protocol.py). If a fixed field (id, model name) dumps as a sentinel does,
    or a rendered probe differs from its dump, render is dump itself."""

    _TEXT, _REASON = "\ue000", "\ue001"

    def __init__(self, dump: Callable[[int, str, str | None], str]):
        self.render = dump
        text, reason = f'"{self._TEXT}"', f'"{self._REASON}"'  # as the dumps write them
        first, other, ended = dump(0, self._TEXT, None), dump(7, self._TEXT, None), dump(0, self._TEXT, self._REASON)
        at = next((i for i, (a, b) in enumerate(zip(first, other)) if a != b), None)
        if (at is None or len(first) != len(other) or first.count(text) != 1 or ended.count(reason) != 1
                or not first[:at].endswith(":")):
            return
        self._head = first[:at]  # ... "index":
        self._to_text, self._unfinished = first[at + 1:].split(text)
        self._to_reason, self._end = ended.split(text)[1].split(reason)
        probes = ((13, 'a"b\\c\n\x01\u2028 é😀', None), (2, "", "stop"))
        if all(self._render(*p) == dump(*p) for p in probes):
            self.render = self._render

    def _render(self, index: int, text: str, finish_reason: str | None) -> str:
        tail = self._unfinished if finish_reason is None else (
            self._to_reason + json.dumps(finish_reason, ensure_ascii=False) + self._end)
        return f"{self._head}{index}{self._to_text}{json.dumps(text, ensure_ascii=False)}{tail}"
