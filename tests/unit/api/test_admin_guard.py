"""Every admin route is behind the admin key because the router says so, not each route.

The real app over a SQLite registry; the engines and the renderer are stand-ins, since a
refused request reaches neither.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from unittest.mock import MagicMock

import httpx
import pytest
from fastapi.routing import APIRoute

from lorafleet.adapters.keys import hash_key
from lorafleet.adapters.registry import SQLiteRegistry
from lorafleet.serving.api.admin_routes import build_admin_router
from lorafleet.serving.api.app import build_app
from lorafleet.serving.api.services import ApiServices

ADMIN_KEY = "k" * 40


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[ApiServices]:
    reg = SQLiteRegistry(str(tmp_path / "r.db"))
    yield ApiServices(served_model_name="m", registry=reg, engines=MagicMock(),
                      renderer=MagicMock(), admin_key_hash=hash_key(ADMIN_KEY))
    await reg.close()


def admin_routes(svc: ApiServices) -> list[APIRoute]:
    return [r for r in build_admin_router(svc).routes if isinstance(r, APIRoute)]


def test_a_route_added_to_the_admin_router_inherits_its_guard(svc: ApiServices) -> None:
    router = build_admin_router(svc)
    router.add_api_route("/new", lambda: {"ok": True})
    new = [r for r in router.routes if isinstance(r, APIRoute) and r.path.endswith("/new")][0]
    assert any(d.call is router.dependencies[0].dependency for d in new.dependant.dependencies)


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer " + "k" * 39, "Basic x"])
async def test_every_admin_route_refuses_a_missing_or_wrong_key(svc: ApiServices,
                                                                header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    app = build_app(svc)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://lorafleet") as c:
        routes = admin_routes(svc)
        assert len(routes) >= 13
        for route in routes:
            path = route.path.replace("{tenant}", "alice").replace("{name}", "french") \
                .replace("{key_id}", "abcd1234")
            for method in route.methods:
                r = await c.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (method, path, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
