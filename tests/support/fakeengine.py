"""A deterministic engine with no model, implementing the real ``Engine`` protocol.

For unit tests only (the e2e and component suites keep real vLLM; ``tests/unit/serving/
test_fake_engine.py`` fails if a test outside ``tests/unit`` imports this). The model is Ray
Serve LLM's ``tests/serve/mocks/mock_vllm_engine.py``: same protocol as the product's engine,
so the API, the engine client and the quota path run in milliseconds.

What it keeps real: adapter residency is ``engine.residency.AdapterResidency`` (the LRU and
``select_victim`` that ``VLLMEngine`` uses), with the same in-flight pins, so a test of
eviction here tests the product's rule. What it fakes: the tokens. Request ``r`` with prompt
``p`` yields ``max_tokens`` tokens, token ``i`` being ``(sum(p) + i) % VOCAB`` with text
``" t<id>"``; the last one carries ``finish_reason="length"``.

Control: ``hold()`` makes every stream wait before each token until ``release()``, so a test
can keep requests in flight; ``requests``, ``aborted``, ``loads`` and ``unloads`` record what
the engine was asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from lorafleet.serving.engine.errors import AdapterBusy, EngineDead
from lorafleet.serving.engine.protocol import (
    AdapterRef,
    EngineStats,
    GenerateRequest,
    TokenDelta,
)
from lorafleet.serving.engine.residency import AdapterResidency

VOCAB = 1000


def fake_token(prompt: tuple[int, ...], i: int) -> int:
    """The ``i``-th output token of a prompt (what a test can predict)."""
    return (sum(prompt) + i) % VOCAB


class FakeEngine:
    """An ``Engine`` (``serving.engine.protocol``) with no model; see the module doc."""

    def __init__(self, replica_id: str = "fake-0", *, max_loras: int = 4,
                 max_cpu_loras: int = 8) -> None:
        self.replica_id = replica_id
        self.max_loras = max_loras
        self.residency = AdapterResidency(max_cpu_loras)
        self.started = False
        self.in_flight = 0
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self._go = asyncio.Event()
        self._go.set()
        self._fail_next: BaseException | None = None

    # -- test controls ----------------------------------------------------------------

    def hold(self) -> None:
        """Streams stop before their next token until ``release``."""
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def fail_next(self, error: BaseException) -> None:
        """The next request's stream raises ``error`` before its first token."""
        self._fail_next = error

    # -- Engine -----------------------------------------------------------------------

    async def start(self) -> None:
        self.started = True

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        if not self.started:
            raise EngineDead(f"engine {self.replica_id} not started")
        self.requests.append(request)
        if self._fail_next is not None:
            error, self._fail_next = self._fail_next, None
            raise error
        adapter_id = request.adapter.adapter_id if request.adapter else None
        if request.adapter is not None:
            await self.load_adapter(request.adapter)
            self.residency.acquire(request.adapter.adapter_id)
        self.in_flight += 1
        n = request.sampling.max_tokens
        done = False
        try:
            for i in range(n):
                await self._go.wait()
                token = fake_token(request.prompt_token_ids, i)
                yield TokenDelta(text=f" t{token}", token_ids=(token,),
                                 finish_reason="length" if i == n - 1 else None)
            done = True
        finally:
            if not done:
                self.aborted.append(request.request_id)
            self.in_flight -= 1
            if adapter_id is not None:
                self.residency.release(adapter_id)

    async def load_adapter(self, adapter: AdapterRef) -> float:
        """As ``VLLMEngine.load_adapter``: resident already is free; a full replica drops its
        least recently used idle adapter; a replica full of busy adapters refuses."""
        if adapter.adapter_id in self.residency:
            return 0.0
        try:
            victim = self.residency.victim_for(adapter.adapter_id)
        except LookupError as e:
            raise AdapterBusy(f"replica {self.replica_id}: {e}") from e
        if victim is not None:
            self.residency.remove(victim)
            self.unloads.append(victim)
        self.residency.add(adapter.adapter_id, f"/fake/{adapter.content.digest}",
                           adapter.content.digest)
        self.loads.append(adapter.adapter_id)
        return 0.0

    async def unload_adapter(self, adapter_id: str) -> bool:
        resident = self.residency.get(adapter_id)
        if resident is None:
            return False
        if resident.in_flight:
            raise AdapterBusy(f"adapter {adapter_id} has {resident.in_flight} running requests")
        self.residency.remove(adapter_id)
        self.unloads.append(adapter_id)
        return True

    async def stats(self) -> EngineStats:
        return EngineStats(
            replica_id=self.replica_id, resident_adapters=self.residency.ids(),
            in_flight=self.in_flight, max_loras=self.max_loras,
            max_cpu_loras=self.residency.capacity, healthy=self.started)

    def core_metrics_text(self) -> str:
        return ""

    async def shutdown(self) -> None:
        self.started = False
