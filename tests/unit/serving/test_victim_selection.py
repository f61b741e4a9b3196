"""Which adapter a replica drops for a newcomer, and which replica a request goes to.

The rule (``engine.residency``): a replica holds at most ``max_cpu_loras`` adapters; a newcomer
evicts the least recently used one that no running request uses; a replica whose adapters are
all in use refuses (``AdapterBusy``) rather than unload under a request. Routing
(``engine.client.select_replica``): a replica that holds the adapter first, else the least
loaded. Run on ``FakeEngine``, whose residency is the product's own.
"""

from __future__ import annotations

import asyncio

import pytest
from fakeengine import FakeEngine, fake_token
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.adapters.model import AdapterContent
from lorafleet.serving.engine.client import LocalEngineClient, select_replica
from lorafleet.serving.engine.errors import AdapterBusy
from lorafleet.serving.engine.protocol import (
    AdapterRef,
    Engine,
    EngineStats,
    GenerateRequest,
    SamplingOptions,
)
from lorafleet.serving.engine.residency import select_victim

pytestmark = pytest.mark.middle


def ref(name: str) -> AdapterRef:
    return AdapterRef(f"t/{name}@{name}", AdapterContent(digest=name * 4, source=f"file:///{name}"))


def request(rid: str, adapter: str | None = None, max_tokens: int = 3) -> GenerateRequest:
    return GenerateRequest(rid, (1, 2, 3), SamplingOptions(max_tokens=max_tokens),
                           adapter=ref(adapter) if adapter else None)


async def drain(engine: FakeEngine | LocalEngineClient, req: GenerateRequest) -> list[int]:
    return [t for d in [d async for d in engine.generate(req)] for t in d.token_ids]


# -- the pure rule -------------------------------------------------------------------------

def test_room_left_or_already_resident_evicts_nothing() -> None:
    assert select_victim(["a", "b"], {}, capacity=3, incoming="c") is None
    assert select_victim(["a", "b", "c"], {}, capacity=3, incoming="b") is None


def test_the_least_recently_used_idle_adapter_goes() -> None:
    assert select_victim(["a", "b", "c"], {}, capacity=3, incoming="d") == "a"
    assert select_victim(["a", "b", "c"], {"a": 2}, capacity=3, incoming="d") == "b"


def test_a_replica_full_of_busy_adapters_refuses() -> None:
    with pytest.raises(LookupError):
        select_victim(["a", "b"], {"a": 1, "b": 1}, capacity=2, incoming="c")


# -- on an engine -----------------------------------------------------------------------------

def test_the_fake_is_an_engine() -> None:
    assert isinstance(FakeEngine(), Engine)


async def test_use_refreshes_recency_so_the_other_adapter_is_evicted() -> None:
    e = FakeEngine(max_cpu_loras=2)
    await e.start()
    await drain(e, request("1", "a"))
    await drain(e, request("2", "b"))
    await drain(e, request("3", "a"))  # a is now the most recently used
    await drain(e, request("4", "c"))
    assert (await e.stats()).resident_adapters == (ref("a").adapter_id, ref("c").adapter_id)
    assert e.unloads == [ref("b").adapter_id]


async def test_an_adapter_under_a_running_request_is_never_evicted_nor_unloaded() -> None:
    e = FakeEngine(max_cpu_loras=1)
    await e.start()
    e.hold()
    stream = e.generate(request("long", "a", max_tokens=5))
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)  # the request has taken its adapter and waits for its first token
    with pytest.raises(AdapterBusy):
        await e.load_adapter(ref("b"))
    with pytest.raises(AdapterBusy):
        await e.unload_adapter(ref("a").adapter_id)
    e.release()
    await first
    await stream.aclose()  # the client went away: the pin goes with it
    assert e.aborted == ["long"] and e.in_flight == 0
    await e.load_adapter(ref("b"))
    assert (await e.stats()).resident_adapters == (ref("b").adapter_id,)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.booleans()), max_size=30),
       st.integers(1, 4))
def test_residency_never_exceeds_capacity_and_never_drops_a_busy_adapter(
    steps: list[tuple[str, bool]], capacity: int
) -> None:
    """Random loads, some of them held by a running request: the replica never holds more
    than its capacity, and an adapter in use is still resident when its request ends."""

    async def run() -> None:
        e = FakeEngine(max_cpu_loras=capacity)
        await e.start()
        busy: dict[str, int] = {}
        for name, keep in steps:
            adapter_id = ref(name).adapter_id
            try:
                await e.load_adapter(ref(name))
            except AdapterBusy:
                assert sum(1 for n in busy.values() if n) >= capacity
                continue
            if keep:
                e.residency.acquire(adapter_id)
                busy[adapter_id] = busy.get(adapter_id, 0) + 1
            resident = e.residency.ids()
            assert len(resident) <= capacity
            assert all(a in resident for a, n in busy.items() if n)

    asyncio.run(run())


async def test_tokens_are_deterministic_and_the_last_one_finishes() -> None:
    e = FakeEngine()
    await e.start()
    deltas = [d async for d in e.generate(request("r", max_tokens=3))]
    assert [d.token_ids[0] for d in deltas] == [fake_token((1, 2, 3), i) for i in range(3)]
    assert [d.finish_reason for d in deltas] == [None, None, "length"]


# -- routing between replicas -----------------------------------------------------------------

def _stats(rid: str, resident: tuple[str, ...], in_flight: int) -> EngineStats:
    return EngineStats(rid, resident, in_flight, max_loras=4, max_cpu_loras=8)


def test_a_holder_wins_over_a_less_loaded_replica() -> None:
    stats = [_stats("r0", (), 0), _stats("r1", ("x",), 5)]
    assert select_replica(stats, "x") == 1
    assert select_replica(stats, "y") == 0  # nobody holds it: the least loaded
    assert select_replica(stats, None) == 0


async def test_requests_for_an_adapter_stick_to_the_replica_that_loaded_it() -> None:
    engines = [FakeEngine("r0"), FakeEngine("r1")]
    for e in engines:
        await e.start()
    client = LocalEngineClient(engines)
    await engines[1].load_adapter(ref("a"))
    for i in range(3):
        await drain(client, request(f"a{i}", "a"))
    assert [len(e.requests) for e in engines] == [0, 3]
    assert engines[0].loads == []  # never loaded twice
