"""AsyncEngine: concurrent async streams over the engine thread, aborts, a dead engine, shutdown."""

from __future__ import annotations

import asyncio

import pytest
from llm_refs import write_llama_checkpoint

from llmkern.generation import SamplingParams
from llmkern.serve.async_engine import AsyncEngine, EngineDeadError, EngineStoppedError
from llmkern.serve.config import EngineConfig
from llmkern.serve.engine import Engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [42] * 11]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_llama_checkpoint(tmp_path_factory.mktemp("async"))


def engine(checkpoint, **kw) -> Engine:
    return Engine.from_pretrained(checkpoint[1], EngineConfig(block_size=4, **kw))


async def collect(stream) -> list[int]:
    tokens = []
    async for out in stream:
        tokens += [t for d in out.deltas for t in d.token_ids]
    return tokens


def test_concurrent_streams_equal_the_sync_engine(checkpoint):
    sync = engine(checkpoint)
    for i, p in enumerate(PROMPTS):
        sync.add_request(str(i), p, GREEDY)
    expected = {str(i): [] for i in range(len(PROMPTS))}
    while sync.has_unfinished_requests():
        for out in sync.step():
            expected[out.request_id] += [t for d in out.deltas for t in d.token_ids]

    async def main():
        aengine = AsyncEngine(engine(checkpoint))
        aengine.start()
        streams = [aengine.add_request(str(i), p, GREEDY) for i, p in enumerate(PROMPTS)]
        got = await asyncio.gather(*map(collect, streams))
        with pytest.raises(ValueError, match="maximum context length"):
            aengine.add_request("x", [5] * 10, SamplingParams(max_tokens=10**4))
        await aengine.shutdown(5.0)
        with pytest.raises(EngineStoppedError):
            aengine.add_request("y", PROMPTS[0], GREEDY)
        return got

    assert asyncio.run(main()) == [expected[str(i)] for i in range(len(PROMPTS))]


def test_abort_ends_the_stream_and_frees_blocks(checkpoint):
    async def main():
        aengine = AsyncEngine(engine(checkpoint))
        aengine.start()
        stream = aengine.add_request("a", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
        first = await stream.__anext__()
        aengine.abort("a")
        outs = [first] + [o async for o in stream]
        assert outs[-1].finished and outs[-1].deltas[0].finish_reason == "abort"
        assert aengine.num_unfinished == 0 and aengine.stats().kv_cache_usage == 0.0
        await aengine.shutdown(1.0)

    asyncio.run(main())


def test_a_failing_step_kills_the_engine_and_fails_every_stream(checkpoint):
    async def main():
        e = engine(checkpoint)
        e.step = lambda on_model_start=None: 1 / 0
        aengine = AsyncEngine(e)
        aengine.start()
        assert aengine.healthy
        stream = aengine.add_request("a", PROMPTS[0], GREEDY)
        with pytest.raises(EngineDeadError, match="ZeroDivisionError"):
            await collect(stream)
        assert not aengine.healthy
        with pytest.raises(EngineDeadError):
            aengine.add_request("b", PROMPTS[0], GREEDY)

    asyncio.run(main())
