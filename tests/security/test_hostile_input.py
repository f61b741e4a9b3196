"""Hostile input against the real app and a real engine (tiny model), in-process.

Schema-driven fuzzing (schemathesis over ``app.openapi()``) of every route with valid,
wrong, revoked and missing credentials; Hypothesis-generated JSON bodies for the two
generation routes; and hand-written attacks (deep nesting, huge numbers, invalid UTF-8,
unpaired surrogates, oversized and chunked bodies, a lying Content-Type). The property
everywhere: no 5xx, every rejection an OpenAI-shaped error, every stream ends in ``[DONE]``.
Counts are printed (``pytest -s``) so the README can quote them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode

from .conftest import ADAPTERS, ADMIN_KEY, TINY_MODEL_NAME, assert_openai_error, auth, drive

pytestmark = pytest.mark.vllm

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
LIMIT = 1_000_000  # ApiServices.max_body_bytes default


def _ok_chat(**extra: Any) -> dict[str, Any]:
    return {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, **extra}


# name -> raw body; each is sent to both generation routes and to POST /admin/v1/tenants.
RAW_BODIES: dict[str, bytes] = {
    "100k-open-brackets": b"[" * 100_000,
    "deep-array-in-object": b'{"model":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "deep-objects": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "5000-digit-integer": json.dumps(_ok_chat()).encode()[:-1] + b',"seed":' + b"9" * 5000 + b"}",
    "1e400-float": json.dumps(_ok_chat()).encode()[:-1] + b',"temperature":1e400}',
    "NaN": json.dumps(_ok_chat()).encode()[:-1] + b',"temperature":NaN}',
    "invalid-utf8": b'{"model":"\xff\xfe\xfd","messages":[]}',
    "overlong-utf8": b'{"model":"\xc0\xaf"}',
    "surrogate-in-model": b'{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}',
    "surrogate-in-content": json.dumps(_ok_chat()).encode().replace(b'"hi"', b'"a\\udfffb"'),
    "surrogate-in-prompt": b'{"model":"' + TINY_MODEL_NAME.encode() + b'","prompt":"\\ud83d","max_tokens":2}',
    "surrogate-in-stop": json.dumps(_ok_chat()).encode()[:-1] + b',"stop":["\\udc00"]}',
    "surrogate-as-key": b'{"\\ud800":1}',
    "nul-bytes": json.dumps(_ok_chat()).encode().replace(b'"hi"', b'"\\u0000\\u0000"'),
    "empty": b"",
    "whitespace": b" \n\t ",
    "json-null": b"null",
    "json-array": b"[1,2,3]",
    "json-string": b'"hello"',
    "trailing-garbage": json.dumps(_ok_chat()).encode() + b"xyz",
    "bom": b"\xef\xbb\xbf" + json.dumps(_ok_chat()).encode(),
    "duplicate-keys": b'{"model":"x","model":"' + TINY_MODEL_NAME.encode()
    + b'","prompt":"a","max_tokens":1}',
    "many-messages": json.dumps(_ok_chat(messages=[{"role": "user", "content": "a"}] * 5000)).encode(),
    "huge-max-tokens": json.dumps(_ok_chat(max_tokens=2**62)).encode(),
    "token-ids-out-of-vocab": json.dumps({"model": TINY_MODEL_NAME, "prompt": [2**40, -1]}).encode(),
    "65-prompts": json.dumps({"model": TINY_MODEL_NAME, "prompt": ["a"] * 65}).encode(),
}


async def test_hand_written_hostile_bodies(client: httpx.AsyncClient, tenants: dict[str, str]) -> None:
    sent = 0
    for name, raw in RAW_BODIES.items():
        for path, key in ((CHAT, tenants["alice"]), (TEXT, tenants["alice"]),
                          ("/admin/v1/tenants", ADMIN_KEY)):
            r = await client.post(path, content=raw,
                                  headers={**auth(key), "Content-Type": "application/json"})
            sent += 1
            assert r.status_code < 500, (name, path, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert_openai_error(r)
            elif path != "/admin/v1/tenants":
                # Only bodies a JSON parser may fairly accept get through.
                assert name in {"nul-bytes", "duplicate-keys", "bom", "1e400-float"} or (
                    name.startswith("many")), (name, r.text[:200])
    print(f"\nhostile input: {sent} hand-written bodies, 0 server errors")


async def test_oversized_and_chunked_bodies_are_413(client: httpx.AsyncClient, tenants) -> None:
    big = b'{"model":"' + b"a" * (LIMIT + 10) + b'"}'
    r = await client.post(CHAT, content=big, headers=auth(tenants["alice"]))
    assert r.status_code == 413 and assert_openai_error(r)["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit is counted
        yield b'{"model":"'
        for _ in range(20):
            yield b"a" * 100_000
        yield b'"}'

    r = await client.post(TEXT, content=chunks(), headers=auth(tenants["alice"]))
    assert r.status_code == 413, r.text
    # A Content-Length that lies (claims small, sends more) is still cut at the limit.
    r = await client.post(CHAT, content=chunks(),
                          headers={**auth(tenants["alice"]), "Content-Length": "10"})
    assert r.status_code in (400, 413), r.text
    assert_openai_error(r)


async def test_content_type_is_not_trusted(client: httpx.AsyncClient, tenants) -> None:
    key = auth(tenants["alice"])
    # JSON labelled as a form or as text is still parsed as JSON (the OpenAI SDKs send JSON).
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "image/png"):
        r = await client.post(CHAT, content=json.dumps(_ok_chat()),
                              headers={**key, "Content-Type": ctype})
        assert r.status_code == 200, (ctype, r.text)
    # A real form or multipart body labelled as JSON is a 400, not a crash.
    r = await client.post(CHAT, data={"model": TINY_MODEL_NAME}, headers={
        **key, "Content-Type": "application/json"})
    assert r.status_code == 400 and assert_openai_error(r)
    r = await client.post(CHAT, files={"f": b"\x00\x01"}, headers=key)
    assert r.status_code == 400 and assert_openai_error(r)


# -- Hypothesis: generated bodies for the generation routes ---------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_models = st.sampled_from([TINY_MODEL_NAME, *ADAPTERS, "nope", ""]) | st.text(max_size=20) | _json
_text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                       min_size=1, max_size=2)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]),
     "content": st.text(max_size=40) | _text_parts | _json},
    optional={"name": st.text(max_size=70), "extra": _json},
)
_sampling = {
    "max_tokens": st.integers(-3, 3) | _json,
    "temperature": st.floats(-1, 3) | _json,
    "top_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 3),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6) | _json,
    "seed": st.integers(-(2**64), 2**64),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | _json}),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "ignore_eos": st.booleans(),
    "user": st.text(max_size=300),
    "lorafleet": st.fixed_dictionaries({}, optional={
        "consumption_rate": st.floats(-1, 2e4) | _json, "priority": st.integers(-200, 200)}),
    "logprobs": _json,
}
_valid_sampling = {
    "max_tokens": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "n": st.integers(1, 2),
    "stop": st.text(min_size=1, max_size=3),
    "seed": st.integers(0, 2**31),
    "stream": st.booleans(),
    "presence_penalty": st.floats(-2, 2),
    "ignore_eos": st.booleans(),
}
_valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]),
     "content": st.text(max_size=40) | _text_parts})
_valid_model = st.sampled_from([TINY_MODEL_NAME, *ADAPTERS])
VALID_CHAT = st.fixed_dictionaries(
    {"model": _valid_model, "messages": st.lists(_valid_message, min_size=1, max_size=2)},
    optional=_valid_sampling)
VALID_TEXT = st.fixed_dictionaries(
    {"model": _valid_model,
     "prompt": st.text(min_size=1, max_size=40) | st.lists(st.integers(0, 40_000), min_size=1, max_size=8)},
    optional=_valid_sampling)
JUNK_CHAT = st.fixed_dictionaries(
    {"model": _models},
    optional={"messages": st.lists(_message, max_size=3) | _json,
              "max_completion_tokens": st.integers(-1, 3), **_sampling},
)
JUNK_TEXT = st.fixed_dictionaries(
    {"model": _models},
    optional={"prompt": st.text(max_size=40) | st.lists(st.integers(-2, 60_000), max_size=8)
              | st.lists(st.text(max_size=8), max_size=4) | _json,
              "echo": st.booleans(), **_sampling},
)

CHAT_BODIES = VALID_CHAT | JUNK_CHAT
TEXT_BODIES = VALID_TEXT | JUNK_TEXT


def bounded(body: dict[str, Any]) -> dict[str, Any]:
    """Keep generation short: a body that would be accepted asks for at most 3 tokens."""
    if "max_tokens" not in body:
        body = {**body, "max_tokens": 2}
    return body


async def check_generation(client: httpx.AsyncClient, path: str, key: str, body: Any) -> int:
    """Send one body; return its status after checking the answer's shape."""
    raw_body = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity literals too
    async with client.stream("POST", path, content=raw_body,
                             headers={**auth(key), "Content-Type": "application/json"}) as r:
        raw = await r.aread()
    if r.status_code >= 400:
        assert_openai_error(httpx.Response(r.status_code, content=raw))
        return r.status_code
    assert r.status_code == 200
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [e[6:] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
        assert events and events[-1] == "[DONE]", raw[-300:]
        for e in events[:-1]:
            obj = json.loads(e)
            if "error" in obj:
                raise AssertionError(f"stream ended in an error: {obj}")
    else:
        assert json.loads(raw)["choices"]
    return 200


async def test_hypothesis_generation_bodies(client: httpx.AsyncClient, tenants) -> None:
    loop = asyncio.get_running_loop()
    statuses: dict[int, int] = {}

    def checker(path: str):
        async def check(body: dict[str, Any]) -> None:
            status = await check_generation(client, path, tenants["alice"], bounded(body))
            statuses[status] = statuses.get(status, 0) + 1
        return check

    n_chat = await asyncio.to_thread(drive, CHAT_BODIES, checker(CHAT), loop, max_examples=150)
    n_text = await asyncio.to_thread(drive, TEXT_BODIES, checker(TEXT), loop, max_examples=150)
    print(f"\nhypothesis bodies: {n_chat} chat + {n_text} completions, statuses {sorted(statuses.items())}")
    assert not any(s >= 500 for s in statuses)
    assert statuses.get(200, 0) > 0, "no generated body ever reached the engine"


# -- schemathesis: every operation of the OpenAPI document ----------------------------------

CREDENTIALS = ("alice", "bob", "admin", "revoked", "wrong", "none")


async def test_schemathesis_every_operation(client: httpx.AsyncClient, tenants, revoked_key) -> None:
    app = client._transport.app  # type: ignore[attr-defined]
    schema = schemathesis.openapi.from_dict(app.openapi())
    keys = {"alice": tenants["alice"], "bob": tenants["bob"], "admin": ADMIN_KEY,
            "revoked": revoked_key, "wrong": "lf_00000000_" + "x" * 32, "none": None}
    loop = asyncio.get_running_loop()
    statuses: dict[int, int] = {}
    tried: dict[str, int] = {}

    async def send(case: Any, who: str) -> None:
        kw = case.as_transport_kwargs(base_url="http://lorafleet")
        body: Any = kw.get("json")
        if isinstance(body, dict):
            body = bounded(body) if case.path.startswith("/v1/") else body
            if "source" in body:  # never let the fuzzer copy real directories in as adapters
                body = {**body, "source": f"/nonexistent/{body['source']!r}"}
        headers = {k: v for k, v in kw["headers"].items() if k.lower() != "authorization"}
        r = await client.request(kw["method"], kw["url"], params=kw.get("params"), headers={
            **headers, **auth(keys[who])}, json=body if "json" in kw else None,
            content=None if "json" in kw else kw.get("data"))
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code >= 400:
            assert_openai_error(r)
        if who not in ("admin",) and case.path.startswith("/admin/"):
            assert r.status_code == 401, (case.path, who, r.text)
        if who in ("revoked", "wrong", "none") and case.path != "/health":
            assert r.status_code == 401, (case.path, who, r.text)

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in GenerationMode:
            try:
                cases = op.as_strategy(generation_mode=mode)
                cases.example()
            except Exception:  # e.g. no negative case exists for a bare GET
                continue
            strategy = st.tuples(cases, st.sampled_from(CREDENTIALS))
            tried[f"{op.label} {mode.value}"] = await asyncio.to_thread(
                drive, strategy, lambda x: send(*x), loop, max_examples=40)
    total = sum(tried.values())
    print(f"\nschemathesis: {total} requests over {len(tried)} operation/mode pairs, "
          f"statuses {sorted(statuses.items())}")
    assert not any(s >= 500 for s in statuses)
    n_ops = len(list(schema.get_all_operations()))
    assert len({k.rsplit(" ", 1)[0] for k in tried}) == n_ops, sorted(tried)
