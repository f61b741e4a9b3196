"""Quotas as a tenant meets them: through the real API app, on the fake engine.

The rule (``api.quotas``): a tenant's ``max_concurrent`` counts requests from admission until
their output ends, however it ends (finished, or the client gone); ``requests_per_minute`` is a
bucket; a refusal is a 429 with ``Retry-After`` and an OpenAI-shaped error, and it reaches no
engine. The engine is ``FakeEngine`` (held streams stay in flight until released), the
tokenizer the tiny test model's, the registry SQLite: seconds, no vLLM.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fakeengine import FakeEngine
from tinyengine import ADMIN

from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME

pytestmark = pytest.mark.middle


async def tenant_key(api: httpx.AsyncClient, quota: dict[str, int]) -> dict[str, str]:
    r = await api.post("/admin/v1/tenants", json={"name": "alice", "quota": quota}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = await api.post("/admin/v1/tenants/alice/keys", json={}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def completion(max_tokens: int = 4, stream: bool = False) -> dict[str, Any]:
    return {"model": TINY_MODEL_NAME, "prompt": "hello there", "max_tokens": max_tokens,
            "stream": stream}


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def one_held(api: httpx.AsyncClient, fake: FakeEngine, quota: dict[str, int],
                   stream: bool = False) -> tuple[dict[str, str], asyncio.Task[httpx.Response]]:
    """A tenant with ``quota`` and one request of theirs in flight, held by the engine."""
    key = await tenant_key(api, quota)
    fake.hold()
    held = asyncio.create_task(
        api.post("/v1/completions", json=completion(stream=stream), headers=key))
    await until(lambda: fake.in_flight == 1)
    return key, held


def assert_refused(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"}


async def test_a_running_request_holds_its_slot_until_it_finishes(
    api: httpx.AsyncClient, fake: FakeEngine
) -> None:
    key, first = await one_held(api, fake, {"max_concurrent": 1})
    assert_refused(await api.post("/v1/completions", json=completion(), headers=key))
    assert len(fake.requests) == 1  # the refused request never reached the engine
    fake.release()
    r = await first
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    r = await api.post("/v1/completions", json=completion(), headers=key)
    assert r.status_code == 200, r.text


async def test_a_client_that_goes_away_gives_its_slot_back(
    api: httpx.AsyncClient, fake: FakeEngine
) -> None:
    key, first = await one_held(api, fake, {"max_concurrent": 1}, stream=True)
    first.cancel()  # the client disconnects mid-stream
    with pytest.raises(asyncio.CancelledError):
        await first
    await until(lambda: fake.in_flight == 0)
    fake.release()
    r = await api.post("/v1/completions", json=completion(), headers=key)
    assert r.status_code == 200, r.text


async def test_requests_per_minute_refuse_the_request_over_the_burst(
    api: httpx.AsyncClient, fake: FakeEngine
) -> None:
    key = await tenant_key(api, {"requests_per_minute": 2})
    for _ in range(2):
        r = await api.post("/v1/completions", json=completion(1), headers=key)
        assert r.status_code == 200, r.text
    assert_refused(await api.post("/v1/completions", json=completion(1), headers=key))
    assert len(fake.requests) == 2


async def test_a_tenant_without_limits_is_never_refused(
    api: httpx.AsyncClient, fake: FakeEngine
) -> None:
    key = await tenant_key(api, {})
    results = await asyncio.gather(*(
        api.post("/v1/completions", json=completion(2), headers=key) for _ in range(8)))
    assert [r.status_code for r in results] == [200] * 8


async def test_the_engine_is_told_which_tenant_sent_each_request(
    api: httpx.AsyncClient, fake: FakeEngine,
) -> None:
    # The scheduler's per-tenant rules (batch share, slot share) count base-model requests too.
    key = await tenant_key(api, {})
    r = await api.post("/v1/completions", json={**completion(), "n": 2}, headers=key)
    assert r.status_code == 200, r.text
    assert [q.tenant for q in fake.requests] == ["alice", "alice"]
