"""`llmkern serve`: the OpenAI-compatible server (llmkern.serve.api) on uvicorn.

    llmkern serve                                   # the built-in demo-target on 127.0.0.1:8000
    llmkern serve --model DIR --port 8080 --api-key sk-local --kv-cache-memory 2G
    llmkern serve --speculative draft               # the demo pair: demo-draft proposes, demo-target verifies

The socket opens before the model loads (/health answers 503 until it is ready). SIGTERM (or Ctrl-C) drains:
new requests get 503, running ones finish for up to --shutdown-timeout seconds (the rest are aborted), then the
process exits 0. A second signal aborts what still runs and exits at once (by that signal).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import threading
from importlib.util import find_spec
from pathlib import Path

log = logging.getLogger("llmkern.serve")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """'2G', '512M', '1.5GiB', '1048576' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size in bytes like 512M or 2G, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"expected a positive size, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmkern.cli import add_dtype_and_quant_arguments

    p.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint directory (default: the built-in "
                   "demo-target)")
    spec = p.add_argument_group("speculative decoding (default: none)")
    spec.add_argument("--draft-model", metavar="DIR", help="a draft model with the same tokenizer")
    spec.add_argument("--ngram", action="store_true", help="n-gram prompt lookup (no second model)")
    spec.add_argument("--speculative", choices=("draft", "ngram"),
                      help="'draft' without --draft-model uses demo-draft (only with the demo model)")
    spec.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K", help="tokens proposed per "
                      "round (default 4)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients send (default: the "
                   "checkpoint directory's name)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template replacing the checkpoint's")
    p.add_argument("--kv-cache-memory", metavar="SIZE", help="KV cache budget, e.g. 512M or 2G (default: a "
                   "fraction of free memory)")
    p.add_argument("--max-model-len", type=int, metavar="N", help="default: the model's context length")
    p.add_argument("--max-num-seqs", type=int, default=64, metavar="N", help="most requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, metavar="N", help="token budget per step")
    p.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="most requests waiting; more get HTTP 429")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt blocks")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads of the model's kernels (default: torch's "
                   "thread count)")
    add_dtype_and_quant_arguments(p)
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long running requests may take to finish (default 30)")


def _speculation(args, model_is_demo: bool) -> dict:
    if args.draft_model is not None and args.ngram:
        raise ValueError("--draft-model and --ngram: pick one proposer")
    kind = args.speculative or ("draft" if args.draft_model else "ngram" if args.ngram else None)
    if (kind == "ngram" and args.draft_model) or (kind == "draft" and args.ngram):
        raise ValueError(f"--speculative {kind} contradicts --{'draft-model' if args.draft_model else 'ngram'}")
    draft = args.draft_model
    if kind == "draft" and draft is None:
        if not model_is_demo:
            raise ValueError("--speculative draft: give --draft-model DIR (demo-draft only drafts for the demo model)")
        from llmkern.models import demo_model_path

        draft = str(demo_model_path("demo-draft"))
    if draft is not None and not Path(draft).is_dir():
        raise ValueError(f"--draft-model: {draft} is not a directory")
    if args.num_speculative_tokens < 1:
        raise ValueError(f"--num-speculative-tokens: expected >= 1, got {args.num_speculative_tokens}")
    return {"speculative": kind, "draft_model": draft, "num_speculative_tokens": args.num_speculative_tokens}


def engine_threads(requested: int | None) -> int:
    """The kernels' thread count: torch's (every core) unless --threads says otherwise. The event loop and local
    clients need a share of those cores too; on llmkern's pool (which run() picks) a kernel gives a descheduled
    thread's parts to the others rather than wait for it. Measured on 2 cores (bench/RESULTS.md, serving): 2
    threads against 1, output tokens/s at concurrency 16 1.07-1.2x, time per output token at batch 1 alike."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads: expected >= 1, got {requested}")
        return requested
    return torch.get_num_threads()


def engine_config(args):
    """EngineConfig from the flags (its own checks name the field), speculation resolved."""
    from llmkern.cli import resolve_model
    from llmkern.models import demo_model_path
    from llmkern.serve.config import EngineConfig

    resolve_model(args, lambda path: log.info("no --model given, serving the built-in demo model %s", path))
    is_demo = Path(args.model).resolve() == demo_model_path("demo-target").resolve()
    try:
        memory = None if args.kv_cache_memory is None else parse_bytes(args.kv_cache_memory)
    except ValueError as e:
        raise ValueError(f"--kv-cache-memory: {e}") from None
    return EngineConfig(kv_cache_memory=memory, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
                        enable_prefix_caching=not args.no_prefix_caching, **_speculation(args, is_demo))


async def _in_daemon_thread(fn):
    """fn() on a daemon thread: unlike asyncio.to_thread's executor, which the event loop's exit waits for, a signal
    during a long model load then exits at once."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(result, error):
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(result)

    def work():
        try:
            result, error = fn(), None
        except BaseException as e:
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: the server stopped meanwhile
            pass

    threading.Thread(target=work, name="llmkern-load", daemon=True).start()
    return await done


def server_class():
    """DrainingServer (a function, so `llmkern --help` does not import uvicorn)."""
    import uvicorn

    from llmkern.serve.async_engine import AsyncEngine

    class DrainingServer(uvicorn.Server):
        """uvicorn, plus: the model loads after the socket opens (`load()` returns the Engine, on a worker
        thread; its AsyncEngine then starts on this event loop, where its streams are read), and the first
        SIGTERM/SIGINT drains the engine before uvicorn's own shutdown (which then finds no request left and exits
        without re-raising the signal, so the exit status is 0). A second signal aborts the running requests and
        exits at once."""

        def __init__(self, config, state, load, shutdown_timeout: float):
            super().__init__(config)
            self.state, self.load, self.shutdown_timeout = state, load, shutdown_timeout
            self.loop = None
            self.draining = False
            self.load_failed = False
            self.tasks = set()

        async def startup(self, sockets=None):
            await super().startup(sockets)
            self.loop = asyncio.get_running_loop()
            self._spawn(self._load())

        def _spawn(self, coro):
            task = asyncio.ensure_future(coro)
            self.tasks.add(task)  # a reference, so the task is not garbage-collected midway
            task.add_done_callback(self.tasks.discard)

        async def _load(self):
            try:
                engine = await _in_daemon_thread(self.load)
            except Exception as e:
                if isinstance(e, (ValueError, FileNotFoundError)):  # a bad model or setting: the message says it
                    log.error("cannot serve: %s", e)
                else:
                    log.exception("loading the model failed")
                self.load_failed = True
                self.should_exit = True
                return
            aengine = AsyncEngine(engine)
            aengine.start()
            self.state.aengine = aengine
            log.info("ready: serving %r", self.state.served_model_name)

        def handle_exit(self, sig, frame):
            if self.draining:  # a second signal: abort what still runs and exit without waiting for it
                log.info("signal %d again: aborting the running requests, exiting now", sig)
                super().handle_exit(sig, frame)  # uvicorn re-raises it at exit (status 128 + signal)
                self.force_exit = True
                self.loop.call_soon_threadsafe(lambda: self._spawn(self.state.aengine.shutdown(0)))
                return
            if self.loop is None or self.state.aengine is None:
                return super().handle_exit(sig, frame)
            self.draining = True
            self.state.accepting = False
            log.info("signal %d: draining running requests (up to %g s), then exiting", sig, self.shutdown_timeout)
            self.loop.call_soon_threadsafe(lambda: self._spawn(self._drain()))

        async def _drain(self):
            try:
                await self.state.aengine.shutdown(self.shutdown_timeout)
            except Exception:
                log.exception("error while draining")
            finally:
                self.should_exit = True

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)
            aengine = self.state.aengine
            if aengine is not None and aengine.healthy:  # not drained (e.g. stopped by should_exit): stop it now
                await aengine.shutdown(0)

    return DrainingServer


def freeze_startup_heap() -> None:
    """Takes every object alive now (the model, the tokenizer, the web framework: ~330k on the demo model, alive as
    long as the server) out of the cyclic garbage collector's sight, as vLLM and SGLang do once loaded. A full
    collection walks every tracked object with the GIL held: serving the demo model at concurrency 16, one took
    153 ms, a stall of every stream (bench/RESULTS.md). Objects made later are collected as before; a cycle among the
    frozen ones is never freed (reference counting still frees the rest)."""
    gc.collect()
    gc.freeze()
    log.info("garbage collector: %d startup objects frozen", gc.get_freeze_count())


def run(args: argparse.Namespace) -> int:
    """Bad flags raise ValueError before anything starts; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from llmkern.cli import check_dtype_and_quant

    config = engine_config(args)
    dtype = check_dtype_and_quant(args)
    threads = engine_threads(args.threads)
    if not args.shutdown_timeout >= 0:  # NaN too
        raise ValueError(f"--shutdown-timeout: expected >= 0, got {args.shutdown_timeout}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port: expected 0..65535, got {args.port}")
    chat_template = None
    if args.chat_template is not None:
        if not Path(args.chat_template).is_file():
            raise ValueError(f"--chat-template: {args.chat_template} is not a file")
        chat_template = Path(args.chat_template).read_text()
    name = args.served_model_name or Path(args.model).resolve().name

    import torch
    import uvicorn

    from llmkern.ops import set_parallel_backend
    from llmkern.serve.api import build_app
    from llmkern.serve.engine import Engine

    # The event loop and local clients share the kernels' cores: llmkern's pool does not wait for a thread they
    # have descheduled (llmkern.ops.set_parallel_backend). torch's own ops (small in a step; the linears go to
    # llmkern's then, ops.linear_beats_torch) run on one thread: torch's OpenMP threads, spinning after each of
    # their regions, would take the cores the pool needs (a prefill step ran 1.75x slower).
    # Before any thread runs a kernel: ATen threads take the global count at their first parallel region.
    torch.set_num_threads(1)
    set_parallel_backend("pool", threads)
    log.info("kernel threads: %d (--threads), llmkern's pool", threads)

    def load():
        engine = Engine.from_pretrained(args.model, config, dtype=dtype, quant=args.quant)
        freeze_startup_heap()
        return engine

    # uvicorn's "auto" takes uvloop and httptools where installed (pyproject's dependencies): ~30% less of the event
    # loop's CPU a streamed token than asyncio + h11 (bench/RESULTS.md), CPU the kernels' cores give up to it.
    log.info("event loop: %s, HTTP: %s", *(m if find_spec(m) else alt for m, alt in (("uvloop", "asyncio"),
                                                                                      ("httptools", "h11"))))
    app = build_app(None, name, api_key=args.api_key, chat_template=chat_template)
    server = server_class()(uvicorn.Config(app, host=args.host, port=args.port, log_config=None),
                            app.state.server, load, args.shutdown_timeout)
    server.run()
    return 1 if server.load_failed else 0
