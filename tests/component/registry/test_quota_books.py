"""Quota books: one behaviour suite for the in-process book and the Redis book, then what
only the Redis book promises (one budget for several ingress processes, leases that expire,
failing open while Redis is down).

The clock is injected (``Clock``) wherever a count must be exact; the multi-process test
uses Redis's own clock, as production does.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from localserve import Redis

from lorafleet.adapters.model import Quota
from lorafleet.serving.api.quotas import Admit, QuotaBook, Quotas, Refuse
from lorafleet.serving.api.quotas_redis import RedisQuotaBook, RedisQuotaSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def namespace() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def book(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Quotas]:
    b: Quotas
    if request.param == "local":
        b = QuotaBook()
    else:
        server = request.getfixturevalue("redis_server")
        b = RedisQuotaBook(server.url, namespace=namespace(), clock=clock)
    yield b
    await b.close()


async def admit(book: Quotas, clock: Clock, quota: Quota, cost: int = 1,
                tenant: str = "alice") -> Admit | Refuse:
    return await book.admit(tenant, quota, cost, clock())


async def release(book: Quotas, quota: Quota, refund: int = 0, tenant: str = "alice") -> None:
    book.release(tenant, quota, refund)
    await book.settled()


# --- the shared semantics ---------------------------------------------------------------


async def test_concurrency_slots(book: Quotas, clock: Clock) -> None:
    q = Quota(max_concurrent=2)
    assert isinstance(await admit(book, clock, q), Admit)
    assert isinstance(await admit(book, clock, q), Admit)
    refused = await admit(book, clock, q)
    assert isinstance(refused, Refuse) and refused.reason == "concurrency"
    assert refused.retry_after == 1.0 and "limit 2" in refused.message
    assert isinstance(await admit(book, clock, q, tenant="bob"), Admit)  # per tenant
    await release(book, q)
    assert isinstance(await admit(book, clock, q), Admit)


async def test_requests_per_minute_burst_then_refill(book: Quotas, clock: Clock) -> None:
    q = Quota(requests_per_minute=60)
    for _ in range(60):
        assert isinstance(await admit(book, clock, q), Admit)
        await release(book, q)
    refused = await admit(book, clock, q)
    assert isinstance(refused, Refuse) and refused.reason == "requests_per_minute"
    assert refused.retry_after == pytest.approx(1.0)
    clock.now += 0.5
    assert isinstance(await admit(book, clock, q), Refuse)
    clock.now += 0.5
    assert isinstance(await admit(book, clock, q), Admit)


async def test_tokens_charged_then_unused_output_refunded(book: Quotas, clock: Clock) -> None:
    q = Quota(tokens_per_minute=1000)
    assert isinstance(await admit(book, clock, q, cost=800), Admit)
    refused = await admit(book, clock, q, cost=300)
    assert isinstance(refused, Refuse) and refused.reason == "tokens_per_minute"
    assert refused.retry_after == pytest.approx(100 / (1000 / 60))
    await release(book, q, refund=500)
    assert isinstance(await admit(book, clock, q, cost=300), Admit)
    too_large = await admit(book, clock, q, cost=1001)
    assert isinstance(too_large, Refuse) and too_large.reason == "too_large"
    assert too_large.retry_after == 60.0


async def test_refund_never_overfills(book: Quotas, clock: Clock) -> None:
    q = Quota(tokens_per_minute=100)
    assert isinstance(await admit(book, clock, q, cost=10), Admit)
    await release(book, q, refund=10_000)
    assert isinstance(await admit(book, clock, q, cost=100), Admit)
    assert isinstance(await admit(book, clock, q, cost=1), Refuse)


async def test_zero_and_unlimited_quotas(book: Quotas, clock: Clock) -> None:
    for _ in range(50):
        assert isinstance(await admit(book, clock, Quota()), Admit)
    refused = await admit(book, clock, Quota(requests_per_minute=0), tenant="bob")
    assert isinstance(refused, Refuse) and refused.retry_after == 60.0


@pytest.mark.redis
async def test_both_books_decide_alike_on_a_random_workload(redis_server: Any) -> None:
    """Differential: the same seeded sequence through both books gives the same decisions."""
    clock = Clock()
    local = QuotaBook()
    remote = RedisQuotaBook(redis_server.url, namespace=namespace(), clock=clock)
    rng = random.Random(18)
    q = Quota(max_concurrent=3, requests_per_minute=40, tokens_per_minute=900)
    open_requests = 0
    outcomes = []
    try:
        for _ in range(400):
            clock.now += rng.choice([0.0, 0.0, 0.05, 0.3, 1.0])
            if open_requests and rng.random() < 0.45:
                refund = rng.randint(0, 50)
                local.release("t", q, refund)
                remote.release("t", q, refund)
                await remote.settled()
                open_requests -= 1
                continue
            cost = rng.randint(1, 120)
            a = await local.admit("t", q, cost, clock())
            b = await remote.admit("t", q, cost, clock())
            assert type(a) is type(b), (a, b)
            if isinstance(a, Refuse) and isinstance(b, Refuse):
                assert (a.reason, a.message) == (b.reason, b.message)
                assert a.retry_after == pytest.approx(b.retry_after, rel=1e-9)
                outcomes.append(a.reason)
            else:
                open_requests += 1
                outcomes.append("admit")
        assert {"admit", "concurrency", "requests_per_minute", "tokens_per_minute"} <= set(outcomes)
    finally:
        await remote.close()


# --- one budget for several ingress replicas ---------------------------------------------


@pytest.mark.redis
async def test_two_books_on_one_redis_admit_exactly_one_budget(redis_server: Any) -> None:
    """Two ingress books race for one tenant's quota: the total is exactly the quota."""
    clock, ns = Clock(), namespace()
    books = [RedisQuotaBook(redis_server.url, namespace=ns, clock=clock) for _ in range(2)]
    # 100 admissions at once per book against 32 connections: most queue for a connection,
    # which must never count as Redis being down (that would admit locally, over the quota).
    try:
        cases = [
            (Quota(requests_per_minute=25), 1, "requests_per_minute"),
            (Quota(tokens_per_minute=1000), 37, "tokens_per_minute"),  # 27 fit: 999 tokens
            (Quota(max_concurrent=7), 1, "concurrency"),
        ]
        for i, (q, cost, reason) in enumerate(cases):
            tenant = f"t{i}"
            results = await asyncio.gather(*(
                books[n % 2].admit(tenant, q, cost, 0.0) for n in range(200)))
            admitted = [r for r in results if isinstance(r, Admit)]
            refused = {r.reason for r in results if isinstance(r, Refuse)}
            expected = {0: 25, 1: 27, 2: 7}[i]
            assert not any(b.degraded for b in books), "fell back to the local book"
            assert len(admitted) == expected, (q, len(admitted))
            assert refused == {reason}
            assert books[0].held(tenant) + books[1].held(tenant) == expected
            assert await books[0].leases(tenant) == expected
    finally:
        for b in books:
            await b.close()


WORKER = textwrap.dedent("""
    import asyncio, json, sys, time
    from pathlib import Path
    from lorafleet.adapters.model import Quota
    from lorafleet.serving.api.quotas import Admit
    from lorafleet.serving.api.quotas_redis import RedisQuotaBook

    async def wait_for(path):
        while not path.exists():
            await asyncio.sleep(0.01)

    async def main(url, ns, quota, name, sync):
        book = RedisQuotaBook(url, namespace=ns)  # Redis's own clock, as in production
        q = Quota(**json.loads(quota))
        await book.admit("warm", Quota(), 0, 0.0)  # connected before the start line
        (sync / f"ready-{name}").touch()
        await wait_for(sync / "go")
        t0 = time.monotonic()
        results = await asyncio.gather(*(book.admit("alice", q, 25, 0.0) for _ in range(150)))
        took = time.monotonic() - t0
        admitted = sum(isinstance(r, Admit) for r in results)
        (sync / f"admitted-{name}").touch()
        await wait_for(sync / "release")  # slots held until both processes have admitted
        for _ in range(admitted):
            book.release("alice", q, 0)
        await book.close()
        print(json.dumps({"admitted": admitted, "took": took}))

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])))
""")


def race(redis_url: str, tmp: Path, quota: Quota) -> list[dict[str, Any]]:
    """Two worker processes fire 150 admissions each at the same instant (a file barrier)
    and hold what they got until both are done; returns each one's count and burst time."""
    sync = tmp / uuid.uuid4().hex
    sync.mkdir()
    script = sync / "worker.py"
    script.write_text(WORKER)
    ns = namespace()
    q = json.dumps({"max_concurrent": quota.max_concurrent,
                    "requests_per_minute": quota.requests_per_minute,
                    "tokens_per_minute": quota.tokens_per_minute})
    procs = [subprocess.Popen([sys.executable, str(script), redis_url, ns, q, str(n), str(sync)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]

    def wait_files(prefix: str) -> None:
        deadline = time.monotonic() + 120
        while not all((sync / f"{prefix}-{n}").exists() for n in range(2)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline
            time.sleep(0.02)

    wait_files("ready")
    (sync / "go").touch()
    wait_files("admitted")
    (sync / "release").touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.mark.redis
def test_two_ingress_processes_share_one_budget(redis_server: Any, tmp_path: Path) -> None:
    """Two processes (each its own connection pool and event loop, Redis's clock, as two
    ingress pods) admit at the same moment and hold what they got: combined admissions equal
    the tightest limit exactly, for each of concurrency, RPM and TPM."""
    cases = [  # (quota, expected total): 25 tokens a request
        (Quota(max_concurrent=9, requests_per_minute=20, tokens_per_minute=600), 9),
        (Quota(requests_per_minute=20, tokens_per_minute=600), 20),
        (Quota(tokens_per_minute=600), 24),
    ]
    for quota, expected in cases:
        outs = race(redis_server.url, tmp_path, quota)
        # Exact only while the burst is shorter than one refill (RPM 20: 3 s per request).
        assert max(o["took"] for o in outs) < 2.5, outs
        print(f"\n{quota}: admitted {[o['admitted'] for o in outs]} of 2 x 150, "
              f"bursts took {[round(o['took'], 3) for o in outs]} s")
        assert sum(o["admitted"] for o in outs) == expected, (quota, outs)


# --- leases: a dead ingress does not keep its slots ---------------------------------------


@pytest.mark.redis
async def test_slots_of_a_dead_ingress_expire_and_live_ones_are_renewed(redis_server: Any) -> None:
    clock, ns = Clock(), namespace()
    settings = RedisQuotaSettings(lease_ttl_s=30, renew_every_s=3600)  # renew by hand here
    dead = RedisQuotaBook(redis_server.url, namespace=ns, clock=clock, settings=settings)
    live = RedisQuotaBook(redis_server.url, namespace=ns, clock=clock, settings=settings)
    other = RedisQuotaBook(redis_server.url, namespace=ns, clock=clock, settings=settings)
    q = Quota(max_concurrent=2)
    try:
        assert isinstance(await dead.admit("alice", q, 1, 0.0), Admit)
        assert isinstance(await live.admit("alice", q, 1, 0.0), Admit)
        await dead.close()  # the process is gone: no release, no renewal
        assert isinstance(await other.admit("alice", q, 1, 0.0), Refuse)
        clock.now += 20
        await live.renew()  # a streaming request keeps its slot
        clock.now += 10.5  # the dead ingress's lease is now 30.5 s old
        assert isinstance(await other.admit("alice", q, 1, 0.0), Admit)
        assert isinstance(await other.admit("alice", q, 1, 0.0), Refuse)  # live still holds one
        clock.now += 25
        await live.renew()
        assert await other.leases("alice") == 2
    finally:
        await live.close()
        await other.close()


@pytest.mark.redis
async def test_an_admission_whose_answer_was_lost_does_not_hold_its_slot(redis_server: Any) -> None:
    """The admit script ran but its answer timed out: the lease it took is released once
    Redis answers again, not left to hold a slot for lease_ttl_s."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    clock = Clock()
    book = RedisQuotaBook(redis_server.url, namespace=namespace(), clock=clock,
                          settings=RedisQuotaSettings(retry_after_s=0.0))
    q = Quota(max_concurrent=2)
    admit_script = book._admit

    async def answer_lost(**kwargs: Any) -> Any:
        await admit_script(**kwargs)
        raise RedisTimeoutError("Timeout reading from socket")

    try:
        book._admit = answer_lost  # type: ignore[method-assign]
        assert isinstance(await book.admit("alice", q, 1, 0.0), Admit)  # decided locally
        book.release("alice", q, 0)  # that request ends
        assert await book.leases("alice") == 1  # the lost lease, still in Redis
        book._admit = admit_script  # type: ignore[method-assign]
        assert isinstance(await book.admit("alice", q, 1, 0.0), Admit)
        await book.settled()
        assert await book.leases("alice") == 1  # only the running request's
        assert isinstance(await book.admit("alice", q, 1, 0.0), Admit)  # two slots, two requests
    finally:
        await book.close()


# --- Redis down: fail open, per process, counted ------------------------------------------


@pytest.mark.redis
async def test_redis_down_fails_open_per_process_and_recovers(tmp_path: Path) -> None:
    server = Redis(tmp_path, persist=True).start()  # comes back with its data (AOF)
    clock, fail_open = Clock(), []
    book = RedisQuotaBook(server.url, namespace=namespace(), clock=clock,
                          settings=RedisQuotaSettings(retry_after_s=0.0, timeout_s=0.5),
                          on_fail_open=lambda: fail_open.append(1))
    q = Quota(max_concurrent=2)
    try:
        assert isinstance(await book.admit("alice", q, 1, clock()), Admit)  # in Redis
        server.stop()
        started = time.monotonic()
        # The local book decides: one more slot from Redis's view is unknown, the local one
        # starts empty, so this process alone enforces the full quota of 2.
        assert isinstance(await book.admit("alice", q, 1, clock()), Admit)
        assert isinstance(await book.admit("alice", q, 1, clock()), Admit)
        assert isinstance(await book.admit("alice", q, 1, clock()), Refuse)
        assert time.monotonic() - started < 5
        assert len(fail_open) == 3
        book.release("alice", q, 0)  # a local slot goes back to the local book
        await book.settled()
        assert book.local.in_flight("alice") == 1
        server.start()
        # Back on Redis: its state still holds the one lease admitted before the outage.
        assert isinstance(await book.admit("alice", q, 1, clock()), Admit)
        assert isinstance(await book.admit("alice", q, 1, clock()), Refuse)
        assert len(fail_open) == 3
    finally:
        server.stop()
        await book.close()
