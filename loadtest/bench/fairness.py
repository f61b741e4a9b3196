"""``bench fairness``: one tenant floods a LoRAFleet server, another streams; does it notice?

Boundary: orchestration and I/O for one LoRAFleet server (no stock vLLM: the question is
isolation between tenants of one server, not speed). Pure arithmetic (the plan, percentiles,
the loop-lag histogram's quantiles, the verdicts) in small functions; the rest starts the
server, sends requests, scrapes ``/metrics`` and writes ``<out-dir>/fairness.json``.

What runs, in order, on one server:

1. **Prefix-cache probe** (quiet server, base model, streaming, 1 output token). Per trial a
   fresh ~700-token prefix ``P``: tenant ``flood`` sends ``P``; then ``steady`` sends ``P``
   (a hit if the prefix cache were shared across tenants), a fresh prefix of the same length
   (a miss), and ``P`` again (a hit on its own prefix: shows the probe can see a hit).
   Cross-tenant TTFT must match the miss; the own hit shows what a leak would look like.
2. **steady alone**: tenant ``steady`` runs ``b_concurrency`` closed-loop streams on its own
   adapter; TTFT and TPOT per request.
3. **steady under flood**: the same streams while tenant ``flood`` sends, all at once:
   ``n=8`` requests from ``flood_workers`` senders on distinct adapters (``max_loras`` of
   them at once, cycling over ``max_loras + 2``), requests at the server's n x prompts cap
   (64 sequences), all with ``ignore_eos`` (its policy allows it) and a long output limit,
   and 1 MB prompts while its concurrency quota (half the batch) is spent. Every answer's
   status is counted (429s are the quota doing its job).

For both phases the ingress's event-loop lag (``lorafleet_ingress_event_loop_lag_seconds``)
is read from the server's ``/metrics`` before and after. The goal (issue 19): steady's TTFT
p99 and TPOT p99 under the flood within 1.5x of alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from lorafleet.loadtest.bench import servers
from lorafleet.loadtest.bench.scenarios import MODEL, Scenario, adapter_names
from lorafleet.loadtest.metrics import percentile
from lorafleet.serving.scheduling.metrics import read_counters

FLOOD, STEADY = "flood", "steady"
LAG_METRIC = "lorafleet_ingress_event_loop_lag_seconds"
GOAL = 1.5
"""steady's p99 under the flood over its p99 alone, at most (issue 19)."""
SEQUENCE_CAP = 64
"""The server's cap on n x prompts per request (``serving/api/body.py``: MAX_SEQUENCES)."""
BIG_PROMPT_BYTES = 990_000
"""A prompt just under the server's 1 MB body limit."""
WORDS = ("river", "stone", "amber", "quiet", "lantern", "meadow", "copper", "harbor", "violet",
         "thunder", "maple", "silver", "orchard", "falcon", "ember", "willow", "cobalt", "prairie")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    max_loras: int = 4
    max_num_seqs: int = 64
    flood_max_concurrent: int = 32
    """The flood tenant's quota: sequences it may run at once. Half the batch: what an
    operator gives a tenant so that the others always find room in it."""
    flood_adapters: int = 6
    """Distinct adapters the flood cycles over (at least ``max_loras``)."""
    flood_max_tokens: int = 256
    flood_workers: int = 4
    """Concurrent flood senders of n=8 requests on distinct adapters (one more sends requests
    at the n x prompts cap, one more the 1 MB prompts)."""
    b_concurrency: int = 2
    b_requests: int = 16
    b_words: int = 24
    b_max_tokens: int = 48
    probe_trials: int = 8
    probe_words: int = 500
    """Words of the probe's prefix (~1.4 tokens each with SmolLM2's tokenizer)."""
    flood_refused: bool = True
    """The flood also sends what the server refuses (requests at the n x prompts cap beyond
    its quota, 1 MB prompts). Off: only its n=8 requests, to tell what the refused
    requests' host CPU costs the others from what the engine's batch does."""


def make_plan(quick: bool) -> Plan:
    return Plan(b_requests=6, b_max_tokens=32, flood_max_tokens=128, probe_trials=4) if quick \
        else Plan()


# -- pure figures --------------------------------------------------------------------------


def histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` of one histogram's cumulative samples (bucket bounds and _count)."""
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def histogram_quantile(delta: dict[str, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (as Prometheus' histogram_quantile
    without interpolation: a bound the true value does not exceed); None without samples."""
    count = delta.get("count", 0.0)
    if count <= 0:
        return None
    bounds = sorted((float(k), v) for k, v in delta.items() if k not in ("count", "sum"))
    for bound, cumulative in bounds:
        if cumulative >= q * count:
            return bound
    return math.inf


def lag_figures(delta: dict[str, float]) -> dict[str, float | None]:
    count = delta.get("count", 0.0)
    return {"samples": count,
            "mean s": (delta.get("sum", 0.0) / count) if count > 0 else None,
            "p50 s (bucket bound)": histogram_quantile(delta, 0.50),
            "p99 s (bucket bound)": histogram_quantile(delta, 0.99),
            "max s (bucket bound)": histogram_quantile(delta, 1.0)}


def ratio_of(under: float | None, alone: float | None) -> float | None:
    return None if under is None or not alone else under / alone


def stream_figures(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """TTFT and TPOT percentiles of the answered streams among ``records``."""
    ok = [r for r in records if r["status"] == 200 and r["ttft_s"] is not None]
    ttft = [r["ttft_s"] for r in ok]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    return {"requests": len(records), "answered": len(ok),
            "TTFT p50 s": percentile(ttft, 50), "TTFT p99 s": percentile(ttft, 99),
            "TPOT p50 s": percentile(tpot, 50), "TPOT p99 s": percentile(tpot, 99)}


def probe_figures(trials: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """Median TTFT of each probe kind and the ratios that answer the question."""
    med = {k: percentile([t[k] for t in trials], 50) for k in ("cross", "miss", "own")}
    return {"cross-tenant prefix TTFT p50 s": med["cross"], "miss TTFT p50 s": med["miss"],
            "own prefix (hit) TTFT p50 s": med["own"],
            "cross / miss": ratio_of(med["cross"], med["miss"]),
            "own hit / miss": ratio_of(med["own"], med["miss"])}


# -- talking to the server -----------------------------------------------------------------


def _text(rng: secrets.SystemRandom, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def stream_once(http: httpx.AsyncClient, key: str, model: str, prompt: str | list[str],
                      max_tokens: int, tally: Counter[str] | None = None,
                      **extra: Any) -> dict[str, Any]:
    """One streamed completion: status, TTFT, TPOT (from the server's usage), seconds.
    ``tally["chunks"]`` counts the choices with text as they arrive (a flood's requests are
    cancelled before their usage comes)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return {"status": resp.status_code, "ttft_s": None, "tpot_s": None,
                        "e2e_s": time.perf_counter() - t0}
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                event = json.loads(line[5:])
                if event.get("usage"):
                    tokens = int(event["usage"].get("completion_tokens") or 0)
                texts = sum(1 for c in event.get("choices") or [] if c.get("text"))
                if tally is not None:
                    tally["chunks"] += texts
                if texts:
                    last = time.perf_counter() - t0
                    first = last if first is None else first
    except httpx.HTTPError as exc:
        return {"status": f"error {type(exc).__name__}", "ttft_s": None, "tpot_s": None,
                "e2e_s": time.perf_counter() - t0}
    tpot = (last - first) / (tokens - 1) if first is not None and last is not None \
        and tokens > 1 else None
    return {"status": 200, "ttft_s": first, "tpot_s": tpot, "e2e_s": time.perf_counter() - t0,
            "tokens": tokens}


async def steady_streams(http: httpx.AsyncClient, key: str, plan: Plan, adapter: str
                         ) -> list[dict[str, Any]]:
    """``b_requests`` streams, ``b_concurrency`` at a time (closed loop)."""
    rng = secrets.SystemRandom()
    todo = list(range(plan.b_requests))
    out: list[dict[str, Any]] = []

    async def worker() -> None:
        while todo:
            todo.pop()
            out.append(await stream_once(http, key, adapter, _text(rng, plan.b_words),
                                         plan.b_max_tokens))

    await asyncio.gather(*(worker() for _ in range(plan.b_concurrency)))
    return out


async def flood(http: httpx.AsyncClient, key: str, plan: Plan, adapters: Sequence[str],
                stop: asyncio.Event) -> Counter[str]:
    """The flood tenant's requests until ``stop``; counts answers by ``kind status``."""
    counts: Counter[str] = Counter()
    chunks: Counter[str] = Counter()
    rng = secrets.SystemRandom()
    big = "x " * (BIG_PROMPT_BYTES // 2)
    t0 = time.perf_counter()

    async def wide(i: int) -> None:
        # n=8 x 1 prompt on adapter i, i+workers, ...: together the workers keep max_loras
        # distinct adapters (all of a replica's slots) busy within the flood's quota.
        j = i
        while not stop.is_set():
            r = await stream_once(http, key, adapters[j % len(adapters)], _text(rng, 16),
                                  plan.flood_max_tokens, tally=chunks, n=8, ignore_eos=True)
            counts[f"n x prompts 8: {r['status']}"] += 1
            j += plan.flood_workers
            if r["status"] != 200:
                await asyncio.sleep(0.05)  # refused at once: don't spin the client's CPU

    async def capped() -> None:
        # Requests at the server's cap (n=8 x 8 prompts = 64 sequences).
        j = 0
        while not stop.is_set():
            r = await stream_once(http, key, adapters[j % len(adapters)],
                                  [_text(rng, 16) for _ in range(SEQUENCE_CAP // 8)],
                                  plan.flood_max_tokens, n=8, ignore_eos=True)
            counts[f"n x prompts {SEQUENCE_CAP}: {r['status']}"] += 1
            j += 1
            await asyncio.sleep(0.05)

    async def huge() -> None:
        while not stop.is_set():
            r = await stream_once(http, key, adapters[0], big, 16)
            counts[f"1 MB prompt: {r['status']}"] += 1
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(wide(i)) for i in range(plan.flood_workers)]
    if plan.flood_refused:
        tasks += [asyncio.create_task(capped()), asyncio.create_task(huge())]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    seconds = time.perf_counter() - t0
    counts["text chunks streamed (~tokens)"] = chunks["chunks"]
    counts["text chunks per 100 s"] = round(100 * chunks["chunks"] / seconds)
    return counts


async def prefix_probe(http: httpx.AsyncClient, keys: dict[str, str], plan: Plan
                       ) -> list[dict[str, float]]:
    rng = secrets.SystemRandom()
    trials = []
    for _ in range(plan.probe_trials):
        prefix, fresh = _text(rng, plan.probe_words), _text(rng, plan.probe_words)
        r = await stream_once(http, keys[FLOOD], MODEL, prefix, 1)
        if r["status"] != 200:
            raise RuntimeError(f"probe: the flood tenant's prefix answered {r['status']}")
        t: dict[str, float] = {}
        for kind, prompt in (("cross", prefix), ("miss", fresh), ("own", prefix)):
            r = await stream_once(http, keys[STEADY], MODEL, prompt, 1)
            if r["ttft_s"] is None:
                raise RuntimeError(f"probe: {kind} answered {r['status']}")
            t[kind] = r["ttft_s"]
        trials.append(t)
    return trials


def lag_histogram(metrics_text: str) -> dict[str, float]:
    """The loop-lag histogram's cumulative samples: bucket bounds, ``count``, ``sum``."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name != LAG_METRIC:
            continue
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                out[s.labels["le"]] = out.get(s.labels["le"], 0.0) + s.value
            elif s.name.endswith(("_count", "_sum")):
                k = s.name.rsplit("_", 1)[1]
                out[k] = out.get(k, 0.0) + s.value
    return {("inf" if k == "+Inf" else k): v for k, v in out.items()}


def scheduler_delta(before: str, after: str) -> dict[str, float]:
    """The scheduler's counters (decisions by action and reason, pauses, resumes) that moved
    between two /metrics pages, and its learned step cost at the end (gauges, as they are)."""
    a, b = read_counters(before), read_counters(after)
    gauge = ("step_cost", "tokens_per_second")
    return {k: v if any(g in k for g in gauge) else v - a.get(k, 0.0) for k, v in b.items()
            if k.startswith("lorafleet_scheduler_")
            and (any(g in k for g in gauge) or v != a.get(k, 0.0))}


async def _phase(base_url: str, admin_key: str, body: Any
                 ) -> tuple[Any, dict[str, float | None], dict[str, float]]:
    before = await asyncio.to_thread(servers.metrics_text, base_url, admin_key)
    result = await body
    after = await asyncio.to_thread(servers.metrics_text, base_url, admin_key)
    return (result, lag_figures(histogram_delta(lag_histogram(before), lag_histogram(after))),
            scheduler_delta(before, after))


async def run_against(base_url: str, admin_key: str, keys: dict[str, str], plan: Plan,
                      adapters: dict[str, list[str]], console: Console) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=600.0, limits=limits) as http:
        console.rule("prefix-cache probe (cross-tenant hit vs miss vs own hit)")
        trials = await prefix_probe(http, keys, plan)
        probe = probe_figures(trials)
        console.print("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in probe.items()))
        console.rule(f"{STEADY} alone")
        alone, lag_alone, _ = await _phase(base_url, admin_key, steady_streams(
            http, keys[STEADY], plan, adapters[STEADY][0]))
        console.rule(f"{STEADY} under {FLOOD}'s flood")
        stop = asyncio.Event()
        flooding = asyncio.create_task(flood(http, keys[FLOOD], plan, adapters[FLOOD], stop))
        await asyncio.sleep(3.0)  # let the flood fill the batch first

        async def steady_then_stop() -> list[dict[str, Any]]:
            try:
                return await steady_streams(http, keys[STEADY], plan, adapters[STEADY][0])
            finally:
                stop.set()

        under, lag_under, decisions = await _phase(base_url, admin_key, steady_then_stop())
        flood_counts = await flooding
    fa, fu = stream_figures(alone), stream_figures(under)
    return {
        "plan": asdict(plan),
        "probe": {"figures": probe, "trials": trials},
        "alone": {"figures": fa, "loop_lag": lag_alone, "requests": alone},
        "under_flood": {"figures": fu, "loop_lag": lag_under, "requests": under,
                        "flood_answers": dict(flood_counts), "scheduler": decisions},
        "ratios": {k: ratio_of(fu[k], fa[k]) for k in ("TTFT p99 s", "TPOT p99 s",
                                                       "TTFT p50 s", "TPOT p50 s")},
        "goal": f"steady's TTFT p99 and TPOT p99 under the flood within {GOAL}x of alone",
    }


# -- the command ---------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def print_report(doc: dict[str, Any], console: Console) -> None:
    table = Table(title=f"bench fairness: {STEADY} alone vs under {FLOOD}'s flood")
    for col in ("figure", "alone", "under flood", "under / alone"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    fa, fu = doc["alone"]["figures"], doc["under_flood"]["figures"]
    for k in ("TTFT p50 s", "TTFT p99 s", "TPOT p50 s", "TPOT p99 s", "answered"):
        r = ratio_of(fu[k], fa[k])
        goal = k in ("TTFT p99 s", "TPOT p99 s")
        mark = "" if r is None or not goal else (" ok" if r <= GOAL else f" > {GOAL}x")
        table.add_row(f"{STEADY} {k}", _fmt(fa[k]), _fmt(fu[k]),
                      "-" if r is None else f"{r:.2f}x{mark}")
    la, lu = doc["alone"]["loop_lag"], doc["under_flood"]["loop_lag"]
    for k in la:
        table.add_row(f"ingress loop lag {k}", _fmt(la[k]), _fmt(lu[k]), "")
    console.print(table)
    console.print(f"{FLOOD}'s answers during the flood: "
                  + ", ".join(f"{k} x{v}" for k, v in sorted(doc["under_flood"]["flood_answers"]
                                                             .items())))
    console.print("scheduler during the flood: " + (", ".join(
        f"{k.removeprefix('lorafleet_scheduler_')} {v:g}"
        for k, v in doc["under_flood"].get("scheduler", {}).items()) or "no decisions"))
    p = doc["probe"]["figures"]
    console.print(f"prefix-cache probe ({len(doc['probe']['trials'])} trials, TTFT p50): "
                  f"cross-tenant {_fmt(p['cross-tenant prefix TTFT p50 s'])} s, miss "
                  f"{_fmt(p['miss TTFT p50 s'])} s, own hit {_fmt(p['own prefix (hit) TTFT p50 s'])}"
                  f" s; cross/miss {_fmt(p['cross / miss'])}, own hit/miss {_fmt(p['own hit / miss'])}")
    console.print("CPU run (2 cores, fp32, SmolLM2-135M-Instruct): figures are this machine's.")


def run_fairness(out_dir: Path, *, quick: bool, data_dir: Path, console: Console,
                 reserved_cpus: int = 0, scheduling_params: dict[str, float] | None = None,
                 plan: Plan | None = None) -> dict[str, Any]:
    """Start one LoRAFleet server, run the probe and both phases, stop it; write the JSON."""
    from lorafleet.loadtest.bench.harness import prepare_assets

    plan = plan or make_plan(quick)
    names = adapter_names(plan.flood_adapters + 1)
    adapters = {FLOOD: list(names[:-1]), STEADY: [names[-1]]}
    sc = Scenario(name="fairness", description="", adapters=names, phases=())
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir, warm_dir, _ = prepare_assets(sc, data_dir.resolve(), console)
    admin_key = "bench-" + secrets.token_hex(16)
    opts = servers.LoRAFleetOptions(
        model_dir=model_dir, served_model_name=MODEL, max_loras=plan.max_loras, max_lora_rank=8,
        max_cpu_loras=32, max_num_seqs=plan.max_num_seqs, reserved_cpus=reserved_cpus,
        data_dir=out_dir / "lorafleet-data", admin_key=admin_key,
        ignore_eos_tenants=FLOOD)  # the flood's policy allows it; steady's does not
    port = servers.free_port()
    cmd, env = servers.lorafleet_command(opts, port)
    for name, value in (scheduling_params or {}).items():  # e.g. tenant_max_slowdown
        cmd += ["--scheduling-param", f"{name}={value}"]
    t0 = time.monotonic()
    with servers.running("lorafleet", cmd, env, port, out_dir / "logs" / "fairness.log",
                         420.0) as srv:
        keys = _set_up(srv.base_url, admin_key, plan, adapters, warm_dir)
        doc = asyncio.run(run_against(srv.base_url, admin_key, keys, plan, adapters, console))
    doc.update(quick=quick, seconds=time.monotonic() - t0, reserved_cpus=reserved_cpus,
               scheduling_params=dict(scheduling_params or {}),
               machine="2-core CPU, fp32, SmolLM2-135M-Instruct")
    path = out_dir / "fairness.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    print_report(doc, console)
    console.print(f"results: {path}")
    return doc


def _set_up(base_url: str, admin_key: str, plan: Plan, adapters: dict[str, list[str]],
            warm_dir: Path) -> dict[str, str]:
    """Both tenants (the flood's with its concurrency quota), their keys and adapters."""
    quotas = {FLOOD: {"max_concurrent": plan.flood_max_concurrent}, STEADY: {}}
    keys: dict[str, str] = {}
    with httpx.Client(base_url=base_url, timeout=120.0,
                      headers={"Authorization": f"Bearer {admin_key}"}) as http:
        for tenant, quota in quotas.items():
            http.post("/admin/v1/tenants", json={"name": tenant, "quota": quota}
                      ).raise_for_status()
            r = http.post(f"/admin/v1/tenants/{tenant}/keys", json={})
            r.raise_for_status()
            keys[tenant] = r.json()["key"]
            for name in adapters[tenant]:
                http.post(f"/admin/v1/tenants/{tenant}/adapters",
                          json={"name": name, "source": str(warm_dir / name), "load": True}
                          ).raise_for_status()
    return keys
