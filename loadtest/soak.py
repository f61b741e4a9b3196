"""Bounded soak and capacity sweep against a running LoRAFleet: ``lorafleet soak {run,sweep}``.

Boundary: a client of one server, given by URL (loopback by default). ``run`` sends mixed
streaming traffic over the tenants of a keys file while it adds and removes adapters through
the admin API, and samples the server's resident memory and open files from ``/proc`` (via
psutil) for every process of its session; ``sweep`` finds the highest number of concurrent
streaming requests whose TTFT and TPOT p99 meet an SLO. Both stop at ``--duration`` or
``--max-requests``, whichever comes first, and write JSON.

Pure decisions (``decide_capacity``, ``decide_growth``) are separate from the I/O so tests
can check them without a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from lorafleet.loadtest.client import send
from lorafleet.loadtest.metrics import RequestRecord, percentile, tpot
from lorafleet.loadtest.workload import PlannedRequest

PROMPTS = (
    "Tell me about the sea.",
    "Write a short note to a friend about the weather and your plans for the week.",
    "List three facts about the moon.",
    "Explain in a few sentences how a bicycle works, for a child who is learning to ride.",
)


# -- pure policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """The outcome of one concurrency level of a sweep."""

    concurrency: int
    requests: int
    errors: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    tokens_per_s: float


def level_meets(level: Level, ttft_p99_s: float, tpot_p99_s: float) -> bool:
    return (
        level.errors == 0 and level.requests > 0
        and level.ttft_p99_s is not None and level.ttft_p99_s <= ttft_p99_s
        and level.tpot_p99_s is not None and level.tpot_p99_s <= tpot_p99_s
    )


def decide_capacity(levels: list[Level], ttft_p99_s: float, tpot_p99_s: float) -> int | None:
    """The highest concurrency meeting the SLO below which every level met it too."""
    best = None
    for level in sorted(levels, key=lambda x: x.concurrency):
        if not level_meets(level, ttft_p99_s, tpot_p99_s):
            break
        best = level.concurrency
    return best


def decide_growth(values: list[float], warmup: int = 2) -> dict[str, float | None]:
    """Median of the first and last fifth of the samples after ``warmup``, and their ratio."""
    data = values[warmup:] if len(values) > warmup + 4 else values
    if not data:
        return {"first": None, "last": None, "ratio": None}
    k = max(1, len(data) // 5)
    first, last = statistics.median(data[:k]), statistics.median(data[-k:])
    return {"first": first, "last": last, "ratio": (last / first) if first else None}


def level_from_records(concurrency: int, records: list[RequestRecord], wall_s: float) -> Level:
    ok = [r for r in records if r.ok]
    ttfts = [r.token_times[0] for r in ok if r.token_times]
    tpots = [t for r in ok if (t := tpot(r.token_times[0] if r.token_times else None, r.e2e_s,
                                          r.n_out)) is not None]
    return Level(
        concurrency=concurrency,
        requests=len(records),
        errors=len(records) - len(ok),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_p50_s=percentile(tpots, 50),
        tpot_p99_s=percentile(tpots, 99),
        tokens_per_s=sum(r.n_out for r in ok) / wall_s if wall_s > 0 else 0.0,
    )


# -- I/O: the server's processes -------------------------------------------------------------


def find_server_pids(target: str, server_pid: int | None) -> list[int]:
    """The server's processes: ``server_pid`` and its descendants, else the session of the
    process listening on the target's port (Ray's workers share the server's session)."""
    import psutil

    if server_pid is not None:
        root = psutil.Process(server_pid)
        return [root.pid, *(p.pid for p in root.children(recursive=True))]
    port = urlparse(target).port or 80
    listeners = [c.pid for c in psutil.net_connections(kind="tcp")
                 if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid]
    if not listeners:
        return []
    sid = os.getsid(listeners[0])
    return [p.pid for p in psutil.process_iter() if _sid(p.pid) == sid]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def sample_processes(pids: list[int]) -> dict[str, Any]:
    import psutil

    rss = fds = alive = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            rss += p.memory_info().rss
            fds += p.num_fds()
            alive += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return {"rss_bytes": rss, "open_files": fds, "processes": alive}


# -- I/O: traffic ----------------------------------------------------------------------------


def _check_target(target: str, allow_remote: bool) -> str:
    host = urlparse(target).hostname or ""
    if not allow_remote and host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing {target}: not loopback (pass --allow-remote for a server you run)")
    return target.rstrip("/")


async def _models(http: httpx.AsyncClient, base: str, key: str) -> list[str]:
    r = await http.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    return [m["id"] for m in r.json()["data"]]


async def _one(http: httpx.AsyncClient, base: str, index: int, tenant: str, key: str, model: str,
               max_tokens: int, rng: random.Random, run_start: float) -> RequestRecord:
    req = PlannedRequest(index=index, at_s=0.0, tenant=tenant, model=model,
                         prompt=rng.choice(PROMPTS), max_tokens=max_tokens, stream=True,
                         reader_rate=float("inf"))
    return await send(http, base + "/v1", req, api_key=key, endpoint="chat", ignore_eos=True,
                      run_start=run_start, timeout_s=300)


async def _closed_loop(http: httpx.AsyncClient, base: str, keys: dict[str, str],
                       models: dict[str, list[str]], *, concurrency: int, max_requests: int,
                       deadline: float, max_tokens: int, seed: int) -> list[RequestRecord]:
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    counter = iter(range(max_requests))
    start = time.perf_counter()

    async def worker() -> None:
        for i in counter:
            if time.monotonic() >= deadline:
                return
            tenant = rng.choice(sorted(keys))
            model = rng.choice(models[tenant])
            records.append(await _one(http, base, i, tenant, keys[tenant], model, max_tokens,
                                      rng, start))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def _churn(http: httpx.AsyncClient, base: str, admin_key: str, tenant: str, key: str,
                 source: str, interval_s: float, stop: asyncio.Event) -> dict[str, Any]:
    """Add an adapter, use it once, delete it; again every ``interval_s`` until ``stop``."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    out: dict[str, Any] = {"added": 0, "removed": 0, "used": 0, "failures": []}
    i = 0
    while not stop.is_set():
        name = f"soak-{os.getpid()}-{i}"
        i += 1
        r = await http.post(f"{base}/admin/v1/tenants/{tenant}/adapters",
                            json={"name": name, "source": source}, headers=admin)
        if r.status_code != 201:
            out["failures"].append(f"add {name}: {r.status_code} {r.text[:200]}")
        else:
            out["added"] += 1
            rec = await _one(http, base, -i, tenant, key, name, 4, random.Random(i), time.perf_counter())
            if rec.ok:
                out["used"] += 1
            else:
                out["failures"].append(f"use {name}: {rec.status} {rec.error}")
            r = await http.delete(f"{base}/admin/v1/tenants/{tenant}/adapters/{name}", headers=admin)
            if r.status_code == 204:
                out["removed"] += 1
            else:
                out["failures"].append(f"delete {name}: {r.status_code} {r.text[:200]}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
    return out


async def _sampler(pids: list[int], interval_s: float, stop: asyncio.Event, t0: float,
                   samples: list[dict[str, Any]]) -> None:
    while True:
        samples.append({"t_s": round(time.monotonic() - t0, 2),
                        **await asyncio.to_thread(sample_processes, pids)})
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
            return
        except TimeoutError:
            pass


def _machine() -> dict[str, Any]:
    # The load average says how much else ran on the machine while the figures were taken.
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_1_5_15": os.getloadavg()}


def _records_summary(records: list[RequestRecord]) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            k = f"{r.status}: {(r.error or '')[:80]}"
            errors[k] = errors.get(k, 0) + 1
    return {"total": len(records), "ok": sum(r.ok for r in records), "errors": errors}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    base = _check_target(args.target, args.allow_remote)
    keys: dict[str, str] = json.loads(Path(args.keys_file).read_text())
    admin_key = Path(args.admin_key_file).read_text().strip() if args.admin_key_file else None
    pids = find_server_pids(base, args.server_pid)
    t0 = time.monotonic()
    deadline = t0 + args.duration
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        models = {t: await _models(http, base, k) for t, k in keys.items()}
        sampler = asyncio.create_task(_sampler(pids, args.sample_every, stop, t0, samples))
        churn = None
        if admin_key and args.churn_source:
            tenant = args.churn_tenant or sorted(keys)[0]
            churn = asyncio.create_task(_churn(http, base, admin_key, tenant, keys[tenant],
                                               args.churn_source, args.churn_every, stop))
        records = await _closed_loop(http, base, keys, models, concurrency=args.concurrency,
                                     max_requests=args.max_requests, deadline=deadline,
                                     max_tokens=args.max_tokens, seed=args.seed)
        stop.set()
        churn_out = await churn if churn else None
        await sampler
    wall = time.monotonic() - t0
    level = level_from_records(args.concurrency, records, wall)
    return {
        "kind": "soak", "target": base, "machine": _machine(), "wall_s": round(wall, 1),
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "requests": _records_summary(records), "latency": asdict(level),
        "adapter_churn": churn_out, "server_processes": len(pids),
        "growth": {"rss_bytes": decide_growth([s["rss_bytes"] for s in samples]),
                   "open_files": decide_growth([s["open_files"] for s in samples])},
        "samples": samples,
    }


async def sweep(args: argparse.Namespace) -> dict[str, Any]:
    base = _check_target(args.target, args.allow_remote)
    keys: dict[str, str] = json.loads(Path(args.keys_file).read_text())
    t0 = time.monotonic()
    levels: list[Level] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=256)) as http:
        models = {t: await _models(http, base, k) for t, k in keys.items()}
        for c in sorted({int(x) for x in args.levels.split(",")}):
            if time.monotonic() - t0 >= args.duration:
                break
            start = time.monotonic()
            records = await _closed_loop(
                http, base, keys, models, concurrency=c,
                max_requests=max(c * args.rounds, c), deadline=t0 + args.duration,
                max_tokens=args.max_tokens, seed=args.seed + c)
            level = level_from_records(c, records, time.monotonic() - start)
            levels.append(level)
            print(json.dumps(asdict(level)), flush=True)
            if not level_meets(level, args.ttft_p99, args.tpot_p99):
                break
    return {
        "kind": "capacity-sweep", "target": base, "machine": _machine(),
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "slo": {"ttft_p99_s": args.ttft_p99, "tpot_p99_s": args.tpot_p99},
        "capacity": decide_capacity(levels, args.ttft_p99, args.tpot_p99),
        "levels": [asdict(x) for x in levels], "wall_s": round(time.monotonic() - t0, 1),
    }


# -- command line ----------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``soak {run,sweep}`` to ``subparsers``."""
    p = subparsers.add_parser("soak", help="bounded soak or capacity sweep against a server")
    sub = p.add_subparsers(dest="soak_command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--target", default="http://127.0.0.1:8000", help="server base URL")
        q.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
        q.add_argument("--keys-file", default=".lorafleet/demo-keys.json",
                       help="JSON {tenant: key} (the demo writes one)")
        q.add_argument("--duration", type=float, default=300, help="stop after this many seconds")
        q.add_argument("--max-tokens", type=int, default=32,
                       help="tokens per request (ignore_eos: the server must name the keys' "
                       "tenants in --ignore-eos-tenants)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--out", type=Path, required=True, help="write the JSON here")

    run = sub.add_parser("run", help="mixed streaming traffic with adapter churn; RSS and fds")
    common(run)
    run.add_argument("--max-requests", type=int, default=10_000)
    run.add_argument("--concurrency", type=int, default=4)
    run.add_argument("--admin-key-file", help="admin key file (enables adapter churn)")
    run.add_argument("--churn-source", help="adapter source to add and remove repeatedly")
    run.add_argument("--churn-tenant", help="tenant that gets the churned adapters")
    run.add_argument("--churn-every", type=float, default=15.0, help="seconds between churns")
    run.add_argument("--server-pid", type=int, help="server pid (default: the port's session)")
    run.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    run.set_defaults(func=lambda a: _main(soak, a))

    sw = sub.add_parser("sweep", help="highest streaming concurrency meeting TTFT/TPOT p99")
    common(sw)
    sw.add_argument("--levels", default="1,2,4,8,16,32", help="concurrency levels to try")
    sw.add_argument("--rounds", type=int, default=2, help="requests per worker per level")
    sw.add_argument("--ttft-p99", type=float, default=2.0, help="SLO: TTFT p99 seconds")
    sw.add_argument("--tpot-p99", type=float, default=0.2, help="SLO: TPOT p99 seconds")
    sw.set_defaults(func=lambda a: _main(sweep, a))


def _main(fn: Any, args: argparse.Namespace) -> int:
    doc = asyncio.run(fn(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    shown = {k: v for k, v in doc.items() if k not in ("samples", "config")}
    print(json.dumps(shown, indent=1, default=str))
    return 0 if doc.get("requests", {}).get("errors", {}) == {} else 1
