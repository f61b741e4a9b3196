"""What one tenant's request may take from the others (issue 19 items 6-9, 18), through the
real API app on the fake engine.

- A quota slot is released even when the client leaves before the stream's first byte
  (the body generator never starts, so its ``finally`` never runs).
- Big prompts are refused before they are tokenized, a tenant already being refused is
  refused again before its prompt is tokenized, and tokenizing runs off the event loop.
- A request holds one concurrency slot per sequence (n x prompts), and n x prompts is capped.
- ``ignore_eos`` only for the tenants the request policy names; no client-chosen priority.
- Each tenant's requests carry its own prefix-cache salt, which no field of a body can set.

The engine is ``FakeEngine``, the tokenizer the tiny test model's (wrapped to count calls),
the registry SQLite: seconds, no vLLM.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest
from fakeengine import FakeEngine
from fastapi import FastAPI
from tinyengine import ADMIN
from tinyengine import asgi_client as client_for

from lorafleet.serving.api.admin_routes import build_admin_router
from lorafleet.serving.api.app import build_app
from lorafleet.serving.api.errors import install_error_handlers
from lorafleet.serving.api.openai_routes import build_openai_router
from lorafleet.serving.api.request_policy import RequestPolicy
from lorafleet.serving.api.services import ApiServices
from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME


class CountingTokenizer:
    """The real tokenizer, recording which threads tokenized (unit tests only)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.threads: list[int] = []

    def encode(self, *a: Any, **kw: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self._inner.encode(*a, **kw)

    def apply_chat_template(self, *a: Any, **kw: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self._inner.apply_chat_template(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)


@pytest.fixture
def services(services: ApiServices) -> ApiServices:
    """The unit layer's services, their tokenizer counting the threads it runs on."""
    services.renderer.tokenizer = CountingTokenizer(services.renderer.tokenizer)
    return services


async def tenant_key(api: httpx.AsyncClient, name: str, quota: dict[str, int]) -> dict[str, str]:
    r = await api.post("/admin/v1/tenants", json={"name": name, "quota": quota}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = await api.post(f"/admin/v1/tenants/{name}/keys", json={}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def completion(max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": TINY_MODEL_NAME, "prompt": "hello there", "max_tokens": max_tokens, **extra}


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


# -- item 9: the slot of a stream that never started ------------------------------------


async def test_a_client_gone_before_the_first_byte_gives_its_slot_back(
    services: ApiServices, api: httpx.AsyncClient, fake: FakeEngine
) -> None:
    key = await tenant_key(api, "alice", {"max_concurrent": 1})
    body = json.dumps(completion(stream=True)).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/completions",
        "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"lorafleet"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"authorization", key["Authorization"].encode())],
        "client": ("127.0.0.1", 40000), "server": ("lorafleet", 80),
    }
    inbox = [{"type": "http.request", "body": body, "more_body": False}]
    response_started = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop(0)
        await response_started.wait()
        return {"type": "http.disconnect"}  # gone while the response headers are on their way

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            response_started.set()
            await asyncio.sleep(3600)  # a slow network: the disconnect arrives first

    await asyncio.wait_for(build_app(services)(scope, receive, send), 10)
    assert fake.requests == []  # the body generator never started
    assert services.quotas.in_flight("alice") == 0  # type: ignore[attr-defined]
    r = await api.post("/v1/completions", json=completion(), headers=key)
    assert r.status_code == 200, r.text


# -- item 8: no tokenizing for what is refused anyway, and never on the event loop --------


async def test_a_megabyte_prompt_is_refused_without_being_tokenized(
    services: ApiServices, api: httpx.AsyncClient
) -> None:
    key = await tenant_key(api, "alice", {})
    tokenizer = services.renderer.tokenizer
    r = await api.post("/v1/completions", json=completion(prompt="lorem ipsum " * 80_000),
                       headers=key)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    messages = [{"role": "user", "content": "lorem ipsum " * 80_000}]
    r = await api.post("/v1/chat/completions", headers=key, json={
        "model": TINY_MODEL_NAME, "messages": messages, "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert tokenizer.threads == []  # type: ignore[attr-defined]


async def test_a_tenant_being_refused_is_refused_again_before_tokenizing(
    services: ApiServices, api: httpx.AsyncClient
) -> None:
    key = await tenant_key(api, "alice", {"tokens_per_minute": 500})
    tokenizer = services.renderer.tokenizer
    r = await api.post("/v1/completions", json=completion(400), headers=key)
    assert r.status_code == 200, r.text  # the bucket now holds about 100 tokens
    r = await api.post("/v1/completions", json=completion(300), headers=key)
    assert r.status_code == 429, r.text  # the book refused it (after tokenizing)
    calls = len(tokenizer.threads)  # type: ignore[attr-defined]
    r = await api.post("/v1/completions", json=completion(200, prompt="hello " * 200),
                       headers=key)
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert len(tokenizer.threads) == calls  # type: ignore[attr-defined]
    r = await api.post("/v1/completions", json=completion(2), headers=key)
    assert r.status_code == 200, r.text  # what still fits is admitted


async def test_prompts_are_tokenized_off_the_event_loop(
    services: ApiServices, api: httpx.AsyncClient
) -> None:
    key = await tenant_key(api, "alice", {})
    r = await api.post("/v1/completions", json=completion(prompt=["one", "two"]), headers=key)
    assert r.status_code == 200, r.text
    r = await api.post("/v1/chat/completions", headers=key, json={
        "model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    threads = services.renderer.tokenizer.threads  # type: ignore[attr-defined]
    assert len(threads) == 3
    assert threading.get_ident() not in threads


# -- item 7: sequences, not requests ---------------------------------------------------


async def test_each_sequence_holds_a_concurrency_slot(
    services: ApiServices, api: httpx.AsyncClient, fake: FakeEngine
) -> None:
    key = await tenant_key(api, "alice", {"max_concurrent": 4})
    fake.hold()
    held = asyncio.create_task(api.post(
        "/v1/completions", json=completion(n=2, prompt=["one", "two"]), headers=key))
    await until(lambda: fake.in_flight == 4)
    r = await api.post("/v1/completions", json=completion(), headers=key)
    assert r.status_code == 429, r.text
    assert "concurrent" in r.json()["error"]["message"]
    fake.release()
    assert (await held).status_code == 200
    assert services.quotas.in_flight("alice") == 0  # type: ignore[attr-defined]
    r = await api.post("/v1/completions", json=completion(n=5), headers=key)
    assert r.status_code == 429, r.text  # five sequences never fit in four slots
    assert "5 sequences" in r.json()["error"]["message"]
    assert len(fake.requests) == 4


async def test_n_times_prompts_is_capped(api: httpx.AsyncClient, fake: FakeEngine) -> None:
    key = await tenant_key(api, "alice", {})
    r = await api.post("/v1/completions", json=completion(n=8, prompt=["p"] * 9), headers=key)
    assert r.status_code == 400, r.text
    assert "n x prompts" in r.json()["error"]["message"]
    r = await api.post("/v1/completions", json=completion(n=8, prompt=["p"] * 8), headers=key)
    assert r.status_code == 200, r.text
    assert len(fake.requests) == 64


async def test_ignore_eos_only_for_tenants_the_policy_names(
    services: ApiServices, api: httpx.AsyncClient, fake: FakeEngine
) -> None:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_openai_router(
        services, RequestPolicy(ignore_eos_tenants=frozenset({"bench"}))))
    app.include_router(build_admin_router(services))
    async with client_for(app) as c:
        alice = await tenant_key(c, "alice", {})
        bench = await tenant_key(c, "bench", {})
        r = await c.post("/v1/completions", json=completion(ignore_eos=True), headers=alice)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["param"] == "ignore_eos"
        assert fake.requests == []
        r = await c.post("/v1/completions", json=completion(ignore_eos=False), headers=alice)
        assert r.status_code == 200, r.text
        r = await c.post("/v1/completions", json=completion(ignore_eos=True), headers=bench)
        assert r.status_code == 200, r.text
    assert [q.sampling.ignore_eos for q in fake.requests] == [False, True]


# -- item 18: no client-chosen priority -------------------------------------------------


async def test_priority_is_not_a_request_field(api: httpx.AsyncClient, fake: FakeEngine) -> None:
    key = await tenant_key(api, "alice", {})
    r = await api.post("/v1/completions", json=completion(lorafleet={"priority": -100}),
                       headers=key)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "lorafleet.priority"
    assert fake.requests == []


# -- item 6: the prefix-cache salt is the tenant's -------------------------------------


async def test_each_tenant_has_its_own_cache_salt_that_no_body_sets(
    api: httpx.AsyncClient, fake: FakeEngine
) -> None:
    alice = await tenant_key(api, "alice", {})
    bob = await tenant_key(api, "bob", {})
    for key in (alice, alice, bob):
        r = await api.post("/v1/completions", json=completion(), headers=key)
        assert r.status_code == 200, r.text
    salts = [q.cache_salt for q in fake.requests]
    assert salts[0] is not None and salts[0] == salts[1] != salts[2]
    r = await api.post("/v1/completions", json=completion(cache_salt=salts[2]), headers=alice)
    assert r.status_code == 400, r.text
    assert len(fake.requests) == 3


async def test_an_output_limit_past_the_context_is_a_400_even_over_quota(api: httpx.AsyncClient) -> None:
    # The request can never run: a 400 that says why, not a 429 that invites a retry.
    key = await tenant_key(api, "alice", {"tokens_per_minute": 500})
    r = await api.post("/v1/completions", json=completion(max_tokens=10**7), headers=key)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "max_tokens"
