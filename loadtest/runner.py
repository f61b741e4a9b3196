"""Runs a request plan against a target: bounded in time, count and concurrency.

Boundary: schedules the plan's requests (open loop at their planned times, or closed loop with
``max_concurrency`` streams), collects their records, and stops by itself: no request is started
after ``duration_s``, and at ``duration_s + request_timeout_s`` (plus a small grace) whatever is
still running is cancelled and recorded as such. Talks to nothing but the given target.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lorafleet.loadtest import client
from lorafleet.loadtest.metrics import RequestRecord
from lorafleet.loadtest.workload import ClosedArrival, PlannedRequest, Workload

GRACE_S = 5.0


@dataclass
class RunResult:
    """Records of one run, in plan order, plus when and how long it ran."""

    target: str
    started_at: str
    duration_s: float
    records: list[RequestRecord] = field(default_factory=list)
    not_sent: int = 0
    """Planned requests never sent because the run's duration ended first."""


@dataclass
class _Live:
    """Counters shown by the progress display."""

    done: int = 0
    failed: int = 0
    tokens: int = 0
    in_flight: int = 0


def _cancelled(req: PlannedRequest, start_s: float, e2e_s: float) -> RequestRecord:
    return client.record_of(req, start_s=start_s, e2e_s=e2e_s, status=None,
                            error="cancelled: still running at the run's hard deadline")


async def run_plan(
    plan: Sequence[PlannedRequest],
    workload: Workload,
    target: str,
    api_keys: dict[str, str | None],
    *,
    console: Console | None = None,
    http: httpx.AsyncClient | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> RunResult:
    """Run ``plan``; show live progress on ``console`` when given."""
    closed = isinstance(workload.arrival, ClosedArrival)
    concurrency = (
        workload.arrival.concurrency if isinstance(workload.arrival, ClosedArrival)
        else workload.max_concurrency
    )
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    own_http = http is None
    http = http or httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=10.0))
    live = _Live()
    sem = asyncio.Semaphore(concurrency)
    results: dict[int, RequestRecord] = {}
    running: dict[int, float] = {}  # index -> start time (run clock), for hard-stop records
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    run_start = clock()
    hard_stop = workload.duration_s + workload.request_timeout_s + GRACE_S

    async def one(req: PlannedRequest) -> None:
        async with sem:
            if clock() - run_start > workload.duration_s:
                return  # never sent: counted in not_sent
            live.in_flight += 1
            running[req.index] = clock() - run_start
            try:
                rec = await client.send(
                    http,
                    target,
                    req,
                    api_key=api_keys.get(req.tenant),
                    endpoint=workload.endpoint,
                    temperature=workload.temperature,
                    ignore_eos=workload.ignore_eos,
                    declare_reader_rate=workload.declare_reader_rate,
                    run_start=run_start,
                    timeout_s=workload.request_timeout_s,
                    clock=clock,
                )
            finally:
                live.in_flight -= 1
                running.pop(req.index, None)
            results[req.index] = rec
            live.done += 1
            live.failed += 0 if rec.ok else 1
            live.tokens += rec.n_out if rec.ok else 0

    async def dispatch(tasks: list[asyncio.Task[None]]) -> None:
        for req in plan:
            if not closed:
                delay = req.at_s - (clock() - run_start)
                if delay > 0:
                    await asyncio.sleep(delay)
            if clock() - run_start > workload.duration_s:
                break
            tasks.append(asyncio.create_task(one(req)))
            if closed:
                await asyncio.sleep(0)

    progress = _progress(console) if console is not None else None
    task_id = progress.add_task("requests", total=len(plan), status="") if progress else None
    tasks: list[asyncio.Task[None]] = []
    try:
        if progress:
            progress.start()
        dispatcher = asyncio.create_task(dispatch(tasks))
        while True:
            await asyncio.sleep(0.25)
            elapsed = clock() - run_start
            if progress is not None and task_id is not None:
                progress.update(
                    task_id,
                    completed=live.done,
                    status=f"in flight {live.in_flight}  failed {live.failed}  "
                    f"{live.tokens / max(elapsed, 1e-9):.1f} tok/s",
                )
            if dispatcher.done() and all(t.done() for t in tasks):
                break
            if elapsed > hard_stop:
                break
        dispatcher.cancel()
        stopped_at = clock() - run_start
        hard_stopped = {
            i: _cancelled(req, running[i], stopped_at - running[i])
            for req in plan
            if (i := req.index) in running
        }
        for t in tasks:
            t.cancel()
        await asyncio.gather(dispatcher, *tasks, return_exceptions=True)
        results.update(hard_stopped)
    finally:
        if progress:
            progress.stop()
        if own_http:
            await http.aclose()
    duration = clock() - run_start
    records = [results[req.index] for req in plan if req.index in results]
    return RunResult(
        target=target,
        started_at=started_at,
        duration_s=duration,
        records=records,
        not_sent=len(plan) - len(records),
    )


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )


async def probe_and_run(
    plan: Sequence[PlannedRequest],
    workload: Workload,
    target: str,
    api_keys: dict[str, str | None],
    *,
    console: Console | None = None,
) -> RunResult:
    """Probe ``GET {target}/models`` (clear error when unreachable), then run the plan."""
    first_key = next(iter(api_keys.values()), None)
    async with httpx.AsyncClient(timeout=10.0) as http:
        await client.probe(http, target, first_key)
    return await run_plan(plan, workload, target, api_keys, console=console)


def run_workload(
    workload: Workload,
    target: str,
    api_keys: dict[str, str | None],
    *,
    trace: Sequence[float] | None = None,
    console: Console | None = None,
    meta: dict[str, object] | None = None,
) -> dict[str, object]:
    """Plan, probe, run and summarize: the results document of one run (blocking)."""
    from lorafleet.loadtest.metrics import SLO
    from lorafleet.loadtest.report import build_results
    from lorafleet.loadtest.workload import generate_plan

    plan = generate_plan(workload, trace)
    result = asyncio.run(probe_and_run(plan, workload, target, api_keys, console=console))
    return build_results(
        result.records,
        duration_s=result.duration_s,
        slo=SLO(ttft_s=workload.slo.ttft_s, tpot_s=workload.slo.tpot_s),
        meta={
            "target": target,
            "started_at": result.started_at,
            "workload": workload.model_dump(mode="json"),
            "planned": len(plan),
            **(meta or {}),
        },
        not_sent=result.not_sent,
    )
