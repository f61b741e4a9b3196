"""The OpenAI wire format of answers (``api.responses``, ``api.generation``), on the fake engine.

Streams are SSE: ``data: <json>\\n\\n`` events ending with ``data: [DONE]``; chat chunks are
``chat.completion.chunk`` objects with one id and ``created`` throughout, the role in the first
delta, the finish reason in the last choice chunk, and usage in a final chunk with no choices
only when ``stream_options.include_usage`` asks. A non-streamed answer carries the same text
and the same usage. The fake engine's tokens are known (``fakeengine.fake_token``): seconds,
no vLLM engine.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from tinyengine import ADMIN

from lorafleet.serving.demo.basemodel import TINY_MODEL_NAME

pytestmark = pytest.mark.middle


@pytest.fixture
async def key(api: httpx.AsyncClient) -> dict[str, str]:
    r = await api.post("/admin/v1/tenants", json={"name": "alice"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    r = await api.post("/admin/v1/tenants/alice/keys", json={}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def sse_events(body: str) -> list[str]:
    """The data of each SSE event, checking the framing on the way."""
    assert body.endswith("\n\n"), body[-40:]
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


async def chat(api: httpx.AsyncClient, key: dict[str, str], **extra: Any) -> httpx.Response:
    return await api.post("/v1/chat/completions", headers=key, json={
        "model": TINY_MODEL_NAME, "max_tokens": 5,
        "messages": [{"role": "user", "content": "hello"}], **extra})


async def test_a_chat_stream_is_sse_chunks_then_done_with_usage_last(
    api: httpx.AsyncClient, key: dict[str, str],
) -> None:
    r = await chat(api, key, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {TINY_MODEL_NAME}

    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) <= {None}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)

    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk is not with_choices[-1]
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert all(c.get("usage") is None for c in with_choices)

    whole = (await chat(api, key)).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {**whole["choices"][0]["message"],
                                              "role": "assistant", "content": text}
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == usage_chunk["usage"]


async def test_without_include_usage_no_chunk_carries_usage(
    api: httpx.AsyncClient, key: dict[str, str],
) -> None:
    r = await chat(api, key, stream=True)
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks and all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)


async def test_a_completion_stream_has_text_chunks_and_the_same_text_as_the_whole(
    api: httpx.AsyncClient, key: dict[str, str],
) -> None:
    body = {"model": TINY_MODEL_NAME, "prompt": "hello there", "max_tokens": 4}
    r = await api.post("/v1/completions", headers=key, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    whole = (await api.post("/v1/completions", headers=key, json=body)).json()
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["text"] == streamed
    assert whole["usage"]["completion_tokens"] == 4


async def test_an_error_after_admission_is_openai_shaped_not_an_sse_stream(
    api: httpx.AsyncClient, key: dict[str, str],
) -> None:
    r = await chat(api, key, stream=True, model="no-such-model")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
