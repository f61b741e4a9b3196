"""A finished request's quota slot is free before its client sees the end of the answer.

The rule (``api.generation``): the slots a request holds are released, and the release has
reached the book, before the final ``data: [DONE]`` event of a stream or the body of a
non-streamed answer is sent. A client that keeps N requests in flight under a limit of N is
then never refused, whichever ingress replica its next request reaches: with a cluster-wide
book (Redis) another replica sees only releases that have landed.

``RemoteBook`` plays the cluster-wide book as another replica sees it: releases land after a
delay (Redis's round trip on a busy machine), and ``admit`` does not wait for releases made
elsewhere. On the fake engine: seconds, no vLLM.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fakeengine import FakeEngine
from tinyengine import ADMIN

from lorafleet.adapters.model import Quota
from lorafleet.serving.api.quotas import Admit, QuotaBook, Refuse
from lorafleet.serving.api.services import ApiServices
from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME
from lorafleet.serving.engine.errors import EngineDead

pytestmark = pytest.mark.middle


class RemoteBook:
    """A shared book whose releases land ``delay_s`` after they are made."""

    def __init__(self, delay_s: float) -> None:
        self.book = QuotaBook()
        self.delay_s = delay_s
        self._pending: dict[str, set[asyncio.Task[None]]] = {}

    async def admit(self, tenant: str, quota: Quota, cost_tokens: int, now: float,
                    sequences: int = 1) -> Admit | Refuse:
        return self.book.admit_now(tenant, quota, cost_tokens, now, sequences)

    def release(self, tenant: str, quota: Quota, refund_tokens: int, sequences: int = 1) -> None:
        async def land() -> None:
            await asyncio.sleep(self.delay_s)
            self.book.release(tenant, quota, refund_tokens, sequences)

        task = asyncio.get_running_loop().create_task(land())
        self._pending.setdefault(tenant, set()).add(task)
        task.add_done_callback(self._pending[tenant].discard)

    async def settled(self, tenant: str | None = None) -> None:
        tasks = [t for name, ts in self._pending.items() if tenant in (None, name) for t in ts]
        await asyncio.gather(*tasks)

    async def close(self) -> None:
        await self.settled()


@pytest.fixture
def book(services: ApiServices) -> RemoteBook:
    services.quotas = RemoteBook(delay_s=0.2)
    return services.quotas


async def key_with_one_slot(api: httpx.AsyncClient) -> dict[str, str]:
    r = await api.post("/admin/v1/tenants", json={"name": "alice", "quota": {"max_concurrent": 1}},
                       headers=ADMIN)
    assert r.status_code == 201, r.text
    r = await api.post("/admin/v1/tenants/alice/keys", json={}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def body(stream: bool) -> dict[str, Any]:
    return {"model": TINY_MODEL_NAME, "prompt": "hello there", "max_tokens": 3, "stream": stream}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_one_request_after_another_under_a_limit_of_one_is_never_refused(
    api: httpx.AsyncClient, fake: FakeEngine, book: RemoteBook, stream: bool,
) -> None:
    key = await key_with_one_slot(api)
    for i in range(3):
        r = await api.post("/v1/completions", json=body(stream), headers=key)
        assert r.status_code == 200, (i, r.text)
        if stream:
            assert r.text.endswith("data: [DONE]\n\n")
        assert book.book.in_flight("alice") == 0  # landed before the answer ended
    assert len(fake.requests) == 3


async def test_a_refused_stream_end_also_releases_first(
    api: httpx.AsyncClient, fake: FakeEngine, book: RemoteBook,
) -> None:
    # A stream that ends in an error event (the engine failed mid-answer) frees its slot
    # before its [DONE] too.
    key = await key_with_one_slot(api)
    fake.fail_next(EngineDead("the engine fell over"))
    r = await api.post("/v1/completions", json=body(True), headers=key)
    assert r.status_code == 200 and '"error"' in r.text and r.text.endswith("data: [DONE]\n\n")
    assert book.book.in_flight("alice") == 0
    r = await api.post("/v1/completions", json=body(True), headers=key)
    assert r.status_code == 200, r.text
