"""``bench overhead``: where a single stream's time goes, hop by hop, in each system.

Boundary: reading and reporting. Around every phase the harness takes a :class:`Probe`
snapshot of the server: its Prometheus page and the CPU seconds of each of its processes.
The difference of two snapshots gives, per hop, the mean time a request or a token spent
there (histogram ``_sum``/``_count`` deltas of the series in ``serving/metrics.py`` and
vLLM's own) and the CPU each component burned per output token. The client's own TTFT
and TPOT close the account: what the server did not see is the HTTP server's side
(Ray Serve's proxy, or vLLM's uvicorn) and the client's.

On a 2-core machine the CPU column is the one to read: every millisecond the proxy,
ingress or replica spends per token is taken from the engine's compute threads.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

COMPONENTS = (
    ("ProxyActor", "proxy"),
    ("Ingress", "ingress"),
    ("EngineReplica", "replica"),
    ("EngineCore", "engine core"),
    ("VLLM::Worker", "engine worker"),
    ("ServeController", "serve controller"),
)
"""Process command-line markers (Ray and vLLM set process titles) -> component name."""


def component_of(cmdline: str, is_root: bool, system: str) -> str:
    """Which component a process of the server's tree belongs to."""
    for marker, name in COMPONENTS:
        if marker in cmdline:
            return name
    if is_root:
        return "api server" if system == "vllm" else "serve driver"
    return "ray system" if system != "vllm" else "other"


def cpu_by_component(root_pid: int, system: str) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process under ``root_pid``, by component."""
    out: dict[str, float] = defaultdict(float)
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    for p in procs:
        try:
            t = p.cpu_times()
            cmd = " ".join(p.cmdline()) or p.name()
        except psutil.Error:
            continue
        out[component_of(cmd, p.pid == root_pid, system)] += t.user + t.system
    return dict(out)


Histos = dict[tuple[str, str], tuple[float, float]]
"""(family, label value) -> (sum, count), summed over the other labels."""

LABEL_OF = {"lorafleet_request_stage_seconds": "stage", "lorafleet_token_hop_seconds": "hop",
            "lorafleet_replica_hop_seconds": "hop"}


def histograms(text: str) -> Histos:
    """The histograms of a Prometheus page, as (sum, count) per family and hop label."""
    out: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for fam in text_string_to_metric_families(text):
        if fam.type != "histogram":
            continue
        for s in fam.samples:
            kind = s.name[len(fam.name):]
            if kind not in ("_sum", "_count"):
                continue
            key = (fam.name, s.labels.get(LABEL_OF.get(fam.name, ""), ""))
            out[key][0 if kind == "_sum" else 1] += s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


@dataclass(frozen=True)
class Snapshot:
    at: float
    histos: Histos
    cpu: dict[str, float]
    load1: float = 0.0
    """The machine's 1-minute load average (other work on the machine skews every figure)."""


@dataclass(frozen=True)
class Probe:
    """How to snapshot one running server."""

    system: str
    root_pid: int
    metrics: Callable[[], str]

    def snapshot(self) -> Snapshot:
        try:
            histos = histograms(self.metrics())
        except Exception:  # a page we cannot read leaves only the CPU figures
            histos = {}
        return Snapshot(time.monotonic(), histos, cpu_by_component(self.root_pid, self.system),
                        os.getloadavg()[0])


def mean_ms(a: Snapshot, b: Snapshot, family: str, label: str = "") -> float | None:
    """Mean of one histogram series between two snapshots, in ms (None: no observation)."""
    s0, c0 = a.histos.get((family, label), (0.0, 0.0))
    s1, c1 = b.histos.get((family, label), (0.0, 0.0))
    return None if c1 - c0 <= 0 else 1000.0 * (s1 - s0) / (c1 - c0)


def _client_means(doc: Mapping[str, Any]) -> dict[str, float | None]:
    ok = [r["metrics"] for r in doc["requests"] if r["error"] is None]

    def mean(key: str) -> float | None:
        vals = [m[key] for m in ok if m.get(key) is not None]
        return 1000.0 * sum(vals) / len(vals) if vals else None

    return {"ttft": mean("ttft_s"), "tpot": mean("tpot_s"),
            "tokens": float(sum(m.get("n_out") or 0 for m in ok))}


def _sub(*vals: float | None) -> float | None:
    """vals[0] - the rest; None if any is missing."""
    if any(v is None for v in vals):
        return None
    first, *rest = vals
    return first - sum(rest)  # type: ignore[operator,arg-type]


@dataclass
class Breakdown:
    """One system's phase: the client's figures, the path's hops, CPU per token."""

    system: str
    client: dict[str, float | None]
    ttft: list[tuple[str, float | None]] = field(default_factory=list)
    token: list[tuple[str, float | None]] = field(default_factory=list)
    cpu_ms_per_token: dict[str, float] = field(default_factory=dict)
    load1: tuple[float, float] = (0.0, 0.0)
    """The machine's load average at the phase's start and end."""

    def as_json(self) -> dict[str, Any]:
        return {"system": self.system, "client_mean_ms": self.client,
                "ttft_ms": dict(self.ttft), "token_ms": dict(self.token),
                "cpu_ms_per_token": self.cpu_ms_per_token, "load1": list(self.load1)}


def breakdown(system: str, doc: Mapping[str, Any], a: Snapshot, b: Snapshot) -> Breakdown:
    """Mean time per hop of one phase (ms) from two snapshots and the client's document."""
    client = _client_means(doc)
    out = Breakdown(system, client, load1=(a.load1, b.load1))
    tokens = client["tokens"] or 0.0
    if tokens:
        out.cpu_ms_per_token = {k: 1000.0 * (b.cpu.get(k, 0.0) - v) / tokens
                                for k, v in a.cpu.items()}
    engine_ttft = mean_ms(a, b, "vllm:time_to_first_token_seconds")
    engine_itl = mean_ms(a, b, "vllm:inter_token_latency_seconds")
    if system == "vllm":
        out.ttft = [("vLLM server (arrival -> first token)", engine_ttft),
                    ("HTTP in/out + client", _sub(client["ttft"], engine_ttft))]
        out.token = [("vLLM inter-token (server)", engine_itl), ("client TPOT", client["tpot"])]
        return out
    stage = "lorafleet_request_stage_seconds"
    hop = "lorafleet_replica_hop_seconds"
    queue = mean_ms(a, b, "lorafleet_request_queue_seconds")
    dispatched = mean_ms(a, b, stage, "dispatched")
    first_delta = mean_ms(a, b, stage, "first_delta")
    written = mean_ms(a, b, stage, "first_written")
    to_replica = mean_ms(a, b, hop, "ingress_to_replica")
    engine_first = mean_ms(a, b, hop, "engine_first_token")
    out.ttft = [
        ("proxy -> ingress (Ray route)", queue),
        ("ingress (auth, parse, render, quota)", _sub(dispatched, queue)),
        ("ingress -> replica (handle call)", to_replica),
        ("replica: engine first token", engine_first),
        ("  of which vLLM (arrival -> first token)", engine_ttft),
        ("replica -> ingress (first delta)", _sub(first_delta, dispatched, to_replica,
                                                  engine_first)),
        ("ingress write (SSE)", _sub(written, first_delta)),
        ("HTTP in/out via proxy + client", _sub(client["ttft"], written)),
    ]
    out.token = [
        ("engine output interval (replica)", mean_ms(a, b, hop, "engine_token")),
        ("  vLLM inter-token (server)", engine_itl),
        ("replica -> ingress transit", mean_ms(a, b, "lorafleet_token_hop_seconds",
                                               "replica_to_ingress")),
        ("ingress write (SSE)", mean_ms(a, b, "lorafleet_token_hop_seconds", "ingress_write")),
        ("client TPOT", client["tpot"]),
    ]
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def report(docs: Mapping[str, Mapping[str, Any]], console: Console) -> dict[str, Any]:
    """Print each phase's breakdown side by side; return it as JSON-ready data."""
    out: dict[str, Any] = {}
    first = next(iter(docs.values()))
    for phase in first["phases"]:
        rows = {s: d["phases"][phase].get("overhead") for s, d in docs.items()
                if phase in d["phases"]}
        rows = {s: r for s, r in rows.items() if r}
        if not rows:
            continue
        out[phase] = rows
        for title, key in (("TTFT", "ttft_ms"), ("per token", "token_ms")):
            table = Table(title=f"overhead {phase}: {title}, mean ms per hop")
            table.add_column("system")
            table.add_column("hop")
            table.add_column("ms", justify="right")
            for s, r in rows.items():
                for label, v in r[key].items():
                    table.add_row(s, label, _fmt(v))
                if key == "ttft_ms":
                    table.add_row(s, "client TTFT", _fmt(r["client_mean_ms"]["ttft"]))
            console.print(table)
        table = Table(title=f"overhead {phase}: CPU ms per output token, by process")
        table.add_column("system")
        table.add_column("load avg", justify="right")
        for comp in sorted({c for r in rows.values() for c in r["cpu_ms_per_token"]}):
            table.add_column(comp, justify="right")
        comps = sorted({c for r in rows.values() for c in r["cpu_ms_per_token"]})
        for s, r in rows.items():
            load = "-".join(f"{x:.1f}" for x in r.get("load1", ()))
            table.add_row(s, load, *(_fmt(r["cpu_ms_per_token"].get(c)) for c in comps))
        console.print(table)
    return out
