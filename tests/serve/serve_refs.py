"""Servers for the HTTP API tests (their fixtures are in conftest.py): a real engine over a tiny random Llama
checkpoint (fp32), served by uvicorn on 127.0.0.1 at a free port in a background thread (the same DrainingServer
`llmkern serve` runs), so tests talk to it over real sockets (httpx, the openai client) while they can still read
the engine's stats directly. A module of its own, not conftest.py: `from conftest import` would find whichever
conftest pytest imported last (tests/generation has one too)."""

from __future__ import annotations

import socket
import threading
import time

import torch
import uvicorn

from llmkern.serve.api import build_app
from llmkern.serve.config import EngineConfig
from llmkern.serve.engine import Engine
from llmkern.serve.server import server_class

SERVED_NAME = "tiny"
KV_CACHE_MEMORY = 8 << 20  # plenty for the tiny model at 128 tokens, small enough for CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout_s: float = 20.0, what: str = "condition"):
    """Polls `condition` (the tests' waits are bounded: a hang fails instead of blocking CI)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


class ThreadServer:
    """A fresh engine over `model_dir` (EngineConfig `config`) behind build_app(..., **app_kwargs), served in a
    daemon thread; `url` is its base URL, `aengine` its AsyncEngine, `state` the app's ServerState."""

    def __init__(self, model_dir, config: dict | None = None, **app_kwargs):
        engine_config = EngineConfig(**{"kv_cache_memory": KV_CACHE_MEMORY, **(config or {})})
        engine = Engine.from_pretrained(model_dir, engine_config, dtype=torch.float32)
        self.app = build_app(None, SERVED_NAME, **app_kwargs)
        self.state = self.app.state.server
        self.port = free_port()
        uvicorn_config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = server_class()(uvicorn_config, self.state, lambda: engine, shutdown_timeout=0)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.state.aengine is not None or not self.thread.is_alive(), what="the server to start")
        assert self.state.aengine is not None, "the server did not start"
        self.aengine = self.state.aengine
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=20)


class StepGate:
    """Lets the engine thread run only `allow(n)` more steps, so a test can hold requests running or waiting
    without racing the engine; `close()` restores the engine's step."""

    def __init__(self, engine, allowed: int | None = 0):
        self.engine, self.real_step = engine, engine.step
        self.cond = threading.Condition()
        self.allowed = allowed
        engine.step = self.step

    def step(self, on_model_start=None):
        with self.cond:
            if on_model_start is not None and self.allowed == 0:
                on_model_start()  # the last step's outputs, which AsyncEngine holds for this step's model start
            # bounded: a forgotten gate slows a test down instead of hanging it
            self.cond.wait_for(lambda: self.allowed is None or self.allowed > 0, timeout=30)
            if self.allowed is not None:
                self.allowed = max(0, self.allowed - 1)
        return self.real_step(on_model_start=on_model_start)

    def allow(self, steps: int | None) -> None:
        with self.cond:
            self.allowed = steps
            self.cond.notify_all()

    def close(self) -> None:
        self.allow(None)
        self.engine.step = self.real_step


def idle(aengine) -> bool:
    s = aengine.stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0
