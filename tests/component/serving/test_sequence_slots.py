"""A request holds one concurrency slot per sequence (n x prompts) in both quota books: the
in-process one and the Redis one (a real ``redis-server``), admitted and released alike,
including a lease renewal of a multi-sequence request (issue 19 item 7)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from localserve import Redis

from lorafleet.adapters.model import Quota
from lorafleet.serving.api.quotas import Admit, QuotaBook, Quotas, Refuse
from lorafleet.serving.api.quotas_redis import RedisQuotaBook


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    server = Redis(Path(tmp_path_factory.mktemp("redis"))).start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "redis"])
async def book(request: pytest.FixtureRequest) -> AsyncIterator[Quotas]:
    b: Quotas
    if request.param == "local":
        b = QuotaBook()
    else:
        server = request.getfixturevalue("redis_server")
        b = RedisQuotaBook(server.url, namespace=f"q-{uuid.uuid4().hex[:8]}", clock=lambda: 1000.0)
    yield b
    await b.close()


async def test_sequences_take_and_give_back_slots(book: Quotas) -> None:
    q = Quota(max_concurrent=4)
    assert isinstance(await book.admit("alice", q, 1, 0.0, sequences=3), Admit)
    refused = await book.admit("alice", q, 1, 0.0, sequences=2)
    assert isinstance(refused, Refuse) and refused.reason == "concurrency"
    assert isinstance(await book.admit("alice", q, 1, 0.0), Admit)  # the fourth slot
    never = await book.admit("bob", q, 1, 0.0, sequences=5)
    assert isinstance(never, Refuse) and never.reason == "sequences"
    assert "5 sequences" in never.message
    if isinstance(book, RedisQuotaBook):
        assert await book.leases("alice") == 4
        await book.renew()  # every lease member of the 3-sequence request is renewed
        assert await book.leases("alice") == 4
    book.release("alice", q, 0, sequences=3)
    await book.settled()
    assert isinstance(await book.admit("alice", q, 1, 0.0, sequences=3), Admit)
    book.release("alice", q, 0, sequences=3)
    book.release("alice", q, 0)
    await book.settled()
    if isinstance(book, RedisQuotaBook):
        assert await book.leases("alice") == 0
        assert book.held("alice") == 0
    assert isinstance(await book.admit("alice", q, 1, 0.0, sequences=4), Admit)
