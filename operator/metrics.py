"""The operator's own Prometheus metrics: LoRAAdapters by phase, for the "stuck" alerts.

Boundary: bookkeeping fed by a kopf event handler, read at scrape time by a collector; the
HTTP server is started by ``lorafleet operator run``. No state is module-level: the tracker
travels in ``Dependencies``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .decisions import Phase

__all__ = ["AdapterPhases", "serve_metrics"]


class AdapterPhases:
    """The last phase seen for every LoRAAdapter (namespace, name) this operator watches."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}

    def observe(self, namespace: str | None, name: str, phase: str | None, *, deleted: bool) -> None:
        key = (namespace or "", name)
        if deleted:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase or Phase.PENDING.value

    def counts(self) -> dict[str, int]:
        seen = Counter(self._phases.values())
        return {p.value: seen.get(p.value, 0) for p in Phase}


class _PhaseCollector(Collector):
    def __init__(self, phases: AdapterPhases) -> None:
        self.phases = phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "lorafleet_operator_adapters", "LoRAAdapter resources by status phase.", labels=["phase"]
        )
        for phase, n in self.phases.counts().items():
            g.add_metric([phase], n)
        yield g


def serve_metrics(phases: AdapterPhases, port: int, addr: str = "0.0.0.0") -> CollectorRegistry:
    """Expose ``/metrics`` on ``addr:port`` (a daemon thread); returns the registry."""
    registry = CollectorRegistry()
    registry.register(_PhaseCollector(phases))
    start_http_server(port, addr=addr, registry=registry)
    return registry
