"""The server while hostile adapters are imported (issue 19, "How it is shown", items 1-4).

The real app on a real tiny vLLM engine, in this process; the hostile corpus
(`adapterfiles.hostile_corpus`: backtracking `target_modules`, deep JSON, a 64 MiB tar
long-name header, a pickle, path traversal, a wrong base, a rank too large) goes through
`POST /admin/v1/tenants/{t}/adapters` twice over while `/health` is polled every 20 ms. What
every other tenant would notice: `/health` p99 under 100 ms, the server's memory (RSS) grows by
at most 64 MB, and each import is refused with its code.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from adapterfiles import hostile_corpus

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ADMIN = {"Authorization": "Bearer " + "a" * 40}


async def test_health_and_memory_hold_while_hostile_adapters_are_imported(
        engine: Any, engine_config: Any, tmp_path: Path) -> None:
    from lorafleet.serving.api.app import build_app
    from lorafleet.serving.assemble import make_services
    from lorafleet.serving.engine.client import LocalEngineClient

    tiny = json.loads((Path(engine_config.model_dir) / "config.json").read_text())
    corpus = hostile_corpus(tmp_path / "corpus", base=engine_config.served_model_name,
                            model=tiny)
    services = make_services(engine_config=engine_config, engines=LocalEngineClient([engine]),
                             registry_url=f"sqlite:///{tmp_path / 'registry.db'}",
                             data_dir=tmp_path, admin_key="a" * 40)
    me = psutil.Process()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(services)),
                                     base_url="http://lorafleet", timeout=600) as c:
            r = await c.post("/admin/v1/tenants", json={"name": "mallory"}, headers=ADMIN)
            assert r.status_code == 201, r.text
            for _ in range(20):  # warm the health path before the baseline
                await c.get("/health")
            rss_before = me.memory_info().rss
            done = asyncio.Event()
            health: list[float] = []

            async def poll() -> None:
                while not done.is_set():
                    started = time.monotonic()
                    assert (await c.get("/health")).status_code == 200
                    health.append(time.monotonic() - started)
                    await asyncio.sleep(0.02)

            poller = asyncio.create_task(poll())
            codes: dict[str, str] = {}
            started = time.monotonic()
            try:
                for round_ in range(2):
                    for case, (path, code) in corpus.items():
                        r = await c.post("/admin/v1/tenants/mallory/adapters", headers=ADMIN,
                                         json={"name": f"{case}-{round_}", "source": str(path),
                                               "load": False})
                        assert r.status_code == 422, (case, r.status_code, r.text)
                        error = r.json()["error"]
                        assert error["code"] == code, (case, error)
                        assert len(r.content) < 1000 and str(tmp_path) not in r.text
                        codes[case] = error["code"]
            finally:
                took = time.monotonic() - started
                done.set()
                await poller
            rss_after = me.memory_info().rss
    finally:
        await services.registry.close()
    health.sort()
    p99 = health[int(len(health) * 0.99) - 1]
    grew = (rss_after - rss_before) / 2**20
    print(f"\n[hostile intake] {2 * len(corpus)} imports in {took:.1f} s; /health "
          f"{len(health)} polls, p50 {statistics.median(health) * 1000:.1f} ms, p99 "
          f"{p99 * 1000:.1f} ms, max {health[-1] * 1000:.0f} ms; RSS {grew:+.1f} MiB")
    assert p99 < 0.1, p99
    assert grew < 64, grew
