"""How the API reaches engine replicas: the ``EngineClient`` protocol and its local form.

Boundary: routing between replicas. ``LocalEngineClient`` holds engines in this process
(tests, single-process dev). The Ray Serve form lives in ``lorafleet.serving.deploy`` and
routes with Ray Serve model multiplexing. Both prefer a replica that already holds the
request's adapter (adapter affinity), then the least loaded one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from .protocol import AdapterRef, Engine, EngineStats, GenerateRequest, TokenDelta


class EngineClient(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]: ...

    async def load_adapter(self, adapter: AdapterRef, replicas: int | None = None) -> list[str]:
        """Make the adapter resident on ``replicas`` replicas (all when None); return holders."""
        ...

    async def unload_adapter(self, adapter_id: str) -> None: ...

    async def replica_stats(self) -> list[EngineStats]: ...

    async def metrics_text(self) -> str: ...


def select_replica(stats: Sequence[EngineStats], adapter_id: str | None) -> int:
    """Index of the replica to use: holders of the adapter first, then the least loaded."""
    def key(i: int) -> tuple[int, int]:
        s = stats[i]
        holds = adapter_id is not None and adapter_id in s.resident_adapters
        return (0 if holds or adapter_id is None else 1, s.in_flight)

    return min(range(len(stats)), key=key)


class LocalEngineClient:
    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("at least one engine")
        self.engines = list(engines)

    async def _pick(self, adapter_id: str | None) -> Engine:
        if len(self.engines) == 1:
            return self.engines[0]
        stats = [await e.stats() for e in self.engines]
        return self.engines[select_replica(stats, adapter_id)]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        engine = await self._pick(request.adapter.adapter_id if request.adapter else None)
        async for delta in engine.generate(request):
            yield delta

    async def load_adapter(self, adapter: AdapterRef, replicas: int | None = None) -> list[str]:
        targets = self.engines if replicas is None else self.engines[: max(1, replicas)]
        holders = []
        for engine in targets:
            await engine.load_adapter(adapter)
            holders.append((await engine.stats()).replica_id)
        return holders

    async def unload_adapter(self, adapter_id: str) -> None:
        for engine in self.engines:
            await engine.unload_adapter(adapter_id)

    async def replica_stats(self) -> list[EngineStats]:
        return [await e.stats() for e in self.engines]

    async def metrics_text(self) -> str:
        from ..metrics import engine_metrics_text

        # In one process all engines share one prometheus registry.
        core = [e.core_metrics_text() for e in self.engines]
        return engine_metrics_text("local", "".join(core))
