"""Prometheus metrics of one server (vLLM's set, under the `llmkern:` prefix).

Engine state (requests running and waiting, KV cache usage, token and preemption totals, prefix cache and
speculative decoding counters) is read from `aengine.stats()` when /metrics is scraped, by a custom collector, so
the engine thread never touches Prometheus objects. Latencies are observed by the API layer as outputs stream
to clients. Each app has its own CollectorRegistry: several servers in one process (the tests) never share or
collide on the global registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds; vLLM's buckets for the same histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class EngineStatsCollector:
    """Gauges and counters from one `stats()` call per scrape (the engine's counters are monotonic totals)."""

    def __init__(self, stats: Callable):
        self.stats = stats

    def collect(self):
        s = self.stats()
        gauges = {
            "num_requests_running": ("requests being generated", s.num_running),
            "num_requests_waiting": ("requests waiting to be scheduled", s.num_waiting),
            "kv_cache_usage_perc": ("fraction of KV cache blocks in use (1 = full)", s.kv_cache_usage),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"llmkern:{name}", doc, value=value)
        counters = {
            "prompt_tokens": ("prompt tokens processed", s.prompt_tokens),
            "generation_tokens": ("tokens generated", s.generation_tokens),
            "num_preemptions": ("requests preempted (recomputed later) for lack of KV blocks", s.num_preemptions),
            "prefix_cache_queries": ("prompt tokens looked up in the prefix cache", s.prefix_cache_queries),
            "prefix_cache_hits": ("prompt tokens found in the prefix cache", s.prefix_cache_hits),
            "spec_decode_num_drafts": ("speculative rounds", s.spec_rounds),
            "spec_decode_num_draft_tokens": ("tokens proposed by the speculator", s.spec_drafted),
            "spec_decode_num_accepted_tokens": ("proposed tokens the target accepted", s.spec_accepted),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"llmkern:{name}", doc, value=value)
        per_position = CounterMetricFamily("llmkern:spec_decode_num_accepted_tokens_per_pos",
                                           "accepted proposed tokens by their position in the proposal",
                                           labels=["position"])
        for position, accepted in enumerate(s.spec_accepted_per_position):
            per_position.add_metric([str(position)], accepted)
        yield per_position
        # Ratios over the server's lifetime (0 before any lookup / proposal).
        yield GaugeMetricFamily("llmkern:prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries",
                                value=s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0)
        yield GaugeMetricFamily("llmkern:spec_decode_acceptance_rate", "accepted / drafted tokens",
                                value=s.spec_accepted / s.spec_drafted if s.spec_drafted else 0.0)
        yield GaugeMetricFamily("llmkern:spec_decode_mean_accepted_length",
                                "tokens gained per speculative round (accepted + the bonus or correction token)",
                                value=(s.spec_accepted + s.spec_rounds) / s.spec_rounds if s.spec_rounds else 0.0)


class ServerMetrics:
    def __init__(self, stats: Callable):
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(stats))
        self.ttft = Histogram("llmkern:time_to_first_token_seconds", "arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("llmkern:inter_token_latency_seconds", "time between a sample's successive outputs",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("llmkern:e2e_request_latency_seconds", "arrival to the last output",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("llmkern:request_success", "finished samples by finish reason",
                                labelnames=["finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """One HTTP request's latencies: `tokens(key)` when a sample (key) receives tokens, `finish(reason)` per sample
    that ends, `done()` once at the end."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last: dict = {}  # sample key -> when it last received tokens

    def tokens(self, key) -> None:
        now = time.monotonic()
        if not self.last:
            self.metrics.ttft.observe(now - self.arrival)
        if key in self.last:
            self.metrics.itl.observe(now - self.last[key])
        self.last[key] = now

    def finish(self, reason: str) -> None:
        self.metrics.finished.labels(finished_reason=reason).inc()

    def done(self) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.arrival)
