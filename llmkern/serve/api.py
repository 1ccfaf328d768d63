"""The OpenAI-compatible HTTP API over an AsyncEngine (vLLM's contract): /v1/completions, /v1/chat/completions
(both streamable as server-sent events), /v1/models, /health and /metrics.

    app = build_app(aengine, "demo-target", api_key=None)     # then serve it with uvicorn (llmkern.serve.server)

One HTTP request becomes one engine request per prompt (ids "<request id>-<prompt index>"), each with n samples;
choices are numbered prompt-major (prompt p's sample s is choice p * n + s). Whatever ends a request early (the
client disconnecting, an error while streaming) aborts its unfinished engine requests, so their KV blocks return
at once. Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}; nothing unexpected reaches
the client beyond a generic 500 (the traceback goes to the server log).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkern.serve.async_engine import EngineDeadError, EngineStoppedError
from llmkern.serve.engine import EngineStats, QueueFullError
from llmkern.serve.metrics import RequestTimer, ServerMetrics
from llmkern.serve.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                    ChatCompletionChunk, ChatCompletionRequest, ChatLogprobs, Completion,
                                    CompletionChoice, CompletionLogprobs, CompletionRequest, Delta, ErrorInfo,
                                    ErrorResponse, ModelCard, ModelList, TextChunks, TokenLogprob, TopLogprob, Usage)

log = logging.getLogger("llmkern.serve")

# Paths that answer without the API key and while draining (load balancers probe it).
OPEN_PATHS = ("/health",)


class APIError(Exception):
    """An error the client caused or must know about, sent as OpenAI's error JSON with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)


def internal_error() -> APIError:
    return APIError(500, "internal server error (see the server log)", "internal_server_error")


def engine_error(e: Exception) -> APIError:
    """The engine's refusals as HTTP errors (ValueError: the request is impossible, e.g. too long)."""
    if isinstance(e, QueueFullError):
        return APIError(429, f"server busy: {e}", "rate_limit_error", code="rate_limit_exceeded")
    if isinstance(e, EngineStoppedError):
        return APIError(503, "server is shutting down", "service_unavailable")
    if isinstance(e, EngineDeadError):
        return APIError(500, "the engine stopped after an error (see the server log)", "internal_server_error")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    log.error("unexpected engine error", exc_info=e)
    return internal_error()


class ServerState:
    """What the handlers share. aengine is None while the model loads (/health says 503)."""

    def __init__(self, aengine, served_model_name: str, api_key: str | None, chat_template: str | None):
        self.aengine = aengine
        self.served_model_name = served_model_name
        self.api_key = api_key
        self.chat_template = chat_template
        self.accepting = True  # False once SIGTERM starts the drain
        self.created = int(time.time())
        self.metrics = ServerMetrics(self._stats)

    def _stats(self):
        if self.aengine is None:
            return EngineStats()
        return self.aengine.stats()

    @property
    def engine(self):
        if self.aengine is None:
            raise APIError(503, "the model is still loading", "service_unavailable")
        return self.aengine.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{self.served_model_name!r}", param="model", code="model_not_found")


class Gate:
    """ASGI middleware in front of every route: the Bearer token (when an API key is set), the drain (new
    requests get 503 once SIGTERM arrived), and the last resort for unexpected errors (a generic 500, the traceback
    in the log; starlette's own handler would re-raise and reset the connection). Pure ASGI, so streaming and
    disconnect detection pass untouched."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] not in OPEN_PATHS:
            error = None
            if self.state.api_key is not None:
                header = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(header, f"Bearer {self.state.api_key}".encode()):
                    error = APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                     code="invalid_api_key")
            if error is None and not self.state.accepting:
                error = APIError(503, "server is shutting down", "service_unavailable")
            if error is not None:
                return await error.response()(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            log.exception("unexpected error in %s %s", scope.get("method"), scope["path"])
            if started:  # too late for a status: the connection closes
                raise
            await internal_error().response()(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    parts = [f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}" for e in errors[:3]]
    return "invalid request: " + "; ".join(parts), param


def _token_texts(tokenizer, logprobs) -> dict[int, str]:
    """Each token id of these TokenLogprobs (sampled and top) -> its text, decoded in one batch."""
    ids = list({i for lp in logprobs or () for i in (lp.token_id, *(t for t, _ in lp.top))})
    return dict(zip(ids, tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)))


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


class EngineRun:
    """One HTTP request's engine requests (one per prompt): started together, outputs merged as they arrive,
    and aborted together if the HTTP request ends first."""

    def __init__(self, state: ServerState, request_id: str, prompts: list[list[int]], params):
        self.aengine = state.aengine
        self.timer: RequestTimer = state.metrics.timer()
        self.n = params.n
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.completion_tokens = 0
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        try:
            self.streams = self.aengine.add_requests(list(zip(ids, prompts)), params)
        except Exception as e:
            raise engine_error(e) from None
        self.unfinished: dict[str, set[int]] = {rid: set(range(params.n)) for rid in ids}  # samples still going

    def abort(self) -> None:
        """Aborts what is still generating (its final outputs will not be read: count them here)."""
        for rid, samples in self.unfinished.items():
            self.aengine.abort(rid)
            for _ in samples:
                self.timer.finish("abort")
        self.unfinished.clear()

    async def outputs(self) -> AsyncIterator[tuple[int, object]]:
        """(choice index, SampleDelta) pairs as the engine produces them; raises APIError if the engine died."""
        try:
            async for prompt, out in self._merged():
                for d in out.deltas:
                    choice = prompt * self.n + d.index
                    self.completion_tokens += len(d.token_ids)
                    if d.token_ids:
                        self.timer.tokens(choice)
                    if d.finish_reason is not None:
                        self.timer.finish(d.finish_reason)
                        self.unfinished.get(out.request_id, set()).discard(d.index)
                    yield choice, d
                if out.finished:
                    self.unfinished.pop(out.request_id, None)
            self.timer.done()
        except (EngineDeadError, EngineStoppedError, QueueFullError, ValueError) as e:  # the engine thread's refusal
            raise engine_error(e) from None
        finally:
            self.abort()

    async def _merged(self):
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(prompt, stream):
            try:
                async for out in stream:
                    queue.put_nowait((prompt, out, None))
                queue.put_nowait((prompt, None, None))
            except Exception as e:
                queue.put_nowait((prompt, None, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                prompt, out, error = await queue.get()
                if error is not None:
                    raise error
                if out is None:
                    remaining -= 1
                else:
                    yield prompt, out
        finally:
            for t in tasks:
                t.cancel()

    def usage(self) -> Usage:
        return _usage(self.prompt_tokens, self.completion_tokens)


class CompletionLogprobsBuilder:
    """The legacy completions logprobs of one choice; text_offset continues across streamed chunks."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer, self.offset = tokenizer, offset

    def make(self, logprobs) -> CompletionLogprobs:
        out = CompletionLogprobs()
        texts = _token_texts(self.tokenizer, logprobs)
        for lp in logprobs or ():
            token = texts[lp.token_id]
            out.text_offset.append(self.offset)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            # Tokens that decode alike (pieces of one UTF-8 character) share a key: the likelier one keeps it.
            top = {}
            for t, v in lp.top:
                top.setdefault(texts[t], v)
            top.setdefault(token, lp.logprob)  # the sampled token is always listed (vLLM)
            out.top_logprobs.append(top)
            self.offset += len(token)
        return out


def _chat_logprobs(tokenizer, logprobs) -> ChatLogprobs:
    """Chat logprobs of TokenLogprobs whose `top` the engine already cut to the request's top_logprobs."""
    texts = _token_texts(tokenizer, logprobs)

    def entry(token_id: int, logprob: float) -> dict:
        return {"token": texts[token_id], "logprob": logprob, "bytes": list(texts[token_id].encode())}

    return ChatLogprobs(content=[
        TokenLogprob(**entry(lp.token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
        for lp in logprobs or ()
    ])


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


async def _event_stream(run: EngineRun, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE framing: each chunk, an error event if the stream breaks after the response started, then [DONE].
    The finally aborts the engine requests when the client disconnects (starlette cancels this generator)."""
    try:
        async for chunk in chunks:
            yield _sse(chunk)
    except APIError as e:
        yield _sse(e.body().model_dump_json())
    except Exception:
        log.exception("error while streaming a response")
        yield _sse(internal_error().body().model_dump_json())
    finally:
        run.abort()
    yield _sse("[DONE]")


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work) -> Response:
    """Runs a non-streaming request's work; if the client disconnects first, cancels it (which aborts its engine
    requests) and answers 499 to nobody."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:
        pass
    return Response(status_code=499)


def _refuse_unsupported(body) -> None:
    refused = body.unsupported()
    if refused is not None:
        raise APIError(400, refused[0], param=refused[1])


def _sampling_params(state: ServerState, body, max_tokens, logprobs):
    try:
        return body.sampling_params(max_tokens, logprobs, state.engine.generation_config.sampling_defaults())
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


def _prompt_ids(tokenizer, prompt) -> list[tuple[str | None, list[int]]]:
    """The request's prompts as (text or None, token ids); text prompts get the tokenizer's BOS, as vLLM does."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    for p in prompt:  # JSON may carry lone surrogates (escaped halves of a pair): not text a tokenizer takes
        if isinstance(p, str) and not _is_utf8(p):
            raise APIError(400, "prompt: not valid Unicode text (a lone surrogate escape)", param="prompt")
    # Token ids are checked by the engine (empty, outside the model's vocabulary, too long).
    return [(p, tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompt]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def create_completion(state: ServerState, body: CompletionRequest) -> Response:
    state.check_model(body.model)
    _refuse_unsupported(body)
    tokenizer = state.engine.tokenizer
    prompts = _prompt_ids(tokenizer, body.prompt)
    params = _sampling_params(state, body, body.max_tokens, body.logprobs)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    run = EngineRun(state, request_id, [ids for _, ids in prompts], params)
    num = len(prompts) * params.n
    echo = [""] * num
    if body.echo:
        echo = [text if text is not None else tokenizer.decode(ids) for text, ids in prompts for _ in
                range(params.n)]
    builders = [CompletionLogprobsBuilder(tokenizer, len(echo[k])) for k in range(num)]
    want_logprobs = body.logprobs is not None

    def chunk(choices, usage=None) -> Completion:
        return Completion(id=request_id, created=created, model=state.served_model_name, choices=choices,
                          usage=usage)

    if body.stream:
        text_chunks = TextChunks(lambda k, text, reason: chunk([CompletionChoice(
            index=k, text=text, finish_reason=reason)]).model_dump_json())

        async def chunks():
            started = [False] * num
            async for k, d in run.outputs():
                logprobs = builders[k].make(d.logprobs) if want_logprobs else None
                if not (d.text or d.finish_reason or (logprobs and logprobs.tokens) or not started[k]):
                    continue
                text = d.text if started[k] else echo[k] + d.text
                started[k] = True
                if logprobs is None:
                    yield text_chunks.render(k, text, d.finish_reason)
                    continue
                choice = CompletionChoice(index=k, text=text, logprobs=logprobs, finish_reason=d.finish_reason)
                yield chunk([choice]).model_dump_json()
            if body.include_usage:
                yield chunk([], run.usage()).model_dump_json()

        return StreamingResponse(_event_stream(run, chunks()), media_type="text/event-stream")

    texts = [[e] for e in echo]
    logprobs = [CompletionLogprobs() if want_logprobs else None for _ in range(num)]
    finish = [None] * num
    async for k, d in run.outputs():
        texts[k].append(d.text)
        if want_logprobs:
            part = builders[k].make(d.logprobs)
            for field in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                getattr(logprobs[k], field).extend(getattr(part, field))
        finish[k] = d.finish_reason or finish[k]
    choices = [CompletionChoice(index=k, text="".join(texts[k]), logprobs=logprobs[k], finish_reason=finish[k])
               for k in range(num)]
    return JSONResponse(chunk(choices, run.usage()).model_dump())


def _chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    tokenizer = state.engine.tokenizer
    if state.chat_template is None and tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template (none in its tokenizer_config.json); start the "
                       "server with --chat-template FILE or use /v1/completions", param="messages")
    messages = [{"role": m.template_role(), "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in body.messages]
    for i, m in enumerate(messages):
        if not _is_utf8(m["content"]):
            raise APIError(400, f"messages[{i}].content: not valid Unicode text (a lone surrogate escape)",
                           param="messages")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             chat_template=state.chat_template)
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise APIError(400, f"cannot render the chat template: {e}", param="messages") from None


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest) -> Response:
    state.check_model(body.model)
    _refuse_unsupported(body)
    tokenizer = state.engine.tokenizer
    ids = _chat_prompt(state, body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.max_completion_tokens is not None and body.max_completion_tokens < 1:  # else named max_tokens below
        raise APIError(400, f"max_completion_tokens must be >= 1, got {body.max_completion_tokens}",
                       param="max_completion_tokens")
    if max_tokens is None:  # vLLM: whatever room the model length leaves (at least 1: the engine then explains)
        max_tokens = max(1, state.engine.max_model_len - len(ids))
    top_n = body.top_logprobs or 0
    params = _sampling_params(state, body, max_tokens, top_n if body.logprobs else None)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    run = EngineRun(state, request_id, [ids], params)
    num = params.n

    def logprobs_of(d):
        return _chat_logprobs(tokenizer, d.logprobs) if body.logprobs else None

    if body.stream:
        def chunk(choices, **usage) -> str:
            # exclude_unset: a delta carries only what it sets (the role once, then content), as OpenAI's do.
            return ChatCompletionChunk(id=request_id, object="chat.completion.chunk", created=created,
                                       model=state.served_model_name, choices=choices,
                                       **usage).model_dump_json(exclude_unset=True)

        text_chunks = TextChunks(lambda k, text, reason: chunk([ChatChunkChoice(
            index=k, delta=Delta(content=text), logprobs=None, finish_reason=reason)]))

        async def chunks():
            for k in range(num):  # the role first, as OpenAI and vLLM do
                yield chunk([ChatChunkChoice(index=k, delta=Delta(role="assistant", content=""), logprobs=None,
                                             finish_reason=None)])
            async for k, d in run.outputs():
                logprobs = logprobs_of(d)
                if not (d.text or d.finish_reason or (logprobs and logprobs.content)):
                    continue
                if logprobs is None:
                    yield text_chunks.render(k, d.text, d.finish_reason)
                    continue
                yield chunk([ChatChunkChoice(index=k, delta=Delta(content=d.text), logprobs=logprobs,
                                             finish_reason=d.finish_reason)])
            if body.include_usage:
                yield chunk([], usage=run.usage())

        return StreamingResponse(_event_stream(run, chunks()), media_type="text/event-stream")

    texts = [[] for _ in range(num)]
    logprobs = [ChatLogprobs(content=[]) if body.logprobs else None for _ in range(num)]
    finish = [None] * num
    async for k, d in run.outputs():
        texts[k].append(d.text)
        if body.logprobs:
            logprobs[k].content.extend(logprobs_of(d).content)
        finish[k] = d.finish_reason or finish[k]
    choices = [ChatChoice(index=k, message=AssistantMessage(content="".join(texts[k])), logprobs=logprobs[k],
                          finish_reason=finish[k]) for k in range(num)]
    return JSONResponse(ChatCompletion(id=request_id, created=created, model=state.served_model_name,
                                       choices=choices, usage=run.usage()).model_dump())


def build_app(aengine, served_model_name: str, api_key: str | None = None, chat_template: str | None = None
              ) -> FastAPI:
    """The API over a started AsyncEngine (None: still loading; `app.state.server.aengine` is set later).
    chat_template: a Jinja template source overriding the checkpoint's."""
    state = ServerState(aengine, served_model_name, api_key, chat_template)
    app = FastAPI(title="llmkern", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(Gate, state=state)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    @app.get("/health")
    async def health():
        if state.aengine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state.aengine.healthy:
            return JSONResponse({"status": "engine failed"}, status_code=503)
        if not state.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        max_len = None if state.aengine is None else state.engine.max_model_len
        card = ModelCard(id=served_model_name, created=state.created, max_model_len=max_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _unless_disconnected(request, create_completion(state, body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _unless_disconnected(request, create_chat_completion(state, body))

    return app
