"""The HTTP layer over raw HTTP: bad requests get OpenAI's error shape and the right status while the server keeps
serving, /health, /metrics, /v1/models, disconnects abort their requests, and SIGTERM drains a real
`llmkern serve` process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from serve_refs import SERVED_NAME, StepGate, ThreadServer, free_port, idle, wait_until
from fastapi.testclient import TestClient

from llmkern.serve.api import build_app

GOOD = {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 3}
CHAT = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}

# (path, raw JSON body, status, words the message must contain)
BAD_REQUESTS = [
    ("/v1/completions", '{"prompt": "Hello", "max_tokens": ', 400, "malformed JSON"),
    ("/v1/completions", json.dumps({**GOOD, "max_tokens": -1}), 400, "max_tokens"),
    ("/v1/completions", json.dumps({**GOOD, "temperature": -0.5}), 400, "temperature"),
    ("/v1/completions", json.dumps({**GOOD, "max_tokens": "many"}), 400, "max_tokens"),
    ("/v1/completions", json.dumps({**GOOD, "n": [2]}), 400, "n"),
    ("/v1/completions", json.dumps({**GOOD, "prompt": "word " * 200}), 400, "maximum context length"),
    ("/v1/completions", json.dumps({**GOOD, "max_tokens": 1000}), 400, "1000"),
    ("/v1/completions", json.dumps({**GOOD, "prompt": []}), 400, "prompt"),
    ("/v1/completions", json.dumps({**GOOD, "prompt": [1, 10**6]}), 400, "token ids"),
    ("/v1/completions", json.dumps({**GOOD, "best_of": 2}), 400, "best_of"),
    ("/v1/completions", json.dumps({**GOOD, "logit_bias": {"5": 100}}), 400, "logit_bias"),
    ("/v1/completions", json.dumps({**GOOD, "top_p": 0}), 400, "top_p"),
    ("/v1/completions", json.dumps({**GOOD, "stop": [""]}), 400, "stop"),
    ("/v1/completions", json.dumps({**GOOD, "top_k": 2**63}), 400, "top_k"),  # killed the engine thread once
    ("/v1/completions", json.dumps({**GOOD, "seed": 2**64}), 400, "seed"),  # left a request running once
    ("/v1/completions", json.dumps({**GOOD, "prompt": "Hi \ud83d"}), 400, "prompt"),  # JSON's lone surrogate
    ("/v1/completions", json.dumps({**GOOD, "model": "other"}), 404, "does not exist"),
    ("/v1/completions", json.dumps({"model": SERVED_NAME}), 400, "prompt"),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": []}), 400, "messages"),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}), 400, "role"),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "messages"),
    ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 120}), 400, "maximum context length"),
    ("/v1/chat/completions", json.dumps({**CHAT, "messages": [{"role": "user", "content": "\udc00"}]}), 400,
     "messages[0].content"),
    ("/v1/chat/completions", json.dumps({**CHAT, "top_logprobs": 2}), 400, "top_logprobs"),
    ("/v1/chat/completions", json.dumps({**CHAT, "max_completion_tokens": 0}), 400, "max_completion_tokens must"),
    ("/v1/chat/completions", json.dumps({**CHAT, "tools": [{"type": "function"}]}), 400, "tools"),
    ("/v1/nothing", "{}", 404, "Not Found"),
]


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("path,body,status,words", BAD_REQUESTS, ids=[f"{i}" for i in range(len(BAD_REQUESTS))])
def test_bad_request_gets_its_status_and_the_server_keeps_serving(http, tiny_server, path, body, status, words):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert "Traceback" not in r.text
    assert http.post("/v1/completions", json=GOOD).status_code == 200
    wait_until(lambda: idle(tiny_server.aengine), what="no request left behind")


def test_unknown_fields_are_ignored_and_text_parts_joined(http):
    r = http.post("/v1/completions", json={**GOOD, "frobnicate": {"x": 1}, "user": "u1", "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    parts = {"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}
    joined = {"role": "user", "content": "H\ni"}
    a = http.post("/v1/chat/completions", json={**CHAT, "messages": [parts], "temperature": 0}).json()
    b = http.post("/v1/chat/completions", json={**CHAT, "messages": [joined], "temperature": 0}).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"] == b["usage"]


def test_stop_and_echo(http):
    base = {**GOOD, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = full[4:6]
    cut = http.post("/v1/completions", json={**base, "stop": stop}).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    echoed = http.post("/v1/completions", json={**base, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "Hello" + full


def test_stream_is_server_sent_events_ending_in_done(http):
    with http.stream("POST", "/v1/completions", json={**GOOD, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and chunks[-1]["choices"][0]["finish_reason"]


def test_health_models_and_metrics(http):
    assert http.get("/health").status_code == 200
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [SERVED_NAME]

    def scrape():
        text = http.get("/metrics").text
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    before = scrape()
    r = http.post("/v1/completions", json={**GOOD, "max_tokens": 5, "ignore_eos": True}).json()
    after = scrape()
    assert after["llmkern:generation_tokens_total"] - before["llmkern:generation_tokens_total"] == 5
    assert after["llmkern:prompt_tokens_total"] - before["llmkern:prompt_tokens_total"] == r["usage"]["prompt_tokens"]
    key = 'llmkern:request_success_total{finished_reason="length"}'
    assert after[key] - before.get(key, 0) == 1
    assert after["llmkern:time_to_first_token_seconds_count"] - before["llmkern:time_to_first_token_seconds_count"] == 1
    assert after["llmkern:inter_token_latency_seconds_count"] - before["llmkern:inter_token_latency_seconds_count"] >= 1
    assert after["llmkern:e2e_request_latency_seconds_count"] - before["llmkern:e2e_request_latency_seconds_count"] == 1
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total", "spec_decode_num_draft_tokens_total",
                 "spec_decode_num_accepted_tokens_total", "spec_decode_acceptance_rate"):
        assert f"llmkern:{name}" in after


def _metric(http, key) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(key + " "):
            return float(line.split(" ")[1])
    return 0.0


def test_disconnect_aborts_the_request(http, tiny_server):
    aborted = 'llmkern:request_success_total{finished_reason="abort"}'
    before = _metric(http, aborted)
    body = {**GOOD, "max_tokens": 100, "ignore_eos": True}
    gate = StepGate(tiny_server.aengine.engine, allowed=4)  # the request cannot finish before the client leaves
    try:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            next(r.iter_lines())  # generating; leaving the block closes the connection
        wait_until(lambda: _metric(http, aborted) == before + 1, what="the streamed request to be aborted")
        # The API counts the abort at once; the engine drops the request between steps. When the gate's steps ran
        # out before the client left, that takes one more step: without it the aborted request would still count
        # below (and the wait for exactly one unfinished request raced with the new one's arrival).
        gate.allow(None)
        wait_until(lambda: tiny_server.aengine.num_unfinished == 0, what="the engine to drop the aborted request")
        gate.allow(0)
        # Not streaming: the raw request, then hang up while it waits for its steps.
        raw = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", tiny_server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
            wait_until(lambda: tiny_server.aengine.num_unfinished == 1, what="the request to arrive")
        wait_until(lambda: _metric(http, aborted) == before + 2, what="the non-streamed request to be aborted")
    finally:
        gate.close()
    wait_until(lambda: idle(tiny_server.aengine) and tiny_server.aengine.num_unfinished == 0,
               what="its blocks to be freed")


def test_loading_and_draining_answer_503():
    loading = TestClient(build_app(None, SERVED_NAME))
    assert loading.get("/health").status_code == 503
    assert loading.post("/v1/completions", json=GOOD).status_code == 503
    assert loading.get("/metrics").status_code == 200  # zeros until the engine exists
    app = build_app(SimpleNamespace(healthy=True), SERVED_NAME)  # only /health reads the engine here
    client = TestClient(app)
    assert client.get("/health").status_code == 200
    app.state.server.accepting = False  # what SIGTERM does first
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json=GOOD)
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert TestClient(build_app(SimpleNamespace(healthy=False), SERVED_NAME)).get("/health").status_code == 503


def test_developer_messages_are_system_messages(http):
    def chat(*messages):
        body = {**CHAT, "temperature": 0, "messages": [{"role": r, "content": c} for r, c in messages]}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"], r.json()["choices"][0]["message"]["content"]

    as_system = chat(("system", "Be brief."), ("user", "Hi"))
    assert chat(("developer", "Be brief."), ("user", "Hi")) == as_system
    assert chat(("user", "Hi"))[0] < as_system[0]


def test_chat_template_file_and_none(tiny_checkpoint, http, tiny_server):
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    server = ThreadServer(tiny_checkpoint[1], chat_template=template)
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT)
        expected = server.aengine.engine.tokenizer.encode("Hi\n", add_special_tokens=False)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(expected)
    finally:
        server.close()
    tokenizer = tiny_server.aengine.engine.tokenizer
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        r = http.post("/v1/chat/completions", json=CHAT)
    finally:
        tokenizer.chat_template = saved
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


@contextlib.contextmanager
def _long_context_server(tiny_checkpoint, tmp_path):
    """`llmkern serve` in a subprocess on the tiny model given 2048 positions (a long stream outlasts a signal):
    yields (process, url); killed at the end if still running."""
    model = tmp_path / "tiny-long"
    model.mkdir()
    for f in Path(tiny_checkpoint[1]).iterdir():
        (model / f.name).symlink_to(f)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "llmkern.cli", "serve", "--model", str(model), "--port",
                             str(port), "--dtype", "float32", "--kv-cache-memory", "16M", "--shutdown-timeout", "60"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout_s=60, what="the server to load")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _stream_with_signals(url, proc, log, signals, max_tokens=200) -> str | None:
    """A stream of max_tokens; at its first piece the signals are sent, each once the server has logged the one
    before (two quick signals of one kind reach Python as one). -> its last finish_reason."""
    body = {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    finish = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for i, sig in enumerate(signals):
                    proc.send_signal(sig)
                    wait_until(lambda i=i: log.read_text().count(f"signal {sig:d}") > i, what="the signal's log line")
                signals = ()
                finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
            elif line:
                assert line == "data: [DONE]"
    return finish


def test_sigterm_drains_the_streaming_request_then_exits_0(tiny_checkpoint, tmp_path):
    with _long_context_server(tiny_checkpoint, tmp_path) as (proc, url):
        assert _stream_with_signals(url, proc, tmp_path / "server.log", [signal.SIGTERM]) == "length"
        assert proc.wait(timeout=60) == 0
    text = (tmp_path / "server.log").read_text()
    assert "draining" in text
    # The loaded model's heap leaves the full garbage collections before the first request (freeze_startup_heap).
    assert text.index("startup objects frozen") < text.index("ready: serving")


def test_a_second_signal_aborts_the_running_requests_and_exits(tiny_checkpoint, tmp_path):
    with _long_context_server(tiny_checkpoint, tmp_path) as (proc, url):
        assert _stream_with_signals(url, proc, tmp_path / "server.log", [signal.SIGTERM] * 2, max_tokens=2000) == "abort"
        assert proc.wait(timeout=60) == -signal.SIGTERM  # it drained nothing: it ends by the signal
    assert "exiting now" in (tmp_path / "server.log").read_text()


def _serve_args(*argv):
    import argparse

    from llmkern.serve import server

    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_flags_resolve_to_an_engine_config(tiny_checkpoint):
    from llmkern.models import demo_model_path
    from llmkern.serve.server import engine_config, parse_bytes

    assert parse_bytes("512M") == 512 << 20 and parse_bytes("2G") == 2 << 30 and parse_bytes("1.5GiB") == 3 << 29
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="512X"):
        parse_bytes("512X")
    demo = engine_config(_serve_args())  # no --model: the demo target, no speculation
    assert demo.speculative is None and demo.draft_model is None and demo.enable_prefix_caching
    draft = engine_config(_serve_args("--speculative", "draft", "--num-speculative-tokens", "3"))
    assert draft.speculative == "draft" and Path(draft.draft_model) == demo_model_path("demo-draft")
    assert draft.num_speculative_tokens == 3
    ngram = engine_config(_serve_args("--model", str(tiny_checkpoint[1]), "--ngram", "--no-prefix-caching",
                                      "--kv-cache-memory", "64M", "--max-waiting", "3"))
    assert ngram.speculative == "ngram" and ngram.draft_model is None and not ngram.enable_prefix_caching
    assert ngram.kv_cache_memory == 64 << 20 and ngram.max_waiting == 3
    for argv, words in [(("--model", str(tiny_checkpoint[1]), "--speculative", "draft"), "--draft-model"),
                        (("--ngram", "--draft-model", str(tiny_checkpoint[1])), "pick one"),
                        (("--kv-cache-memory", "lots"), "--kv-cache-memory"),
                        (("--model", "/nonexistent"), "--model")]:
        with pytest.raises(ValueError, match=words):
            engine_config(_serve_args(*argv))


def test_serve_threads_default_to_torchs(monkeypatch):
    import torch

    from llmkern.serve.server import engine_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # OMP_NUM_THREADS=4 or torch.set_num_threads(4)
    assert engine_threads(None) == 4 and engine_threads(1) == 1
    with pytest.raises(ValueError, match="--threads: expected >= 1, got 0"):
        engine_threads(0)


def test_serve_command_rejects_bad_flags_in_one_line(capsys):
    from llmkern.cli import main

    for flags, message in [(["--kv-cache-memory", "12X"], "--kv-cache-memory"),
                           (["--shutdown-timeout", "nan"], "--shutdown-timeout: expected >= 0")]:  # NaN: no drain
        with pytest.raises(SystemExit) as exit:
            main(["serve", *flags])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and f"llmkern serve: error: {message}" in err and "Traceback" not in err


def test_ctrl_c_while_loading_exits_130_without_waiting_for_the_load(monkeypatch, capsys):
    import asyncio
    import threading

    from llmkern.cli import main
    from llmkern.serve import server

    def load():  # runs on a daemon thread, which the event loop's exit does not wait for
        assert threading.current_thread().daemon
        return 7

    assert asyncio.run(server._in_daemon_thread(load)) == 7
    with pytest.raises(ZeroDivisionError):
        asyncio.run(server._in_daemon_thread(lambda: 1 / 0))

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "run", interrupted)
    with pytest.raises(SystemExit) as exit:
        main(["serve"])
    assert exit.value.code == 130 and "Traceback" not in capsys.readouterr().err


def test_unexpected_errors_are_a_generic_500(http, tiny_server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(tiny_server.aengine.engine.tokenizer, "encode", broken)
    r = http.post("/v1/completions", json=GOOD)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    assert "secret" not in r.text and "Traceback" not in r.text
    monkeypatch.undo()
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_engine_death_ends_streams_with_an_error_and_health_503(tiny_checkpoint):
    server = ThreadServer(tiny_checkpoint[1])
    try:
        engine = server.aengine.engine
        real_step, steps = engine.step, []

        def failing_step(on_model_start=None):
            steps.append(1)
            if len(steps) > 3:
                raise RuntimeError("device lost")
            return real_step(on_model_start)

        engine.step = failing_step
        body = {**GOOD, "max_tokens": 50, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert error["type"] == "internal_server_error" and "device lost" not in error["message"]
        assert httpx.get(server.url + "/health").status_code == 503
        r = httpx.post(server.url + "/v1/completions", json=GOOD)
        assert r.status_code == 500 and "engine stopped" in r.json()["error"]["message"]
    finally:
        server.close()


def test_unset_sampling_fields_take_the_checkpoints_values():
    """vLLM's --generation-config auto: the request's fields over the checkpoint's over SamplingParams' defaults."""
    from llmkern.generation import GenerationConfig
    from llmkern.serve.protocol import ChatCompletionRequest, CompletionRequest

    defaults = GenerationConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.2).sampling_defaults()
    assert defaults == {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2}
    p = CompletionRequest(prompt="x", top_p=0.5).sampling_params(16, None, defaults)
    assert (p.temperature, p.top_p, p.repetition_penalty, p.top_k) == (0.7, 0.5, 1.2, 0)
    p = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], temperature=0).sampling_params(8, None)
    assert (p.temperature, p.top_p, p.repetition_penalty) == (0.0, 1.0, 1.0)
