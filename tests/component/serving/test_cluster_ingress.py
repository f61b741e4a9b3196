"""Two ingresses on one Redis, through the HTTP API, on the real engine: one quota between
them, and a registry that comes back empty answered with 503 "reset", not 401.

Each ingress is what ``make_services`` builds for a ``redis://`` registry (its own registry
client, quota book, tenancy cache and data directory), as two ingress pods would be; they
share the tiny vLLM engine of this test session (the quota is the ingress's business).
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from localserve import Redis

from lorafleet.serving.api.app import build_app
from lorafleet.serving.api.quotas_redis import RedisQuotaBook
from lorafleet.serving.api.request_policy import RequestPolicy
from lorafleet.serving.api.services import ApiServices
from lorafleet.serving.assemble import make_services
from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME
from lorafleet.serving.engine.client import LocalEngineClient

pytestmark = [pytest.mark.redis, pytest.mark.vllm]

ADMIN_KEY = "test-admin-key"


def admin(_: httpx.AsyncClient) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found")
    server = Redis(tmp_path / "redis-data", persist=False)
    server.root.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def ingresses(engine: Any, engine_config: Any, tmp_path: Path,
                    redis: Redis) -> AsyncIterator[list[tuple[ApiServices, httpx.AsyncClient]]]:
    out = []
    for n in range(2):
        s = make_services(engine_config=engine_config, engines=LocalEngineClient([engine]),
                          registry_url=redis.url, data_dir=tmp_path / f"ingress-{n}",
                          admin_key=ADMIN_KEY)
        assert isinstance(s.quotas, RedisQuotaBook)
        s.request_policy = RequestPolicy(ignore_eos_tenants="*")  # streams of a known length
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(s)),
                                   base_url="http://lorafleet", timeout=120)
        out.append((s, client))
    yield out
    for s, client in out:
        await client.aclose()
        await s.quotas.close()
        await s.registry.close()


async def tenant_key(c: httpx.AsyncClient, name: str, quota: dict[str, int]) -> str:
    r = await c.post("/admin/v1/tenants", json={"name": name, "quota": quota}, headers=admin(c))
    assert r.status_code == 201, r.text
    r = await c.post(f"/admin/v1/tenants/{name}/keys", json={}, headers=admin(c))
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def chat(max_tokens: int) -> dict[str, Any]:
    return {"model": TINY_MODEL_NAME, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hello"}]}


async def both_at_once(
    a: httpx.AsyncClient, b: httpx.AsyncClient, key: str, n: int, *, max_tokens: int,
) -> tuple[list[httpx.Response], Counter[int]]:
    """``n`` chat requests with ``key`` sent at once, alternating between the two ingresses."""
    auth = {"Authorization": f"Bearer {key}"}
    results = await asyncio.gather(*(
        (a if i % 2 else b).post("/v1/chat/completions", json=chat(max_tokens), headers=auth)
        for i in range(n)))
    return results, Counter(r.status_code for r in results)


async def test_two_ingresses_admit_one_quota_between_them(ingresses: Any) -> None:
    (_, a), (_, b) = ingresses
    results, codes = await both_at_once(
        a, b, await tenant_key(a, "alice", {"requests_per_minute": 6}), 20, max_tokens=2)
    assert codes == {200: 6, 429: 14}, codes  # one ingress alone used to admit 6 by itself
    refused = next(r for r in results if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["Retry-After"]) >= 1

    # Concurrency: 2 slots between both ingresses, held by long generations.
    _, codes = await both_at_once(
        a, b, await tenant_key(b, "bob", {"max_concurrent": 2}), 6, max_tokens=32)
    # At least the 2 slots; more only if a generation finished while others were admitted.
    assert codes[200] >= 2 and codes[200] + codes[429] == 6, codes
    # Every slot came back (releases reach Redis in the background).
    for s, _ in ingresses:
        await s.quotas.settled()
    assert await ingresses[0][0].quotas.leases("bob") == 0


async def test_registry_restarted_empty_answers_503_reset_not_401(
    ingresses: Any, redis: Redis,
) -> None:
    (sa, a), (_, b) = ingresses
    keys = [await tenant_key(a, f"t{i}", {}) for i in range(2)]
    seen, unseen = ({"Authorization": f"Bearer {k}"} for k in keys)
    for c in (a, b):
        assert (await c.get("/v1/models", headers=seen)).status_code == 200
    redis.stop()
    redis.start()  # no AOF: everything is gone
    await asyncio.sleep(1.1)  # past the 1 s generation cache
    for c in (a, b):
        r = await c.get("/v1/models", headers=unseen)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "service_unavailable"
        assert "reset or rolled back" in err["message"]
        assert (await c.get("/v1/models", headers=seen)).status_code == 200  # what it knew
        # Admin writes into the emptied store are refused too.
        r = await c.post("/admin/v1/tenants", json={"name": "mallory"}, headers=admin(c))
        assert r.status_code == 503 and "reset or rolled back" in r.text
    metrics = (await a.get("/metrics", headers=admin(a))).text
    assert "lorafleet_registry_refused 1.0" in metrics
    status = (await a.get("/admin/v1/registry", headers=admin(a))).json()
    assert status["trusted"] is False and status["refused"] == "reset"
    # The operator accepts the empty registry through one ingress; both follow.
    r = await a.post("/admin/v1/registry/accept-restore", headers=admin(a))
    assert r.status_code == 200 and r.json()["trusted"] is True, r.text
    await asyncio.sleep(1.1)
    for c in (a, b):
        assert (await c.get("/v1/models", headers=unseen)).status_code == 401  # gone for real
    assert (await b.get("/admin/v1/registry", headers=admin(b))).json()["trusted"] is True
    assert sa.tenancy.trust.trusted
