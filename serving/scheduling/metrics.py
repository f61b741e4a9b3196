"""Prometheus metrics of the scheduler (``lorafleet_scheduler_*``), in the engine process.

Boundary: metric objects only; the registry is injected (tests pass their own). vLLM's engine
core runs the scheduler; with ``multiprocessing`` it is a subprocess, so these series live in
that process's registry (exported by whatever serves that process's metrics), not in the
ingress's ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

_RESUME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else REGISTRY
        self.decisions = Counter(
            "lorafleet_scheduler_decisions_total",
            "Scheduling decisions that changed a request's state, by action and reason.",
            ["action", "reason"], registry=r,
        )
        self.pauses = Counter(
            "lorafleet_scheduler_pauses_total", "Running requests paused by the policy.", registry=r
        )
        self.resumes = Counter(
            "lorafleet_scheduler_resumes_total", "Paused requests handed back to vLLM.", registry=r
        )
        self.resume_latency = Histogram(
            "lorafleet_scheduler_resume_latency_seconds",
            "From the resume decision until the request's context is back (restored or "
            "recomputed) and it decodes again.",
            buckets=_RESUME_BUCKETS, registry=r,
        )
