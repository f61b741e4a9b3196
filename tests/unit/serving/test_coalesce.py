"""Deltas that pile up between Ray transfers travel merged, in order, nothing lost."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.serving.deploy import coalesced
from lorafleet.serving.engine.protocol import TokenDelta, merge_deltas


def test_merge_keeps_order_and_last_finish_reason():
    d = merge_deltas([TokenDelta("a", (1,)), TokenDelta("b", (2, 3)), TokenDelta("", (), "stop")])
    assert d == TokenDelta("ab", (1, 2, 3), "stop")


async def test_a_slow_consumer_gets_merged_deltas_with_every_token():
    async def engine():
        for i in range(20):
            yield TokenDelta(str(i % 10), (i,), "length" if i == 19 else None)
            if i % 5 == 0:
                await asyncio.sleep(0)

    out = []
    async for d in coalesced(engine()):
        out.append(d)
        await asyncio.sleep(0.001)  # the consumer is slower than the producer
    assert len(out) < 20
    assert [t for d in out for t in d.token_ids] == list(range(20))
    assert "".join(d.text for d in out) == "".join(str(i % 10) for i in range(20))
    assert out[-1].finish_reason == "length"


async def test_closing_early_cancels_the_producer():
    closed = asyncio.Event()

    async def engine():
        try:
            for i in range(10_000):
                yield TokenDelta("x", (i,))
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    gen = coalesced(engine())
    await gen.__anext__()
    await gen.aclose()
    await asyncio.wait_for(closed.wait(), 1)


async def test_errors_reach_the_consumer():
    async def engine():
        yield TokenDelta("x", (1,))
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        async for _ in coalesced(engine()):
            pass
