"""The gateway's per-hop histograms, as ``lorafleet bench overhead`` reads them.

Through the real API app on the fake engine: a streamed request passes its stages in order
(dispatched, first delta, first chunk written: each no earlier than the previous) and every
written chunk observes one ``ingress_write``; the replica-side ``timed`` wrapper observes one
first-token time and one interval per further engine output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
from tinyengine import ADMIN

from lorafleet.loadtest.bench.overhead import histograms
from lorafleet.serving.api.services import ApiServices
from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME
from lorafleet.serving.deploy import timed
from lorafleet.serving.engine.protocol import TokenDelta
from lorafleet.serving.metrics import ReplicaHopMetrics


async def test_a_stream_passes_its_stages_in_order_and_each_chunk_is_timed(
        api: httpx.AsyncClient, services: ApiServices) -> None:
    r = await api.post("/admin/v1/tenants", json={"name": "alice"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = await api.post("/admin/v1/tenants/alice/keys", json={}, headers=ADMIN)
    key = {"Authorization": f"Bearer {r.json()['key']}"}
    body = {"model": TINY_MODEL_NAME, "prompt": "hello there", "max_tokens": 6, "stream": True}
    async with api.stream("POST", "/v1/completions", json=body, headers=key) as resp:
        assert resp.status_code == 200
        chunks = [line async for line in resp.aiter_lines() if line.startswith("data: {")]

    h = histograms(services.metrics.exposition().decode())
    stage = "lorafleet_request_stage_seconds"
    sums = {s: h[(stage, s)] for s in ("dispatched", "first_delta", "first_written")}
    assert all(count == 1 for _, count in sums.values())
    assert sums["dispatched"][0] <= sums["first_delta"][0] <= sums["first_written"][0]
    assert h[("lorafleet_token_hop_seconds", "ingress_write")][1] == len(chunks)


async def test_timed_observes_first_token_then_each_interval() -> None:
    hops = ReplicaHopMetrics()

    async def engine() -> AsyncIterator[TokenDelta]:
        for i in range(4):
            await asyncio.sleep(0.01)
            yield TokenDelta("x", (i,))

    out = [d async for d in timed(engine(), hops.hop, time.time())]
    assert len(out) == 4
    h = histograms(hops.exposition())
    first_sum, first_n = h[("lorafleet_replica_hop_seconds", "engine_first_token")]
    gaps_sum, gaps_n = h[("lorafleet_replica_hop_seconds", "engine_token")]
    assert (first_n, gaps_n) == (1, 3)
    assert first_sum >= 0.009 and gaps_sum >= 3 * 0.009
