"""The ingress's event-loop lag is measured on its own loop and exported (issue 19).

- ``sample_loop_lag`` observes how late a blocked loop woke its timer.
- The public app's lifespan runs the sampler, and ``/metrics`` shows
  ``lorafleet_ingress_event_loop_lag_seconds`` with the stall in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from prometheus_client.parser import text_string_to_metric_families

from lorafleet.serving.api.app import build_app, sample_loop_lag
from lorafleet.serving.api.services import ApiServices

LAG = "lorafleet_ingress_event_loop_lag_seconds"


async def test_a_blocked_loop_is_observed_as_lag() -> None:
    seen: list[float] = []
    task = asyncio.create_task(sample_loop_lag(seen.append, interval_s=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # blocks the loop the sampler runs on
    await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert max(seen) >= 0.25
    assert sorted(seen)[len(seen) // 2] < 0.1  # the loop was idle most of the time


def _lag_samples(text: str) -> dict[str, float]:
    fam = next(f for f in text_string_to_metric_families(text) if f.name == LAG)
    return {s.name + s.labels.get("le", ""): s.value for s in fam.samples}


async def test_the_app_samples_its_loop_while_it_runs(services: ApiServices) -> None:
    app = build_app(services)
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0.15)
        time.sleep(0.5)  # at least 0.4 s past a 0.1 s timer
        await asyncio.sleep(0.15)
    lag = _lag_samples(services.metrics.exposition().decode())
    assert lag[LAG + "_count"] >= 2
    assert lag[LAG + "_bucket0.25"] < lag[LAG + "_count"]  # the stall is above 0.25 s
    count = lag[LAG + "_count"]
    await asyncio.sleep(0.25)  # the sampler stopped with the app
    assert _lag_samples(services.metrics.exposition().decode())[LAG + "_count"] == count
