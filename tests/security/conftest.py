"""Fixtures for the security suites: the component layer's real tiny engine and app.

The fixtures are the session's tiny engine and app (``tests/support/tinyengine.py``: a real
vLLM engine on the tiny random Llama, the real app driven in-process through httpx's ASGI
transport, a SQLite registry per test), shared with the component layer, so both layers
test the same assembly on one engine. ``drive`` runs a Hypothesis property in a worker thread while the engine
keeps the test's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinyengine import ADAPTERS, ADMIN_KEY, TINY_MODEL_NAME

__all__ = ["ADAPTERS", "ADMIN_KEY", "TINY_MODEL_NAME", "assert_openai_error", "auth", "drive"]


def auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response) -> dict[str, Any]:
    """A non-2xx answer: below 500, and exactly ``{"error": {message, type, param, code}}``."""
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert "Traceback" not in err["message"]
    return err


def drive(
    strategy: st.SearchStrategy[Any],
    check: Callable[[Any], Awaitable[None]],
    loop: asyncio.AbstractEventLoop,
    *,
    max_examples: int,
    timeout_s: float = 120.0,
) -> int:
    """Run ``check`` on up to ``max_examples`` seeded examples; return how many were tried.

    Call through ``asyncio.to_thread``: each example is handed back to ``loop`` (where the
    engine and the app live) and this thread waits for it.
    """
    tried = 0

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(strategy)
    def prop(x: Any) -> None:
        nonlocal tried
        tried += 1
        asyncio.run_coroutine_threadsafe(check(x), loop).result(timeout=timeout_s)

    prop()
    return tried


@pytest.fixture
async def revoked_key(client: httpx.AsyncClient, tenants: dict[str, str]) -> str:
    """A key of alice's, created and then revoked."""
    r = await client.post("/admin/v1/tenants/alice/keys", json={}, headers=auth(ADMIN_KEY))
    assert r.status_code == 201, r.text
    key, key_id = r.json()["key"], r.json()["key_id"]
    r = await client.delete(f"/admin/v1/tenants/alice/keys/{key_id}", headers=auth(ADMIN_KEY))
    assert r.status_code == 204, r.text
    return str(key)
