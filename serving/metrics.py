"""Prometheus metrics of the serving tier, per tenant and per adapter, with bounded labels.

Boundary: metric objects and the label policy. Names and labels are the contract in
``docs/contracts.md``. Each ``ServingMetrics`` owns its own ``CollectorRegistry`` so tests
(and several apps in one process) never collide.

Cardinality: ``adapter`` is ``base`` for the base model; an adapter gets its own label
value (``tenant/name``) once it has served ``min_requests`` requests while fewer than
``top_k`` adapters are named; every other adapter is pooled under ``other``. The busiest
adapters reach the threshold first, and the number of series stays bounded by
``(top_k + 2) * tenants``.
"""

from __future__ import annotations

from collections import Counter as _Counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BASE_LABEL = "base"
OTHER_LABEL = "other"

# Buckets chosen for CPU and GPU alike: TTFT from 10 ms to 2 min, TPOT from 1 ms to 5 s.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One hop of one token: from 50 us (an in-process queue) to 2.5 s (a stalled Ray stream).
HOP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
               0.1, 0.25, 0.5, 1.0, 2.5)
# How late the ingress's event loop runs a timer: ~0.1 ms idle; seconds when something blocks it.
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)


class AdapterLabeler:
    """Maps an adapter to a bounded label value (see the module docstring)."""

    def __init__(self, top_k: int, min_requests: int = 3) -> None:
        self.top_k = top_k
        self.min_requests = min_requests
        self._named: set[str] = set()
        self._seen: _Counter[str] = _Counter()

    def label(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_LABEL
        if adapter in self._named:
            return adapter
        self._seen[adapter] += 1
        if len(self._named) < self.top_k and self._seen[adapter] >= self.min_requests:
            self._named.add(adapter)
            del self._seen[adapter]
            return adapter
        if len(self._seen) > 10 * max(1, self.top_k) + 1000:
            # Forget the long tail's counts; they are only candidates.
            self._seen = _Counter(dict(self._seen.most_common(10 * max(1, self.top_k))))
        return OTHER_LABEL


class ServingMetrics:
    def __init__(self, top_k_adapters: int = 20) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labeler = AdapterLabeler(top_k_adapters)
        r = self.registry
        ta = ["tenant", "adapter"]
        self.ttft = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "Time from the request reaching the HTTP server to its first output token "
            "written to the client.",
            ta, buckets=TTFT_BUCKETS, registry=r,
        )
        self.queue = Histogram(
            "lorafleet_request_queue_seconds",
            "Time from the request reaching the HTTP server to the ingress handling it "
            "(Ray Serve proxy and router queues).",
            ["tenant"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "lorafleet_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            ta, buckets=TPOT_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "lorafleet_e2e_request_latency_seconds",
            "Time from the request reaching the HTTP server to its last token.",
            ta, buckets=E2E_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "lorafleet_requests", "Requests answered, by HTTP status.",
            [*ta, "status"], registry=r,
        )
        self.prompt_tokens = Counter(
            "lorafleet_prompt_tokens", "Prompt tokens processed.", ta, registry=r
        )
        self.generation_tokens = Counter(
            "lorafleet_generation_tokens", "Output tokens generated.", ta, registry=r
        )
        self.in_flight = Gauge(
            "lorafleet_requests_in_flight", "Requests being served now.", ["tenant"], registry=r
        )
        self.rate_limited = Counter(
            "lorafleet_rate_limited", "Requests refused by a tenant quota.",
            ["tenant", "reason"], registry=r,
        )
        self.quota_fail_open = Counter(
            "lorafleet_quota_fail_open", "Admissions decided by this ingress alone because the "
            "Redis quota store was unreachable (cluster-wide quotas suspended).", registry=r,
        )
        self.registry_refused = Gauge(
            "lorafleet_registry_refused", "1 while this ingress refuses the registry as reset or "
            "rolled back (it serves what it knew until a restore is accepted).", registry=r,
        )
        self.adapter_load = Histogram(
            "lorafleet_adapter_load_seconds", "Time to make an adapter resident on a replica.",
            buckets=LOAD_BUCKETS, registry=r,
        )
        self.adapters_resident = Gauge(
            "lorafleet_adapters_resident", "Adapters resident on each engine replica.",
            ["replica"], registry=r,
        )

        # The gateway's own cost, hop by hop (``lorafleet bench overhead`` reads them). No
        # tenant label: these describe the serving path, not a tenant's traffic.
        self.stage = Histogram(
            "lorafleet_request_stage_seconds",
            "Time from the request reaching the HTTP server to a stage of its path: "
            "dispatched (the ingress sends it to the engine replicas), first_delta (its first "
            "output is back at the ingress), first_written (handed to the HTTP server).",
            ["stage"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.token_hop = Histogram(
            "lorafleet_token_hop_seconds",
            "Per streamed delta, the time one hop took: replica_to_ingress (the Ray stream "
            "from the engine replica), ingress_write (SSE formatting and the write).",
            ["hop"], buckets=HOP_BUCKETS, registry=r,
        )
        # Every tenant's requests share the ingress's event loop: anything that blocks it
        # (tokenizing, a regex, a big JSON body) delays all of them. Sampled by
        # ``api.app.sample_loop_lag`` on that loop.
        self.loop_lag = Histogram(
            "lorafleet_ingress_event_loop_lag_seconds",
            "How much later than asked the ingress's event loop woke a periodic timer: the time "
            "every request on this ingress waited for the loop at that moment.",
            buckets=LOOP_LAG_BUCKETS, registry=r,
        )

    def adapter_label(self, adapter: str | None) -> str:
        return self.labeler.label(adapter)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ReplicaHopMetrics:
    """The engine replica's share of the path, in a registry of its own (exported with the
    replica's metrics): ingress_to_replica (the handle call's routing and transit),
    engine_first_token (from the replica's call to the engine's first output: adapter,
    queue and prefill), engine_token (between two outputs of the engine)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.hop = Histogram(
            "lorafleet_replica_hop_seconds",
            "Time one hop inside the engine replica took (see ReplicaHopMetrics).",
            ["hop"], buckets=HOP_BUCKETS + (5.0, 10.0, 30.0), registry=self.registry,
        )

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


def engine_metrics_text(replica_id: str, core_text: str = "") -> str:
    """vLLM's own metrics in this process, plus ``core_text`` (the engine-core process's
    ``lorafleet_*`` exposition, see ``scheduling/metrics.py``), each sample labelled with
    ``replica``."""
    from prometheus_client import REGISTRY

    text = generate_latest(REGISTRY).decode()
    return (label_samples(text, ("vllm:",), replica_id)
            + label_samples(core_text, ("lorafleet_",), replica_id))


def label_samples(text: str, prefixes: tuple[str, ...], replica_id: str) -> str:
    """The families of ``text`` whose names start with ``prefixes``, every sample with a
    ``replica`` label added."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            if line.removeprefix("# HELP ").removeprefix("# TYPE ").startswith(prefixes):
                out.append(line)
            continue
        if not line.startswith(prefixes):
            continue
        name, _, rest = line.rpartition(" ")
        label = f'replica="{replica_id}"'
        if name.endswith("}"):
            name = name[:-1] + ("," if not name.endswith("{}") else "") + label + "}"
            name = name.replace("{}", "{")  # defensive: empty label sets
        else:
            name = name + "{" + label + "}"
        out.append(f"{name} {rest}")
    return "\n".join(out) + ("\n" if out else "")


def merge_expositions(parts: list[str]) -> str:
    """Merge expositions so each family's header appears once and its samples stay together
    (the text format requires a family's samples to be contiguous)."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for part in parts:
        current = ""
        for line in part.splitlines():
            if not line.strip():
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                current = line.split(" ", 3)[2]
                hs = headers.setdefault(current, [])
                if not any(h.split(" ", 2)[1] == line.split(" ", 2)[1] for h in hs):
                    hs.append(line)
                families.setdefault(current, [])
            elif line.startswith("#"):
                continue
            else:
                families.setdefault(current, []).append(line)
    out: list[str] = []
    for name, samples in families.items():
        out.extend(headers.get(name, []))
        out.extend(samples)
    return "\n".join(out) + "\n"
