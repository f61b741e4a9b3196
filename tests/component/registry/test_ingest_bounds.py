"""import_adapter under hostile content and slow sources: the caller's event loop stays free,
one fetch per (tenant, name), a cap on concurrent imports, a deadline (issue 19, items 1, 4, 5).

Real worker processes, a real SQLite registry, real HTTP servers on loopback (allowlisted).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from adapterfiles import TINY_LLAMA_CONFIG
from adapterfiles import write_tiny_adapter as write_adapter

from lorafleet.adapters.basemodel import base_model_info_from_config
from lorafleet.adapters.cache import AdapterCache
from lorafleet.adapters.errors import (
    AdapterFetchError,
    AdapterValidationError,
    IntakeBusy,
)
from lorafleet.adapters.ingest import IntakeGate, import_adapter
from lorafleet.adapters.model import Quota, Tenant
from lorafleet.adapters.registry import SQLiteRegistry
from lorafleet.adapters.sandbox import IntakeSettings
from lorafleet.adapters.validation import ValidationLimits

LOOPBACK_OK = IntakeSettings(allow_networks=("127.0.0.0/8",))
BASE = base_model_info_from_config(TINY_LLAMA_CONFIG, "tiny-llama")


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[SQLiteRegistry]:
    reg = SQLiteRegistry(tmp_path / "registry.db")
    await reg.put_tenant(Tenant("alice", "Alice", Quota(), 1.0))
    yield reg
    await reg.close()


class HeldServer:
    """GET answers 404, but only once `release` is set; `asked` is set at each request."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.release = threading.Event()
        self.paths: list[str] = []
        held = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                held.paths.append(self.path)
                held.asked.set()
                held.release.wait(60)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held() -> Iterator[HeldServer]:
    server = HeldServer()
    yield server
    server.close()


def _kwargs(registry: SQLiteRegistry, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"tenant": "alice", "shared": False, "registry": registry,
            "cache": AdapterCache(tmp_path / "cache", 1 << 24), "base": BASE,
            "limits": ValidationLimits(), "work_dir": tmp_path / "work", **extra}


async def _until(condition: Any, timeout_s: float = 30.0) -> None:
    """Wait for `condition()` to hold (it changes in another thread), failing after timeout_s."""
    ends = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < ends, "condition never held"
        await asyncio.sleep(0.01)


@pytest.mark.timeout(120)
async def test_a_backtracking_pattern_leaves_the_event_loop_free(
        registry: SQLiteRegistry, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = r"(.|.)*z"  # `re`: 2^31 steps on a 31-character module key
    (src / "adapter_config.json").write_text(json.dumps(config))
    lags: list[float] = []
    done = asyncio.Event()

    async def heartbeat() -> None:
        while not done.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)

    beat = asyncio.create_task(heartbeat())
    try:
        with pytest.raises(AdapterValidationError) as info:
            await import_adapter(name="evil", source=str(src), **_kwargs(registry, tmp_path))
    finally:
        done.set()
        await beat
    assert info.value.code == "unknown_target_module"
    assert max(lags) < 0.5, f"event loop blocked for {max(lags):.2f} s"
    assert await registry.list_adapters("alice") == []


async def held_import(name: str, held: HeldServer, kw: dict[str, Any]) -> asyncio.Task[Any]:
    """The import of `name` from the held server, once its fetch has reached the server."""
    held.asked.clear()
    task = asyncio.create_task(import_adapter(name=name, source=f"{held.url}/{name}.zip", **kw))
    assert await asyncio.to_thread(held.asked.wait, 30)
    return task


async def test_one_fetch_per_adapter_and_a_cap_on_imports(
        registry: SQLiteRegistry, tmp_path: Path, held: HeldServer) -> None:
    gate = IntakeGate(max_concurrent=2)
    kw = _kwargs(registry, tmp_path, settings=LOOPBACK_OK, gate=gate)
    first = await held_import("a", held, kw)
    # A retry of the same adapter while the first attempt runs: refused, nothing fetched.
    with pytest.raises(IntakeBusy) as info:
        await import_adapter(name="a", source=f"{held.url}/a.zip", **kw)
    assert info.value.transient
    # A second adapter fills the cap; a third is refused until one of them ends.
    second = await held_import("b", held, kw)
    with pytest.raises(IntakeBusy, match="2 adapter imports"):
        await import_adapter(name="c", source=f"{held.url}/c.zip", **kw)
    held.release.set()
    for task in (first, second):
        with pytest.raises(AdapterFetchError, match="404"):
            await task
    assert sorted(held.paths) == ["/a.zip", "/b.zip"]
    assert gate.running() == 0
    with pytest.raises(AdapterFetchError, match="404"):  # slots free again
        await import_adapter(name="c", source=f"{held.url}/c.zip", **kw)


async def test_a_cancelled_import_holds_its_slot_until_its_worker_ends(
        registry: SQLiteRegistry, tmp_path: Path, held: HeldServer) -> None:
    gate = IntakeGate(max_concurrent=1)
    kw = _kwargs(registry, tmp_path, settings=LOOPBACK_OK, gate=gate)
    task = await held_import("a", held, kw)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(IntakeBusy):  # the operator's retry does not start a second fetch
        await import_adapter(name="a", source=f"{held.url}/a.zip", **kw)
    held.release.set()
    await _until(lambda: gate.running() == 0)
    await _until(lambda: not any((tmp_path / "work").iterdir()))
    assert held.paths == ["/a.zip"]


@pytest.mark.timeout(60)
async def test_a_silent_source_meets_the_intake_deadline(
        registry: SQLiteRegistry, tmp_path: Path, held: HeldServer) -> None:
    settings = IntakeSettings(allow_networks=("127.0.0.0/8",), fetch_timeout_s=30,
                              fetch_deadline_s=1.5, deadline_s=1.5)
    gate = IntakeGate(1)
    started = time.monotonic()
    with pytest.raises(AdapterFetchError) as info:
        await import_adapter(name="a", source=f"{held.url}/a.zip",
                             **_kwargs(registry, tmp_path, settings=settings, gate=gate))
    assert info.value.transient and "1.5 s" in info.value.reason
    assert time.monotonic() - started < 20
    assert gate.running() == 0 and not any((tmp_path / "work").iterdir())


async def test_intake_refuses_private_sources_by_default(
        registry: SQLiteRegistry, tmp_path: Path, held: HeldServer) -> None:
    with pytest.raises(AdapterFetchError) as info:
        await import_adapter(name="a", source=f"{held.url}/a.zip",
                             **_kwargs(registry, tmp_path, settings=IntakeSettings(),
                                       gate=IntakeGate(1)))
    assert not info.value.transient and "loopback" in info.value.reason
    assert held.paths == []


def test_intake_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_INTAKE_ALLOW_NETWORKS", '["10.0.0.0/8", "fd00::/8"]')
    monkeypatch.setenv("LORAFLEET_INTAKE_MAX_CONCURRENT", "3")
    settings = IntakeSettings()
    assert settings.allow_networks == ("10.0.0.0/8", "fd00::/8") and settings.max_concurrent == 3
    monkeypatch.setenv("LORAFLEET_INTAKE_ALLOW_NETWORKS", '["10.0.0.0/33"]')
    with pytest.raises(ValueError):
        IntakeSettings()
