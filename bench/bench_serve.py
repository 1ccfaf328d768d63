"""Serving benchmark of `llmkern serve`, after vLLM's benchmarks/benchmark_serving.py (issue 7).

A client streams `POST /v1/completions` (stream, stream_options.include_usage, ignore_eos, greedy) with prompts
sent as token-id lists of a fixed length, a fixed number of output tokens, Poisson arrivals at --request-rate
(inf: all at once) and/or at most --max-concurrency requests in flight. Per request: TTFT (time to the first
token chunk), ITLs (gaps between token chunks), end-to-end latency and TPOT = (e2e - TTFT) / (output tokens - 1).
The report gives their mean, median and p99 (ITLs pooled over requests, as vLLM does), requests/s and output
tokens/s over the benchmark's duration, and the failures.

    python -m bench.bench_serve [--model DIR] [--num-prompts 16 --max-concurrency 16 ...]   # starts its own server
    python -m bench.bench_serve --base-url http://127.0.0.1:8000 --model DIR                # a running server
    python -m bench.bench_serve --compare [--markdown]                                      # the issue's targets

Without --base-url it starts `python -m llmkern.cli serve --model DIR --port <free port> [server flags]`, waits for
GET /health == 200 and stops it with SIGTERM afterwards. --model names the tokenizer to draw prompts from too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx  # the few synchronous calls (health, models, metrics); the load itself goes through aiohttp

# ---- workloads ----


def random_prompts(tokenizer, num: int, input_len: int, seed: int) -> list[list[int]]:
    """`num` prompts of exactly `input_len` token ids drawn uniformly from the vocabulary without its special
    tokens (vLLM's random dataset; sent as ids, so no re-tokenization changes their length)."""
    special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    return [rng.choices(vocab, k=input_len) for _ in range(num)]


def code_text() -> str:
    """Real Python source for code-completion prompts: the demo model's held-out sample (files it never trained
    on), or this module's own source where that is missing (a checkpoint without the sample)."""
    from llmkern.models import demo_model_path

    sample = demo_model_path("demo-target") / "heldout_sample.jsonl"
    if sample.is_file():
        return "\n".join(json.loads(line)["text"] for line in sample.read_text().splitlines() if line.strip())
    return Path(__file__).read_text()


def code_prompts(tokenizer, num: int, input_len: int, seed: int) -> list[list[int]]:
    """`num` windows of `input_len` tokens of real Python code at seeded random offsets: text a code model can
    continue and whose repeats n-gram prompt lookup can find."""
    ids = tokenizer.encode(code_text(), add_special_tokens=False)
    if len(ids) <= input_len:
        raise ValueError(f"--input-len: {input_len} tokens is longer than the code corpus ({len(ids)} tokens)")
    rng = random.Random(seed)
    return [ids[s:s + input_len] for s in (rng.randrange(len(ids) - input_len) for _ in range(num))]


DATASETS = {"random": random_prompts, "code": code_prompts}


def arrival_times(num: int, request_rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: a Poisson process (exponential gaps, mean 1 / rate) from t = 0;
    all zero for an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(num):
        times.append(t)
        t += rng.expovariate(request_rate)
    return times


# ---- the client ----


@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    ttft: float | None = None  # seconds from sending to the first token chunk
    itls: list[float] = dataclasses.field(default_factory=list)  # gaps between token chunks
    latency: float | None = None  # end to end
    output_tokens: int | None = None  # usage.completion_tokens
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if not self.ok or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def completion_payload(model: str, prompt: list[int], output_len: int) -> dict:
    """Greedy without the checkpoint's repetition penalty (the server would apply its generation_config's, e.g. the
    demo model's 1.2): plain argmax decoding, the same work transformers' baseline does."""
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "repetition_penalty": 1.0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


async def send_request(session: aiohttp.ClientSession, url: str, payload: dict) -> RequestResult:
    """One streamed completion, timed chunk by chunk. Any failure (status, transport, a malformed or incomplete
    stream) is recorded in .error rather than raised, so one bad request does not end the benchmark."""
    res = RequestResult(prompt_len=len(payload["prompt"]))
    t0 = last = time.perf_counter()
    done = False
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                body = (await resp.read()).decode(errors="replace")
                res.error = f"HTTP {resp.status}: {body[:300]}"
                return res
            async for line in resp.content:  # one line at a time
                now = time.perf_counter()
                if not line.startswith(b"data:"):
                    continue  # blank separators, SSE comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return res
                if chunk.get("choices"):  # a token chunk (the usage chunk has none)
                    if res.ttft is None:
                        res.ttft = now - t0
                    else:
                        res.itls.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.output_tokens = int(chunk["usage"]["completion_tokens"])
        res.latency = time.perf_counter() - t0
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
        res.error = f"{type(e).__name__}: {e}"  # ValueError: bad JSON in the stream
        return res
    if not done:
        res.error = "the stream ended without data: [DONE]"
    elif res.ttft is None:
        res.error = "no token chunk"
    elif res.output_tokens is None:
        res.error = "no usage chunk (stream_options.include_usage)"
    return res


def client_session(timeout_s: float, max_connections: int = 0) -> aiohttp.ClientSession:
    """The load's HTTP client. aiohttp, as vLLM's benchmark: the client shares the server's cores here, and its
    streaming reads cost about a third of httpx's CPU (0.2-0.3 s against 0.7-0.9 s for 4096 streamed tokens, 2 cores,
    bench/RESULTS.md). max_connections 0: no limit."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s, connect=10.0),
                                 connector=aiohttp.TCPConnector(limit=max_connections))


@dataclasses.dataclass
class BenchResult:
    results: list[RequestResult]
    duration_s: float


async def run_requests(base_url: str, model: str, prompts: list[list[int]], output_len: int, *,
                       request_rate: float = math.inf, max_concurrency: int | None = None, seed: int = 0,
                       timeout_s: float = 600.0) -> BenchResult:
    """Sends every prompt at its Poisson arrival time, at most max_concurrency in flight (a request past the
    cap waits, and its TTFT is counted from when it is sent, as in vLLM)."""
    url = base_url.rstrip("/") + "/v1/completions"
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async with client_session(timeout_s, max_concurrency or 0) as session:
        async def one(prompt: list[int], at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            payload = completion_payload(model, prompt, output_len)
            if gate is None:
                return await send_request(session, url, payload)
            async with gate:
                return await send_request(session, url, payload)

        start = time.perf_counter()
        times = arrival_times(len(prompts), request_rate, seed)
        results = await asyncio.gather(*(one(p, t) for p, t in zip(prompts, times)))
        return BenchResult(list(results), time.perf_counter() - start)


# ---- the report ----


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclasses.dataclass
class Stats:
    mean_ms: float
    median_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        if not seconds:
            return cls(math.nan, math.nan, math.nan)
        return cls(1e3 * statistics.fmean(seconds), 1e3 * statistics.median(seconds), 1e3 * percentile(seconds, 99))


@dataclasses.dataclass
class Report:
    num_requests: int
    completed: int
    failed: int
    errors: list[str]  # the distinct failure messages (at most 5)
    duration_s: float
    input_tokens: int  # of completed requests
    output_tokens: int
    request_throughput: float  # completed / s
    output_throughput: float  # output tokens / s
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2e: Stats


def summarize(bench: BenchResult) -> Report:
    ok = [r for r in bench.results if r.ok]
    errors = list(dict.fromkeys(r.error for r in bench.results if not r.ok))[:5]
    out = sum(r.output_tokens for r in ok)
    d = bench.duration_s
    return Report(
        num_requests=len(bench.results), completed=len(ok), failed=len(bench.results) - len(ok), errors=errors,
        duration_s=d, input_tokens=sum(r.prompt_len for r in ok), output_tokens=out,
        request_throughput=len(ok) / d if d > 0 else math.nan, output_throughput=out / d if d > 0 else math.nan,
        ttft=Stats.of([r.ttft for r in ok]), tpot=Stats.of([r.tpot for r in ok if r.tpot is not None]),
        itl=Stats.of([g for r in ok for g in r.itls]), e2e=Stats.of([r.latency for r in ok]),
    )


def format_report(rep: Report, title: str = "Serving Benchmark Result") -> str:
    lines = [f"{' ' + title + ' ':=^50}"]
    row = lambda name, value: lines.append(f"{name:<40}{value}")
    row("Successful requests:", rep.completed)
    row("Failed requests:", rep.failed)
    row("Benchmark duration (s):", f"{rep.duration_s:.2f}")
    row("Total input tokens:", rep.input_tokens)
    row("Total generated tokens:", rep.output_tokens)
    row("Request throughput (req/s):", f"{rep.request_throughput:.2f}")
    row("Output token throughput (tok/s):", f"{rep.output_throughput:.2f}")
    for name, key, st in (("Time to First Token", "TTFT", rep.ttft),
                          ("Time per Output Token (excl. 1st token)", "TPOT", rep.tpot),
                          ("Inter-token Latency", "ITL", rep.itl), ("End-to-end Latency", "E2EL", rep.e2e)):
        lines.append(f"{name:-^50}")
        row(f"Mean {key} (ms):", f"{st.mean_ms:.2f}")
        row(f"Median {key} (ms):", f"{st.median_ms:.2f}")
        row(f"P99 {key} (ms):", f"{st.p99_ms:.2f}")
    lines += [f"error: {e}" for e in rep.errors]
    lines.append("=" * 50)
    return "\n".join(lines)


# ---- the server ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str | Path, port: int, server_flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "llmkern.cli", "serve", "--model", str(model), "--port", str(port), *server_flags]


class ServerProcess:
    """A server subprocess (`cmd` must make it listen on 127.0.0.1:port): start() launches it, wait_healthy()
    polls GET /health until 200, stop() sends SIGTERM (then SIGKILL after stop_timeout_s). Its stdout and
    stderr go to a temporary file whose tail is shown when it fails to come up."""

    def __init__(self, cmd: list[str], port: int):
        self.cmd, self.port = cmd, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+b")

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def output_tail(self, n_chars: int = 4000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n_chars:]

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with code {self.proc.returncode} before GET /health "
                                       f"answered 200\n$ {shlex.join(self.cmd)}\n{self.output_tail()}")
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the server did not answer GET /health with 200 within {timeout_s:g} s "
                                       f"(--server-timeout)\n$ {shlex.join(self.cmd)}\n{self.output_tail()}")
                time.sleep(0.25)

    def stop(self, stop_timeout_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()


def served_model_name(base_url: str) -> str:
    """The first model id of GET /v1/models: what requests must name."""
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10.0)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


SPECULATION_FLAGS = ("draft_model", "num_speculative_tokens")  # and --ngram
ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "dtype")


def server_flags(args: argparse.Namespace, speculation: bool = True) -> list[str]:
    """The `llmkern serve` flags this benchmark passes through (those set; the speculation ones unless
    speculation=False), then --server-args."""
    flags = []
    for name in (SPECULATION_FLAGS if speculation else ()) + ENGINE_FLAGS:
        if getattr(args, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if speculation and args.ngram:
        flags.append("--ngram")
    return flags + shlex.split(args.server_args or "")


# ---- comparison: the targets, side by side in one run ----

COMPARE_CONCURRENCY = 16  # the issue's batch and transformers' static batch size
COMPARE_KV_CACHE_MEMORY = "128M"  # per server: three servers run at once, none takes a share of free memory
COMPARE_HEADER = ["scenario", "prompts", "server flags", "conc.", "ok/failed", "out tok/s", "TTFT mean ms",
                  "TPOT mean ms", "ITL median ms", "ITL p99 ms", "ratio", "target"]


async def interleaved(servers: dict[str, tuple[str, str]], prompts: list[list[int]], output_len: int,
                      timeout_s: float) -> dict[str, BenchResult]:
    """Each prompt sent to each server (name -> (base URL, model name)) in turn, one request at a time: batch 1,
    and machine drift hits every server alike. A server's duration is the sum of its requests' latencies."""
    results: dict[str, list[RequestResult]] = {k: [] for k in servers}
    async with client_session(timeout_s) as session:
        for prompt in prompts:
            for key, (url, name) in servers.items():
                payload = completion_payload(name, prompt, output_len)
                results[key].append(await send_request(session, url.rstrip("/") + "/v1/completions", payload))
    return {k: BenchResult(v, sum(r.latency or 0.0 for r in v)) for k, v in results.items()}


def transformers_generator(model: str, dtype: str | None):
    """generate(prompts, output_len) -> seconds: transformers' greedy `generate` on the checkpoint, one static batch
    of equal-length prompts (no padding), min_new_tokens = max_new_tokens so EOS cannot end a row early."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llmkern.llm import parse_dtype

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=parse_dtype(dtype) if dtype else "auto").eval()
    eos = hf.generation_config.eos_token_id
    eos = eos if eos is not None else 0
    # Replaces the checkpoint's defaults (sampling, a repetition penalty) that generate() would merge in: plain greedy.
    hf.generation_config = GenerationConfig(do_sample=False, eos_token_id=eos, repetition_penalty=1.0,
                                            pad_token_id=eos[0] if isinstance(eos, list) else eos)

    def generate(prompts: list[list[int]], output_len: int) -> float:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                              min_new_tokens=output_len)
            seconds = time.perf_counter() - t0
        assert out.shape == (ids.shape[0], ids.shape[1] + output_len), out.shape
        return seconds

    return generate


def batching_rows(base_url: str, name: str, prompts: list[list[int]], output_len: int, hf_generate,
                  timeout_s: float) -> tuple[Report, Report, float]:
    """(one at a time, concurrency 16, transformers' output tokens/s) over the prompts, taken batch by batch of 16
    in turn (drift on a shared machine hits all three alike); after a warm-up of each on the first batch."""
    batches = [prompts[i:i + COMPARE_CONCURRENCY] for i in range(0, len(prompts), COMPARE_CONCURRENCY)]
    asyncio.run(run_requests(base_url, name, batches[0], 4, max_concurrency=COMPARE_CONCURRENCY, timeout_s=timeout_s))
    hf_generate(batches[0], 2)
    runs: dict[int, list[BenchResult]] = {1: [], COMPARE_CONCURRENCY: []}
    hf_seconds = 0.0
    for batch in batches:
        for conc, acc in runs.items():
            acc.append(asyncio.run(run_requests(base_url, name, batch, output_len, max_concurrency=conc,
                                                timeout_s=timeout_s)))
        hf_seconds += hf_generate(batch, output_len)
    one, batched = (summarize(BenchResult([r for b in acc for r in b.results], sum(b.duration_s for b in acc)))
                    for acc in runs.values())
    return one, batched, len(prompts) * output_len / hf_seconds


def checkpoint_dtype(model: str) -> str:
    """The weights' dtype config.json names (what both sides load without --dtype)."""
    from llmkern.models.config import ModelConfig

    dtype = ModelConfig.from_json(Path(model) / "config.json").weight_dtype()
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def speculative_metrics(base_url: str) -> str:
    """The server's speculative-decoding samples of GET /metrics (Prometheus text), "name{labels} value" each with
    the name's common prefix dropped, e.g. "acceptance_rate 0.452, mean_accepted_length 2.76"."""
    try:
        resp = httpx.get(base_url + "/metrics", timeout=10.0)
    except httpx.HTTPError as e:
        return f"GET /metrics failed: {e}"
    if resp.status_code != 200:
        return f"GET /metrics: HTTP {resp.status_code}"
    samples = [line.rpartition(" ") for line in resp.text.splitlines() if line.strip() and not line.startswith("#")]
    spec = [f"{name.split('spec_decode_')[-1]} {float(value):.3g}" for name, _, value in samples
            if "spec_decode" in name.split("{")[0]]
    return ", ".join(spec) or "no spec_decode samples"


def compare_row(scenario: str, prompts: str, flags: str, conc: int, rep: Report, ratio: str, target: str) -> list[str]:
    f = lambda v: "-" if math.isnan(v) else f"{v:.1f}"
    return [scenario, prompts, flags, str(conc), f"{rep.completed}/{rep.failed}", f"{rep.output_throughput:.1f}",
            f(rep.ttft.mean_ms), f(rep.tpot.mean_ms), f(rep.itl.median_ms), f(rep.itl.p99_ms), ratio, target]


def compare(args: argparse.Namespace) -> int:
    """Starts three servers (no speculation, draft model, n-gram) on the same target, measures (1) the same
    random-prompt requests one at a time, at concurrency 16 and with transformers' generate in static batches of
    16, batch by batch in turn, (2) batch-1 greedy code completion on each server, interleaved; prints one table."""
    from llmkern.generation import Tokenizer
    from llmkern.models import demo_model_path

    from bench.harness import format_table

    model = args.model or default_model()
    draft = args.draft_model or str(demo_model_path("demo-draft"))
    k = str(args.num_speculative_tokens or 4)
    tok = Tokenizer.from_pretrained(model)
    rand = random_prompts(tok, args.num_prompts, args.input_len, args.seed)
    code = code_prompts(tok, args.spec_prompts, args.input_len, args.seed)
    common = (["--kv-cache-memory", COMPARE_KV_CACHE_MEMORY] if args.kv_cache_memory is None else []) + \
        server_flags(args, speculation=False)
    variants = {"none": [], "draft": ["--draft-model", draft, "--num-speculative-tokens", k],
                "ngram": ["--ngram", "--num-speculative-tokens", k]}
    ports = {v: free_port() for v in variants}
    servers = {v: ServerProcess(serve_command(model, ports[v], common + f), ports[v]) for v, f in variants.items()}
    t0 = time.perf_counter()
    print(f"$ {getattr(args, 'command_line', None) or shlex.join([sys.executable, *sys.argv])}")
    try:
        for s in servers.values():
            print(f"$ {shlex.join(s.cmd)}", flush=True)
            s.start()
        for s in servers.values():
            s.wait_healthy(args.server_timeout)
        names = {v: args.served_model_name or served_model_name(s.base_url) for v, s in servers.items()}
        for v, s in servers.items():  # first-request costs out of the measurements
            warm = asyncio.run(run_requests(s.base_url, names[v], code[:1], 4, timeout_s=args.request_timeout))
            if not warm.results[0].ok:
                raise RuntimeError(f"the warm-up request to the {v} server failed: {warm.results[0].error}")
        print(f"random prompts: one at a time, at concurrency {COMPARE_CONCURRENCY}, and transformers' generate "
              f"in static batches of {COMPARE_CONCURRENCY}, batch by batch in turn ...", flush=True)
        hf_generate = transformers_generator(model, args.dtype)
        one, batched, hf_tps = batching_rows(servers["none"].base_url, names["none"], rand, args.output_len,
                                             hf_generate, args.request_timeout)
        print("code prompts, batch 1, interleaved over the three servers ...", flush=True)
        urls = {v: (s.base_url, names[v]) for v, s in servers.items()}
        spec = {v: summarize(b) for v, b in
                asyncio.run(interleaved(urls, code, args.output_len, args.request_timeout)).items()}
        spec_metrics = {v: speculative_metrics(servers[v].base_url) for v in ("draft", "ngram")}
    finally:
        for s in servers.values():
            s.stop()

    tpot_x = lambda v: f"{spec['none'].tpot.mean_ms / spec[v].tpot.mean_ms:.2f}x lower TPOT"
    rows = [
        compare_row("one at a time", "random", "-", 1, one, "", ""),
        compare_row("continuous batching", "random", "-", COMPARE_CONCURRENCY, batched,
                    f"{batched.output_throughput / one.output_throughput:.2f}x out tok/s", ">= 4x"),
        compare_row("no speculation", "code", "-", 1, spec["none"], "", ""),
        compare_row(f"draft model k={k}", "code", shlex.join(variants["draft"][:1] + [Path(draft).name]) + f" -k {k}",
                    1, spec["draft"], tpot_x("draft"), ">= 1.8x"),
        compare_row(f"n-gram k={k}", "code", f"--ngram -k {k}", 1, spec["ngram"], tpot_x("ngram"), "reported"),
        ["transformers generate", "random", f"static batches of {COMPARE_CONCURRENCY}", str(COMPARE_CONCURRENCY),
         f"{len(rand)}/0", f"{hf_tps:.1f}", "-", "-", "-", "-",
         f"llmkern {batched.output_throughput / hf_tps:.2f}x out tok/s", ">= 3x"],
    ]
    print()
    print(f"{Path(model).name} ({args.dtype or checkpoint_dtype(model)}), {args.num_prompts} random and "
          f"{args.spec_prompts} code prompts of {args.input_len} tokens, {args.output_len} output tokens each "
          f"(ignore_eos, greedy), seed {args.seed}, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
    print(format_table(COMPARE_HEADER, rows, args.markdown))
    print(f"-k: --num-speculative-tokens; TPOT = (e2e - TTFT) / (output tokens - 1); the random-prompt rows ran "
          f"{COMPARE_CONCURRENCY} prompts at a time in turn, the code rows one request per server in turn. "
          f"{time.perf_counter() - t0:.0f} s in all.")
    for v, text in spec_metrics.items():
        print(f"{v} server GET /metrics: {text}")
    failed = sum(r.failed for r in (one, batched, *spec.values()))
    return 0 if failed == 0 else 1


# ---- command line ----


def default_model() -> str:
    from llmkern.models import demo_model_path

    return str(demo_model_path("demo-target"))


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 (or inf), got {s}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory: served, and its tokenizer draws the "
                   "prompts (default: the demo-target model)")
    p.add_argument("--base-url", help="benchmark a running server (e.g. http://127.0.0.1:8000) instead of starting one")
    p.add_argument("--served-model-name", help="the model name requests carry (default: the first of GET /v1/models)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="random",
                   help="random: uniform vocabulary ids; code: windows of real Python code (default random)")
    p.add_argument("--num-prompts", type=positive_int, default=128,
                   help="requests (default 128; --compare: 8 batches of 16 a side. 32 left each concurrency-16 "
                   "batch ~0.1 s, and its ratio to one at a time swung 3.2-4.4x run to run on Zen 5)")
    p.add_argument("--input-len", type=positive_int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=positive_int, default=64, help="output tokens per request (ignore_eos)")
    p.add_argument("--request-rate", type=positive_float, default=math.inf,
                   help="Poisson arrivals per second (default inf: all at once)")
    p.add_argument("--max-concurrency", type=positive_int, help="at most this many requests in flight")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    p.add_argument("--server-timeout", type=positive_float, default=180.0, help="seconds to wait for GET /health")
    p.add_argument("--request-timeout", type=positive_float, default=600.0, help="seconds per request")
    g = p.add_argument_group("server flags passed to `llmkern serve` (when this benchmark starts the server)")
    g.add_argument("--draft-model")
    g.add_argument("--ngram", action="store_true")
    g.add_argument("--num-speculative-tokens", type=positive_int)
    g.add_argument("--max-num-seqs", type=positive_int)
    g.add_argument("--max-num-batched-tokens", type=positive_int)
    g.add_argument("--kv-cache-memory")
    g.add_argument("--dtype")
    g.add_argument("--server-args", help="further `llmkern serve` flags, one shell-quoted string")
    c = p.add_argument_group("comparison (--compare)")
    c.add_argument("--compare", action="store_true", help="measure the issue's targets side by side in one run "
                   "(batching, speculation, transformers' generate) and print one table")
    c.add_argument("--spec-prompts", type=positive_int, default=16, help="code prompts of the speculation rows")
    c.add_argument("--markdown", action="store_true", help="print the comparison table in markdown")


def run(args: argparse.Namespace) -> int:
    if args.compare and args.base_url:
        raise ValueError("--base-url: --compare starts its own three servers (no speculation, draft, n-gram)")
    if args.compare:
        return compare(args)
    model = args.model or default_model()
    from llmkern.generation import Tokenizer

    prompts = DATASETS[args.dataset](Tokenizer.from_pretrained(model), args.num_prompts, args.input_len, args.seed)
    if args.base_url:
        rep = benchmark(args.base_url, args, prompts)
    else:
        port = free_port()
        with ServerProcess(serve_command(model, port, server_flags(args)), port) as server:
            print(f"$ {shlex.join(server.cmd)}", flush=True)
            server.start().wait_healthy(args.server_timeout)
            rep = benchmark(server.base_url, args, prompts)
    print(format_report(rep))
    return 0 if rep.failed == 0 else 1


def benchmark(base_url: str, args: argparse.Namespace, prompts: list[list[int]]) -> Report:
    name = args.served_model_name or served_model_name(base_url)
    warmup = asyncio.run(run_requests(base_url, name, prompts[:1], 2, timeout_s=args.request_timeout))
    if not warmup.results[0].ok:  # a misconfigured server fails every request: say so once
        raise RuntimeError(f"the warm-up request to {base_url} failed: {warmup.results[0].error}")
    bench = asyncio.run(run_requests(base_url, name, prompts, args.output_len, request_rate=args.request_rate,
                                     max_concurrency=args.max_concurrency, seed=args.seed,
                                     timeout_s=args.request_timeout))
    return summarize(bench)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_serve", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.command_line = shlex.join([sys.executable, "-m", "bench.bench_serve", *argv])
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
