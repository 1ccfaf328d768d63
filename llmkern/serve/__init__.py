"""llmkern.serve: the inference engine and its OpenAI-compatible HTTP server (`llmkern serve`, `make serve`).

    engine.py       Engine: requests in, text deltas out, one continuous-batching step at a time
    scheduler.py    token budget, chunked prefill, first-come first-served admission, preemption by recompute
    kv_cache.py     block reference counts, free queue (LRU), prefix caching, copy-on-write
    speculative.py  draft-model and n-gram proposers, verification (spec_decode.py: the exact rejection sampler)
    async_engine.py AsyncEngine: the engine on a background thread, per-request async streams
    api.py          FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
"""
