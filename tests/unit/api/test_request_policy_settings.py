"""The request policy is a deployment setting: ``ServeSettings`` (flags, ``LORAFLEET_*``)
to ``ApiServices.request_policy`` to the routes, through the real app on the fake engine.

- A tenant the setting does not name gets 403 ``ignore_eos``; a named one is served.
- By default nobody may send ``ignore_eos``; ``*`` lets every tenant send it.
- A tool parser name vLLM does not know is refused before the app is built.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fakeengine import FakeEngine
from tinyengine import ADMIN, asgi_client

from lorafleet.serving.api.app import build_app
from lorafleet.serving.api.openai_routes import check_tool_parser
from lorafleet.serving.api.services import ApiServices
from lorafleet.serving.config import ServeSettings
from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME


def client_for(services: ApiServices) -> httpx.AsyncClient:
    return asgi_client(build_app(services))


async def tenant_key(api: httpx.AsyncClient, name: str) -> dict[str, str]:
    r = await api.post("/admin/v1/tenants", json={"name": name, "quota": {}}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = await api.post(f"/admin/v1/tenants/{name}/keys", json={}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": TINY_MODEL_NAME, "prompt": "hello there", "max_tokens": 4, **extra}


async def test_a_tenant_not_named_in_the_setting_gets_403(
    services: ApiServices, fake: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLEET_IGNORE_EOS_TENANTS", "bench, loadtest")
    services.request_policy = ServeSettings().request_policy()
    async with client_for(services) as api:
        alice = await tenant_key(api, "alice")
        bench = await tenant_key(api, "bench")
        r = await api.post("/v1/completions", json=completion(ignore_eos=True), headers=alice)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["param"] == "ignore_eos"
        r = await api.post("/v1/completions", json=completion(ignore_eos=True), headers=bench)
        assert r.status_code == 200, r.text
    assert [q.sampling.ignore_eos for q in fake.requests] == [True]


async def test_by_default_no_tenant_may_send_ignore_eos(
    services: ApiServices, fake: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorafleet.serving.api.request_policy import RequestPolicy

    monkeypatch.delenv("LORAFLEET_IGNORE_EOS_TENANTS", raising=False)
    services.request_policy = ServeSettings().request_policy()
    assert services.request_policy == RequestPolicy()  # one default, wherever it is built
    async with client_for(services) as api:
        alice = await tenant_key(api, "alice")
        r = await api.post("/v1/completions", json=completion(ignore_eos=True), headers=alice)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["param"] == "ignore_eos"
        r = await api.post("/v1/completions", json=completion(), headers=alice)
        assert r.status_code == 200, r.text
    assert [q.sampling.ignore_eos for q in fake.requests] == [False]


async def test_star_lets_every_tenant_send_ignore_eos(
    services: ApiServices, fake: FakeEngine
) -> None:
    services.request_policy = ServeSettings(ignore_eos_tenants="*").request_policy()
    async with client_for(services) as api:
        alice = await tenant_key(api, "alice")
        r = await api.post("/v1/completions", json=completion(ignore_eos=True), headers=alice)
        assert r.status_code == 200, r.text
    assert [q.sampling.ignore_eos for q in fake.requests] == [True]


async def test_an_unknown_tool_parser_is_refused_at_start(services: ApiServices) -> None:
    services.request_policy = ServeSettings(tool_call_parser="no-such-parser").request_policy()
    with pytest.raises(ValueError, match="unknown tool_call_parser 'no-such-parser'"):
        build_app(services)
    check_tool_parser("hermes")
    check_tool_parser(None)
