"""Redis whose packets are dropped (not refused): the ingress's registry and quota paths.

A real ``redis-server`` behind a TCP proxy that stops forwarding (``blackhole.py``): every
connection stays open and nothing answers, as when a node or a network path dies. The real
``Tenancy`` (over the real Redis registry) and the real Redis quota book sit behind it, on
the real clock, with the deadlines shortened so the test takes seconds. A request's pre-engine
path is what the ingress does before the engine: authenticate, resolve the model, admit.

What a user notices, and what this asserts:
- a tenant the ingress already knows keeps its normal latency during the black hole: at most
  one request per ``retry_after_s`` (the breaker's probe) waits the deadline;
- a key the ingress has never seen gets a fast 503, not a socket timeout;
- while a probe is in flight every other request answers at once (one probe at a time);
- when forwarding resumes, the next probe closes the breaker: unknown keys are 401 again and
  a key created meanwhile works, without a restart.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from blackhole import BlackholeProxy
from localserve import Redis

from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import AdapterRecord, ApiKey, Quota, Tenant
from lorafleet.adapters.registry import RedisRegistry
from lorafleet.serving.api.errors import AuthenticationFailed, ServiceUnavailable
from lorafleet.serving.api.quotas import Admit
from lorafleet.serving.api.quotas_redis import RedisQuotaBook, RedisQuotaSettings
from lorafleet.serving.api.tenancy import Tenancy, TenancySettings

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

BASE = "base-model"
DEADLINE_S = 0.5  # the registry and quota book deadlines (production: 1 s)
RETRY_AFTER_S = 1.0  # the breakers' pause (production: 2 s)
FAST_S = 0.15  # "answered at once", with room for a loaded 2-core machine
QUOTA = Quota(max_concurrent=8, requests_per_minute=100_000, tokens_per_minute=10_000_000)


@dataclass
class Ingress:
    tenancy: Tenancy
    quotas: RedisQuotaBook
    proxy: BlackholeProxy
    direct: RedisRegistry  # the same Redis, not through the proxy: the "other process"
    alice: str

    async def request(self, authorization: str, model: str = "pirate") -> None:
        """The pre-engine path of one request."""
        tenant = await self.tenancy.authenticate(authorization)
        await self.tenancy.resolve(tenant, model)
        decision = await self.quotas.admit(tenant.name, QUOTA, 10, time.monotonic())
        assert isinstance(decision, Admit), decision
        self.quotas.release(tenant.name, QUOTA, 0)


async def new_key(registry: RedisRegistry, tenant: str) -> str:
    key, key_id = generate_key()
    await registry.add_key(ApiKey(key_id, tenant, hash_key(key), 0.0))
    return f"Bearer {key}"


@pytest.fixture
async def ingress(tmp_path: Path) -> AsyncIterator[Ingress]:
    redis = Redis(tmp_path).start()
    direct = RedisRegistry(redis.url)
    proxy = await BlackholeProxy.start("127.0.0.1", redis.port)
    # The registry's own socket timeout is longer than the tenancy deadline on purpose: the
    # deadline and the breaker must bound a request, not the client library's timeouts.
    through = RedisRegistry(proxy.url, connect_timeout_s=5.0, timeout_s=5.0)
    quotas = RedisQuotaBook(proxy.url, settings=RedisQuotaSettings(
        timeout_s=DEADLINE_S, retry_after_s=RETRY_AFTER_S))
    tenancy = Tenancy(through, BASE, settings=TenancySettings(
        lookup_timeout_s=DEADLINE_S, retry_after_s=RETRY_AFTER_S))
    try:
        await direct.put_tenant(Tenant("alice", "Alice"))
        await direct.put_adapter(AdapterRecord(
            tenant="alice", name="pirate", source="/x", base_model=BASE, digest="d" * 64,
            rank=4, alpha=8.0, target_modules=("q_proj",), size_bytes=1))
        yield Ingress(tenancy, quotas, proxy, direct, await new_key(direct, "alice"))
    finally:
        proxy.heal()
        await quotas.close()
        await proxy.close()
        for registry in (through, direct):
            await registry.close()
        redis.stop()


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await call()
    except (ServiceUnavailable, AuthenticationFailed) as e:
        return time.monotonic() - started, e
    return time.monotonic() - started, None


def unknown_key(i: int) -> str:
    return f"Bearer lf_{i:08x}_{'U' * 32}"


async def test_known_tenants_keep_their_latency_and_unknown_keys_fail_fast(
        ingress: Ingress) -> None:
    normal = [(await timed(lambda: ingress.request(ingress.alice)))[0] for _ in range(20)]
    assert max(normal) < FAST_S, normal

    ingress.proxy.blackhole()
    known: list[float] = []
    unknown: list[tuple[float, BaseException | None]] = []
    window = 4.0
    ends = time.monotonic() + window
    i = 0
    while time.monotonic() < ends:
        took, error = await timed(lambda: ingress.request(ingress.alice))
        assert error is None, error  # a known tenant is served throughout
        known.append(took)
        unknown.append(await timed(lambda n=i: ingress.tenancy.authenticate(unknown_key(n))))
        i += 1
        await asyncio.sleep(0.05)

    assert all(isinstance(e, ServiceUnavailable) for _, e in unknown), unknown
    # Nothing waits past the deadline (plus scheduling slack), and only the breakers' probes
    # wait at all: at most one per pause, per breaker (tenancy and quota book).
    waited = [t for t in known + [t for t, _ in unknown] if t >= FAST_S]
    assert max(known + [t for t, _ in unknown]) < DEADLINE_S * 2 + FAST_S
    probes = 2 * (int(window / RETRY_AFTER_S) + 1)
    assert len(waited) <= probes, (len(waited), sorted(waited))
    assert statistics.median(known) < FAST_S / 3, statistics.median(known)
    assert statistics.median(t for t, _ in unknown) < FAST_S / 3
    print(f"\n[blackhole] normal p50 {statistics.median(normal) * 1000:.1f} ms; during: known "
          f"p50 {statistics.median(known) * 1000:.1f} ms max {max(known) * 1000:.0f} ms "
          f"({len(known)} requests), unknown key 503 p50 "
          f"{statistics.median(t for t, _ in unknown) * 1000:.1f} ms, "
          f"{len(waited)} waited a deadline")


async def test_the_breaker_probes_one_at_a_time(ingress: Ingress) -> None:
    await ingress.request(ingress.alice)
    ingress.proxy.blackhole()
    # The first call to find the black hole waits the deadline and opens the breaker.
    took, error = await timed(lambda: ingress.tenancy.authenticate(unknown_key(0)))
    assert isinstance(error, ServiceUnavailable) and took >= DEADLINE_S * 0.9
    await asyncio.sleep(RETRY_AFTER_S + 0.1)  # the pause is over: the next call probes
    burst = await asyncio.gather(*(timed(lambda n=n: ingress.tenancy.authenticate(
        unknown_key(n))) for n in range(1, 21)))
    assert all(isinstance(e, ServiceUnavailable) for _, e in burst)
    slow = [t for t, _ in burst if t >= FAST_S]
    assert len(slow) == 1, sorted(t for t, _ in burst)  # the probe; 19 answered at once


async def test_service_recovers_when_forwarding_resumes(ingress: Ingress) -> None:
    await ingress.request(ingress.alice)
    ingress.proxy.blackhole()
    _, error = await timed(lambda: ingress.tenancy.authenticate(unknown_key(0)))
    assert isinstance(error, ServiceUnavailable)
    fresh = await new_key(ingress.direct, "alice")  # created while this ingress is cut off
    _, error = await timed(lambda: ingress.request(fresh))
    assert isinstance(error, ServiceUnavailable)

    ingress.proxy.heal()
    healed = time.monotonic()
    while True:
        _, error = await timed(lambda: ingress.request(fresh))
        if error is None:
            break
        assert time.monotonic() - healed < RETRY_AFTER_S + 2 * DEADLINE_S + 1, error
        await asyncio.sleep(0.05)
    recovered = time.monotonic() - healed
    _, error = await timed(lambda: ingress.tenancy.authenticate(unknown_key(1)))
    assert isinstance(error, AuthenticationFailed)  # a 401 again, not a 503
    took, error = await timed(lambda: ingress.request(ingress.alice))
    assert error is None and took < FAST_S
    assert not ingress.quotas.degraded or await _quota_book_recovers(ingress)
    print(f"\n[blackhole] recovered {recovered:.2f} s after forwarding resumed")


@pytest.mark.vllm
async def test_over_http_known_tenants_keep_their_latency_and_unknown_keys_get_503(
        engine: Any, engine_config: Any, tmp_path: Path) -> None:
    """The same black hole under the whole app: a real (tiny) vLLM engine, the ingress built
    by ``make_services`` on the Redis registry (so the Redis quota book too), over HTTP."""
    import httpx

    from lorafleet.serving.api.app import build_app
    from lorafleet.serving.assemble import make_services
    from lorafleet.serving.engine.client import LocalEngineClient

    redis = Redis(tmp_path).start()
    direct = RedisRegistry(redis.url)
    proxy = await BlackholeProxy.start("127.0.0.1", redis.port)
    services = make_services(
        engine_config=engine_config, engines=LocalEngineClient([engine]),
        registry_url=proxy.url, data_dir=tmp_path, admin_key="a" * 40,
        tenancy=TenancySettings(lookup_timeout_s=DEADLINE_S, retry_after_s=RETRY_AFTER_S))
    try:
        await direct.put_tenant(Tenant("alice", "Alice", QUOTA))
        alice = {"Authorization": await new_key(direct, "alice")}
        body = {"model": engine_config.served_model_name, "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(services)),
                                     base_url="http://lorafleet", timeout=60) as c:
            async def chat() -> float:
                started = time.monotonic()
                r = await c.post("/v1/chat/completions", json=body, headers=alice)
                assert r.status_code == 200, r.text
                return time.monotonic() - started

            async def unknown(i: int) -> float:
                started = time.monotonic()
                r = await c.get("/v1/models", headers={"Authorization": unknown_key(i)})
                assert r.status_code == 503, r.text
                return time.monotonic() - started

            normal = [await chat() for _ in range(8)]
            proxy.blackhole()
            during, refused = [], []
            ends = time.monotonic() + 4.0
            i = 0
            while time.monotonic() < ends:
                during.append(await chat())
                refused.append(await unknown(i))
                i += 1
            proxy.heal()
        # Only breaker probes wait a deadline: the tenancy's (0.5 s) and the quota book's
        # (its default 1 s deadline, probing every 2 s).
        assert statistics.median(during) < statistics.median(normal) * 2 + 0.05, (normal, during)
        assert len([t for t in during if t > statistics.median(normal) + 0.3]) <= 2 * 3 + 2
        assert statistics.median(refused) < FAST_S / 3, refused
        print(f"\n[blackhole http] chat p50 {statistics.median(normal) * 1000:.0f} ms before, "
              f"{statistics.median(during) * 1000:.0f} ms during (max {max(during) * 1000:.0f} ms,"
              f" {len(during)} requests); unknown-key 503 p50 "
              f"{statistics.median(refused) * 1000:.1f} ms")
    finally:
        proxy.heal()
        await services.quotas.close()
        await services.registry.close()
        await proxy.close()
        await direct.close()
        redis.stop()


async def _quota_book_recovers(ingress: Ingress) -> bool:
    ends = time.monotonic() + RETRY_AFTER_S + 2 * DEADLINE_S + 1
    while ingress.quotas.degraded and time.monotonic() < ends:
        await ingress.request(ingress.alice)
        await asyncio.sleep(0.05)
    return not ingress.quotas.degraded
