"""Prometheus metrics of the engine-core process: the scheduler (``lorafleet_scheduler_*``)
and the KV offload connector (``lorafleet_kv_offload_*``).

Boundary: metric objects, and :func:`export_text` which writes them to a file. vLLM's engine
core runs the scheduler and the connector in a subprocess of the replica (AsyncLLM always
starts one), so these series live in that process's registry; the scheduler writes them to a
file about once a second and the replica serves that file, labelled with the replica, in the
ingress's ``/metrics`` (``serving/metrics.py``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .model import StepCost

PREFIXES = ("lorafleet_scheduler_", "lorafleet_kv_offload_")

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
        self.throughput = Gauge(
            "lorafleet_scheduler_full_batch_tokens_per_second",
            "Tokens/s a full decode batch generates, predicted by the scheduler's step-cost "
            "model; 0 until it has seen enough steps.",
            registry=r,
        )
        self.step_cost = Gauge(
            "lorafleet_scheduler_step_cost_seconds",
            "Step-cost model learned from every engine step: a step takes base + "
            "per_sequence x sequences + per_token x tokens seconds (term: base, "
            "per_sequence, per_token); 0 until learned.",
            ["term"], registry=r,
        )

    def observe_step_cost(self, cost: StepCost | None, full_batch: int) -> None:
        """Set the step-cost gauges (and the full-batch tokens/s it predicts)."""
        terms = ((cost.base_s, cost.per_sequence_s, cost.per_token_s) if cost is not None
                 else (0.0, 0.0, 0.0))
        for term, value in zip(("base", "per_sequence", "per_token"), terms, strict=True):
            self.step_cost.labels(term).set(value)
        self.throughput.set(cost.decode_tokens_per_s(full_batch) if cost is not None else 0.0)


class OffloadMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else REGISTRY
        self.blocks = Counter(
            "lorafleet_kv_offload_blocks_total",
            "KV blocks copied out of vLLM's cache (out) and back into it (in).",
            ["direction"], registry=r,
        )
        self.bytes = Counter(
            "lorafleet_kv_offload_bytes_total", "Bytes of KV moved, by direction.",
            ["direction"], registry=r,
        )
        self.resumes = Counter(
            "lorafleet_kv_offload_resumes_total",
            "Resumes of offloaded requests: restored from the tiers, or recomputed (evicted).",
            ["result"], registry=r,
        )


@functools.cache
def scheduler_metrics() -> SchedulerMetrics:
    """This process's one set (a second engine in the process must not re-register them)."""
    return SchedulerMetrics()


@functools.cache
def offload_metrics() -> OffloadMetrics:
    """This process's one set of offload counters (see :func:`scheduler_metrics`)."""
    return OffloadMetrics()


def export_text(path: Path, registry: CollectorRegistry | None = None) -> None:
    """Write this process's ``lorafleet_scheduler_*``/``lorafleet_kv_offload_*`` exposition."""
    text = generate_latest(registry if registry is not None else REGISTRY).decode()
    keep = [line for line in text.splitlines()
            if line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith(PREFIXES)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(keep) + "\n")
    os.replace(tmp, path)


def read_counters(text: str) -> dict[str, float]:
    """The ``lorafleet_scheduler_*``/``lorafleet_kv_offload_*`` counters (and the step-cost
    gauges with the full-batch tokens/s they predict) of a /metrics page, summed over replicas: ``name`` or
    ``name{label=value,...}`` without ``_total`` (labels kept: direction, result, action,
    reason)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(PREFIXES) or not sample.name.endswith(
                    ("_total", "_tokens_per_second", "_step_cost_seconds")):
                continue
            labels = {k: v for k, v in sample.labels.items()
                      if k in ("direction", "result", "action", "reason", "term")}
            key = sample.name.removesuffix("_total") + (
                "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
            out[key] = out.get(key, 0.0) + sample.value
    return dict(sorted(out.items()))
