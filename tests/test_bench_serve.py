"""Smoke test of bench/bench_serve.py: its client against a tiny fake OpenAI streaming server (FastAPI + uvicorn in
a thread), the report's bookkeeping, the workloads, the server-process handling, one short run against the real
`llmkern serve`, and --compare on tiny sizes. Timing is never asserted."""

import asyncio
import math
import re
import signal
import statistics
import sys
import threading

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from bench import bench_serve as bs
from llmkern.generation import Tokenizer
from llmkern.models import demo_model_path

FAIL_400, CUT_STREAM = 0, 1  # first prompt token ids that make the fake server fail that request


def fake_app() -> FastAPI:
    """/health, /v1/models and a streamed /v1/completions sending one chunk per token (text "t<i>"), a usage
    chunk and [DONE], as vLLM does. It records each request body and the most requests it had in flight."""
    app = FastAPI()
    app.state.bodies, app.state.in_flight, app.state.max_in_flight = [], 0, 0

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        text = ("# TYPE llmkern:spec_decode_acceptance_rate gauge\nllmkern:spec_decode_acceptance_rate 0.5\n"
                'llmkern:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 7.0\n'
                "llmkern:num_requests_running 0\n")
        return PlainTextResponse(text)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.bodies.append(body)
        if body["prompt"][0] == FAIL_400:
            return JSONResponse({"error": {"message": "bad", "type": "BadRequestError", "code": 400}}, 400)

        async def events():
            app.state.in_flight += 1
            app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)
            try:
                n = body["max_tokens"]
                for i in range(n):
                    await asyncio.sleep(0.001)
                    finish = "length" if i == n - 1 else None
                    yield bs.json.dumps({"choices": [{"index": 0, "text": f"t{i}", "finish_reason": finish}],
                                         "usage": None}).join(("data: ", "\n\n"))
                    if body["prompt"][0] == CUT_STREAM:
                        return
                usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                         "total_tokens": len(body["prompt"]) + n}
                yield "data: " + bs.json.dumps({"choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                app.state.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    app = fake_app()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=bs.free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the fake server did not start"
        threading.Event().wait(0.01)
    yield app, f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(demo_model_path("demo-target"))


def check_stats_ordered(st: bs.Stats):
    assert 0 <= st.median_ms <= st.p99_ms and st.mean_ms >= 0


def test_client_report_and_payload(fake_server, tokenizer):
    app, url = fake_server
    app.state.bodies.clear()
    app.state.max_in_flight = 0
    prompts = bs.random_prompts(tokenizer, 8, 16, seed=3)
    bench = asyncio.run(bs.run_requests(url, "fake", prompts, 5, max_concurrency=3))
    rep = bs.summarize(bench)
    assert (rep.num_requests, rep.completed, rep.failed, rep.errors) == (8, 8, 0, [])
    assert (rep.input_tokens, rep.output_tokens) == (8 * 16, 8 * 5)
    assert all(len(r.itls) == 4 and r.output_tokens == 5 for r in bench.results)  # one gap per chunk after the first
    for st in (rep.ttft, rep.tpot, rep.itl, rep.e2e):
        check_stats_ordered(st)
    assert rep.ttft.mean_ms <= rep.e2e.mean_ms
    assert rep.request_throughput == pytest.approx(8 / rep.duration_s)
    assert rep.output_throughput == pytest.approx(40 / rep.duration_s)
    assert 1 <= app.state.max_in_flight <= 3  # the concurrency cap holds
    assert sorted(map(tuple, (b["prompt"] for b in app.state.bodies))) == sorted(map(tuple, prompts))
    body = app.state.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 5
    assert body["temperature"] == 0.0 and body["repetition_penalty"] == 1.0  # plain greedy
    text = bs.format_report(rep)
    assert re.search(r"Successful requests:\s+8\n", text) and "P99 ITL (ms):" in text


def test_failures_are_counted_not_raised(fake_server, tokenizer):
    _, url = fake_server
    prompts = bs.random_prompts(tokenizer, 4, 8, seed=0)
    prompts[1][0], prompts[2][0] = FAIL_400, CUT_STREAM
    rep = bs.summarize(asyncio.run(bs.run_requests(url, "fake", prompts, 3, request_rate=1000.0)))
    assert (rep.completed, rep.failed, rep.output_tokens, rep.input_tokens) == (2, 2, 6, 16)
    assert any(e.startswith("HTTP 400") for e in rep.errors) and any("[DONE]" in e for e in rep.errors)
    dead = bs.summarize(asyncio.run(bs.run_requests(f"http://127.0.0.1:{bs.free_port()}", "fake", prompts[:2], 3)))
    assert (dead.completed, dead.failed) == (0, 2) and all(e.startswith("ClientConnectorError") for e in dead.errors)
    assert math.isnan(dead.ttft.mean_ms)


def test_main_against_a_running_server(fake_server, capsys):
    _, url = fake_server
    argv = ["--base-url", url, "--num-prompts", "5", "--input-len", "12", "--output-len", "4", "--request-rate", "500"]
    assert bs.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"Successful requests:\s+5\n", out) and re.search(r"Total generated tokens:\s+20\n", out)


def test_tpot_and_percentile():
    r = bs.RequestResult(prompt_len=3, ttft=0.5, itls=[0.1] * 10, latency=1.5, output_tokens=11)
    assert r.tpot == pytest.approx(0.1)  # (e2e - TTFT) / (output tokens - 1)
    assert bs.RequestResult(prompt_len=3, ttft=0.5, latency=0.5, output_tokens=1).tpot is None
    xs = [float(x) for x in np.random.default_rng(0).exponential(size=37)]
    for q in (0, 50, 90, 99, 100):
        assert bs.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    st = bs.Stats.of(xs)
    assert st.median_ms == pytest.approx(1e3 * statistics.median(xs)) and st.mean_ms == pytest.approx(1e3 * np.mean(xs))


def test_poisson_arrivals():
    assert bs.arrival_times(4, math.inf, 0) == [0.0] * 4
    t = bs.arrival_times(2000, 10.0, seed=1)
    gaps = np.diff(t)
    assert t[0] == 0.0 and (gaps >= 0).all() and t == bs.arrival_times(2000, 10.0, seed=1)
    assert gaps.mean() == pytest.approx(0.1, rel=0.1) and gaps.std() == pytest.approx(0.1, rel=0.1)  # exponential


def test_prompts(tokenizer):
    special = set(tokenizer.backend.get_added_tokens_decoder())
    ps = bs.random_prompts(tokenizer, 6, 33, seed=5)
    assert [len(p) for p in ps] == [33] * 6 and not special & {i for p in ps for i in p}
    assert ps == bs.random_prompts(tokenizer, 6, 33, seed=5) and ps != bs.random_prompts(tokenizer, 6, 33, seed=6)
    code = bs.code_prompts(tokenizer, 3, 40, seed=0)
    assert [len(p) for p in code] == [40] * 3
    source = bs.code_text()
    assert all(tokenizer.decode(p) in source for p in code)  # windows of the real source
    with pytest.raises(ValueError, match="--input-len"):
        bs.code_prompts(tokenizer, 1, 10**7, seed=0)


def test_bad_arguments_name_the_flag(capsys):
    for argv in (["--num-prompts", "0"], ["--request-rate", "-1"], ["--dataset", "sharegpt"]):
        with pytest.raises(SystemExit):
            bs.main(argv)
        assert argv[0] in capsys.readouterr().err
    with pytest.raises(ValueError, match="--base-url: --compare starts its own"):
        bs.main(["--compare", "--base-url", "http://127.0.0.1:1"])


def test_against_llmkern_serve(capsys):
    """The default path: the benchmark starts `llmkern serve` on the demo model, measures, stops it."""
    argv = ["--num-prompts", "3", "--input-len", "8", "--output-len", "4", "--max-concurrency", "2",
            "--kv-cache-memory", "16M", "--max-num-seqs", "4"]
    assert bs.main(argv) == 0
    out = capsys.readouterr().out
    assert "llmkern.cli serve --model" in out and "--max-num-seqs 4 --kv-cache-memory 16M" in out
    assert re.search(r"Successful requests:\s+3\n", out) and re.search(r"Failed requests:\s+0\n", out)
    assert re.search(r"Total input tokens:\s+24\n", out) and re.search(r"Total generated tokens:\s+12\n", out)


def test_server_process_failures():
    bad = [sys.executable, "-c", "import sys; sys.exit('no such checkpoint: /nowhere')"]
    with bs.ServerProcess(bad, bs.free_port()) as server, pytest.raises(RuntimeError, match="no such checkpoint"):
        server.start().wait_healthy(60)
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    with bs.ServerProcess(silent, bs.free_port()) as server, pytest.raises(RuntimeError, match="--server-timeout"):
        server.start().wait_healthy(0.5)
    assert server.proc.returncode == -signal.SIGTERM  # stopped, not left running


def test_compare_runs_end_to_end(fake_server, monkeypatch, capsys):
    """--compare on tiny sizes, its three servers replaced by the in-thread fake one (ServerProcess is tested
    above): every row present, nothing failed, the right server flags, and transformers' generate really ran on
    the demo checkpoint."""
    launched = []

    class FakeServer:
        def __init__(self, cmd, port):
            launched.append(cmd)
            self.cmd, self.base_url = cmd, fake_server[1]

        def start(self):
            return self

        def wait_healthy(self, timeout_s):
            pass

        def stop(self):
            pass

    monkeypatch.setattr(bs, "ServerProcess", FakeServer)
    argv = ["--compare", "--num-prompts", "3", "--spec-prompts", "2", "--input-len", "8", "--output-len", "3",
            "--dtype", "float32"]
    assert bs.main(argv) == 0
    out = capsys.readouterr().out
    for scenario in ("one at a time", "continuous batching", "no speculation", "draft model k=4", "n-gram k=4",
                     "transformers generate"):
        assert scenario in out
    assert len(re.findall(r"\s3/0\s", out)) == 3 and len(re.findall(r"\s2/0\s", out)) == 3  # ok/failed per row
    assert 'GET /metrics: acceptance_rate 0.5, num_accepted_tokens_per_pos_total{position="0"} 7\n' in out
    flags = [cmd[cmd.index("--port") + 2:] for cmd in launched]
    common = ["--kv-cache-memory", str(bs.COMPARE_KV_CACHE_MEMORY), "--dtype", "float32"]
    assert flags == [common, common + ["--draft-model", str(demo_model_path("demo-draft")), "--num-speculative-tokens",
                                       "4"], common + ["--ngram", "--num-speculative-tokens", "4"]]
    assert all(f"$ {bs.shlex.join(cmd)}" in out for cmd in launched)  # the exact server command lines
