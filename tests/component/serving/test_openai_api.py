"""The OpenAI routes over a real vLLM engine (tiny model): wire format, isolation, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from .conftest import ADAPTERS, TINY_MODEL_NAME

pytestmark = pytest.mark.vllm


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def chat(client, key, model, content="Tell me a story", **kw):
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 12, "temperature": 0, **kw}
    return await client.post("/v1/chat/completions", json=body, headers=auth(key))


async def test_models_lists_base_and_exactly_own_adapters(client, tenants):
    r = await client.get("/v1/models", headers=auth(tenants["alice"]))
    assert r.status_code == 200
    ids = [m["id"] for m in r.json()["data"]]
    assert ids == [TINY_MODEL_NAME, *sorted(ADAPTERS)]
    r = await client.get("/v1/models", headers=auth(tenants["bob"]))
    assert [m["id"] for m in r.json()["data"]] == [TINY_MODEL_NAME]


async def test_chat_non_streaming_shape_and_usage(client, tenants):
    r = await chat(client, tenants["alice"], "ad-r4-qv")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "ad-r4-qv"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 12


async def test_chat_streaming_sse_with_usage(client, tenants):
    body = {"model": "ad-r8-all", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = await client.post("/v1/chat/completions", json=body, headers=auth(tenants["alice"]))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    r2 = await chat(client, tenants["alice"], "ad-r8-all", content="hi", max_tokens=10)
    assert text == r2.json()["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]]
    assert finish[-1] == "length"


async def test_completions_n_and_multiple_prompts(client, tenants):
    r = await client.post(
        "/v1/completions",
        json={"model": TINY_MODEL_NAME, "prompt": ["one two", "three"], "n": 2, "max_tokens": 5,
              "temperature": 0},
        headers=auth(tenants["bob"]),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    # greedy: the two choices of one prompt agree
    assert body["choices"][0]["text"] == body["choices"][1]["text"]
    assert body["usage"]["completion_tokens"] == 20


async def test_heterogeneous_batch_matches_solo_outputs(client, tenants):
    """Base model and three adapters of different ranks/targets in one batch: each request
    returns exactly what it returns alone (greedy)."""
    key = tenants["alice"]
    models = [TINY_MODEL_NAME, *ADAPTERS]
    prompts = ["The weather today", "Once upon a time", "My favourite number is"]
    cases = [(m, p) for m in models for p in prompts]

    async def one(m, p):
        r = await client.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": 16,
                                                       "temperature": 0}, headers=auth(key))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    solo = [await one(m, p) for m, p in cases]
    together = await asyncio.gather(*(one(m, p) for m, p in cases))
    assert together == solo
    # and the adapters really change the output
    by_model = {m: [solo[i] for i, (mm, _) in enumerate(cases) if mm == m] for m in models}
    for name in ADAPTERS:
        assert by_model[name] != by_model[TINY_MODEL_NAME], name


async def test_tenant_isolation_foreign_adapter_is_indistinguishable_from_missing(client, tenants):
    foreign = await chat(client, tenants["bob"], "ad-r4-qv")
    missing = await chat(client, tenants["bob"], "no-such-adapter")
    assert foreign.status_code == missing.status_code == 404
    fj, mj = foreign.json()["error"], missing.json()["error"]
    assert fj["code"] == mj["code"] == "model_not_found"
    assert fj["message"].replace("ad-r4-qv", "X") == mj["message"].replace("no-such-adapter", "X")
    r = await client.get("/v1/models/ad-r4-qv", headers=auth(tenants["bob"]))
    assert r.status_code == 404
    r = await client.get("/v1/models/ad-r4-qv", headers=auth(tenants["alice"]))
    assert r.status_code == 200 and r.json()["owned_by"] == "alice"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": TINY_MODEL_NAME, "messages": "nope"}, 400, "messages"),
        ({"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
         400, "max_tokens"),
        ({"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
          "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
          "temperature": "hot"}, 400, "temperature"),
        ({"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "bogus": 1},
         400, "bogus"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "word " * 2000}]},
         400, "messages"),
    ],
)
async def test_bad_requests_get_openai_errors(client, tenants, body, status, param):
    r = await client.post("/v1/chat/completions", json=body, headers=auth(tenants["alice"]))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


async def test_malformed_json_and_auth_errors(client, tenants):
    r = await client.post("/v1/chat/completions", content=b"{not json",
                          headers={**auth(tenants["alice"]), "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = await client.post("/v1/chat/completions", json={"model": TINY_MODEL_NAME, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await chat(client, "lf_00000000_wrong", TINY_MODEL_NAME)
    assert r.status_code == 401
    r = await client.get("/admin/v1/tenants", headers=auth(tenants["alice"]))
    assert r.status_code == 401
    r = await client.post("/v1/chat/completions", content=b"x" * 2_000_000,
                          headers={**auth(tenants["alice"]), "content-type": "application/json"})
    assert r.status_code == 413
    # and the server still serves everyone
    ok = await chat(client, tenants["bob"], TINY_MODEL_NAME)
    assert ok.status_code == 200


async def test_revoked_key_stops_working(client, tenants):
    key = tenants["bob"]
    assert (await chat(client, key, TINY_MODEL_NAME)).status_code == 200
    key_id = key.split("_")[1]
    r = await client.delete(f"/admin/v1/tenants/bob/keys/{key_id}",
                            headers={"Authorization": "Bearer test-admin-key"})
    assert r.status_code == 204
    assert (await chat(client, key, TINY_MODEL_NAME)).status_code == 401


async def test_quota_429_with_retry_after(client, tenants):
    admin = {"Authorization": "Bearer test-admin-key"}
    r = await client.post("/admin/v1/tenants", json={"name": "bob", "quota": {"requests_per_minute": 2}},
                          headers=admin)
    assert r.status_code == 201
    statuses = [(await chat(client, tenants["bob"], TINY_MODEL_NAME, max_tokens=2)) for _ in range(3)]
    assert [s.status_code for s in statuses] == [200, 200, 429]
    assert int(statuses[-1].headers["retry-after"]) >= 1
    assert statuses[-1].json()["error"]["type"] == "rate_limit_error"


async def test_bad_adapters_refused_with_reason(client, tenants, tmp_path, adapter_dirs):
    import shutil

    admin = {"Authorization": "Bearer test-admin-key"}
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dirs["ad-r4-qv"], pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    wrong_base = tmp_path / "wrong-base"
    shutil.copytree(adapter_dirs["ad-r4-qv"], wrong_base)
    cfg = json.loads((wrong_base / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3-8B"
    (wrong_base / "adapter_config.json").write_text(json.dumps(cfg))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter_dirs["ad-r4-qv"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    for name, path, code in [("p", pickled, "pickle_forbidden"), ("w", wrong_base, "wrong_base_model"),
                             ("c", corrupt, None)]:
        r = await client.post("/admin/v1/tenants/bob/adapters", json={"name": name, "source": str(path)},
                              headers=admin)
        assert r.status_code == 422, r.text
        if code:
            assert r.json()["error"]["code"] == code
    models = await client.get("/v1/models", headers=auth(tenants["bob"]))
    assert [m["id"] for m in models.json()["data"]] == [TINY_MODEL_NAME]
    assert (await chat(client, tenants["alice"], "ad-r4-qv")).status_code == 200


async def test_metrics_per_tenant_and_adapter(client, tenants):
    await chat(client, tenants["alice"], TINY_MODEL_NAME)
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers=auth(tenants["bob"]))).status_code == 401
    r = await client.get("/metrics", headers=auth("test-admin-key"))
    text = r.text
    assert 'lorafleet_time_to_first_token_seconds_count{adapter="base",tenant="alice"} 1.0' in text
    assert 'lorafleet_requests_total{adapter="base",status="200",tenant="alice"} 1.0' in text
    assert "vllm:" in text


async def test_client_disconnect_aborts_engine_request(client, tenants, engine):
    body = {"model": TINY_MODEL_NAME, "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers=auth(tenants["alice"])) as r:
        async for _ in r.aiter_lines():
            break
    for _ in range(40):
        if (await engine.stats()).in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert (await engine.stats()).in_flight == 0


_ = httpx


async def test_new_revision_replaces_the_old_one_on_the_replicas(client, tenants, adapter_dirs, engine):
    admin = {"Authorization": "Bearer test-admin-key"}
    old = (await client.get("/admin/v1/tenants/alice/adapters/ad-r4-qv", headers=admin)).json()
    assert old["replicas"] == ["replica-0"]
    r = await client.post("/admin/v1/tenants/alice/adapters",
                          json={"name": "ad-r4-qv", "source": str(adapter_dirs["ad-r16-mlp"])},
                          headers=admin)
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["id"] != old["id"] and new["rank"] == 16 and new["replicas"] == ["replica-0"]
    resident = (await engine.stats()).resident_adapters
    assert new["id"] in resident and old["id"] not in resident
    assert (await chat(client, tenants["alice"], "ad-r4-qv")).status_code == 200
