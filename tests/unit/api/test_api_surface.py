"""What the public port shows: no API docs unless asked for, and no admin API when it has a
listener of its own (issue 19 item 15).

The real app and the real admin listener (uvicorn on a loopback port) over a SQLite registry;
the engine and the prompt renderer are stand-ins, since no route here reaches them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from unittest.mock import MagicMock

import httpx
import pytest

from lorafleet.adapters.keys import hash_key
from lorafleet.adapters.registry import SQLiteRegistry
from lorafleet.serving.admin_listener import AdminListener
from lorafleet.serving.api.app import build_app
from lorafleet.serving.api.services import ApiServices
from lorafleet.serving.config import ServeSettings

ADMIN_KEY = "k" * 40
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DOCS = ("/docs", "/redoc", "/openapi.json")


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[SQLiteRegistry]:
    reg = SQLiteRegistry(str(tmp_path / "r.db"))
    yield reg
    await reg.close()


def services(registry: SQLiteRegistry, **kwargs: bool) -> ApiServices:
    return ApiServices(served_model_name="m", registry=registry, engines=MagicMock(),
                       renderer=MagicMock(), admin_key_hash=hash_key(ADMIN_KEY), **kwargs)


def client(svc: ApiServices) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(svc)),
                             base_url="http://lorafleet")


def test_docs_are_off_unless_asked_for() -> None:
    assert ServeSettings().api_docs is False
    assert ServeSettings().admin_port is None


@pytest.mark.parametrize("on", [False, True])
async def test_docs_and_openapi_document_follow_the_setting(on: bool,
                                                            registry: SQLiteRegistry) -> None:
    async with client(services(registry, api_docs=on)) as c:
        for path in DOCS:
            assert (await c.get(path)).status_code == (200 if on else 404), path
        if on:
            assert "/v1/chat/completions" in (await c.get("/openapi.json")).json()["paths"]


async def test_admin_routes_leave_the_public_port_for_their_own_listener(
        registry: SQLiteRegistry) -> None:
    svc = services(registry, admin_listener=True)
    async with client(svc) as c:
        r = await c.post("/admin/v1/tenants", json={"name": "alice"}, headers=ADMIN)
        assert r.status_code == 404
        assert (await c.get("/admin/v1/tenants", headers=ADMIN)).status_code == 404
    listener = AdminListener(svc, "127.0.0.1", 0).start()
    try:
        await listener.started()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{listener.port}") as admin:
            r = await admin.post("/admin/v1/tenants", json={"name": "alice"}, headers=ADMIN)
            assert r.status_code == 201, r.text
            r = await admin.get("/admin/v1/tenants", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401  # still behind the admin key
            assert (await admin.get("/v1/models")).status_code == 404  # admin only
            assert (await admin.get("/openapi.json")).status_code == 404
    finally:
        await listener.stop()
    assert [t.name for t in await registry.list_tenants()] == ["alice"]


async def test_without_a_listener_the_admin_api_stays_on_the_public_port(
        registry: SQLiteRegistry) -> None:
    async with client(services(registry)) as c:
        r = await c.post("/admin/v1/tenants", json={"name": "bob"}, headers=ADMIN)
        assert r.status_code == 201, r.text
