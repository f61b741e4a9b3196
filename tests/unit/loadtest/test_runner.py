"""The runner and client against an in-process fake OpenAI server (httpx MockTransport)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from lorafleet.loadtest.client import probe
from lorafleet.loadtest.errors import TargetUnreachableError
from lorafleet.loadtest.metrics import SLO
from lorafleet.loadtest.report import build_results, records_from_results
from lorafleet.loadtest.runner import run_plan
from lorafleet.loadtest.workload import generate_plan, parse_workload


def sse(body: dict) -> bytes:
    n = body["max_tokens"]
    lines = [
        "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]})
        for i in range(n)
    ]
    lines.append("data: " + json.dumps({"choices": [], "usage": {
        "prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}))
    lines.append("data: [DONE]")
    return ("\n\n".join(lines) + "\n\n").encode()


def handler(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body["model"] == "broken":
        return httpx.Response(500, json={"error": {"message": "engine died", "type": "x"}})
    if body["model"] == "gone":
        raise httpx.ConnectError("refused", request=request)
    assert body["stream_options"] == {"include_usage": True}
    assert request.headers["authorization"] == "Bearer key-a"
    return httpx.Response(200, content=sse(body), headers={"content-type": "text/event-stream"})


def workload(**over):
    doc = {
        "seed": 3, "duration_s": 5, "max_requests": 30,
        "tenants": [{"name": "a", "api_key": "key-a"}],
        "models": {"entries": [{"model": "good"}, {"model": "broken"}, {"model": "gone"}]},
        "arrival": {"kind": "closed", "concurrency": 4},
        "prompts": {"words": {"dist": "constant", "value": 3}},
        "max_tokens": {"dist": "constant", "value": 5},
    }
    doc.update(over)
    return parse_workload(doc)


def test_failures_are_recorded_and_the_run_completes():
    wl = workload()
    plan = generate_plan(wl)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await run_plan(plan, wl, "http://fake/v1", {"a": "key-a"}, http=http)

    result = asyncio.run(go())
    assert len(result.records) == 30 and result.not_sent == 0
    by_model = {r.adapter: r for r in result.records}
    good = by_model["good"]
    assert good.ok and good.n_out == 5 and len(good.token_times) == 5 and good.prompt_tokens == 7
    assert by_model["broken"].status == 500 and by_model["broken"].error == "engine died"
    assert by_model["gone"].status is None and by_model["gone"].error.startswith("ConnectError")
    doc = build_results(result.records, duration_s=result.duration_s, slo=SLO(), meta={})
    assert doc["summary"]["errors"] == {
        "500": sum(r.adapter == "broken" for r in result.records),
        "ConnectError": sum(r.adapter == "gone" for r in result.records),
    }
    back = records_from_results(json.loads(json.dumps(doc)))
    assert [(r.index, r.status, r.error, r.n_out) for r in back] == [
        (r.index, r.status, r.error, r.n_out) for r in result.records
    ]


def test_a_hung_request_times_out_and_the_run_stops_by_itself():
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200)

    wl = workload(max_requests=2, request_timeout_s=0.3,
                  models={"entries": [{"model": "good"}]})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as http:
            return await run_plan(generate_plan(wl), wl, "http://fake/v1", {}, http=http)

    result = asyncio.run(asyncio.wait_for(go(), 10))
    assert [r.error.split(":")[0] for r in result.records] == ["timeout", "timeout"]


def test_probe_unreachable_target_gives_a_clear_error():
    async def go():
        async with httpx.AsyncClient() as http:
            await probe(http, "http://127.0.0.1:9/v1", None)

    with pytest.raises(TargetUnreachableError, match="unreachable"):
        asyncio.run(go())


def test_probe_rejects_a_non_200_answer():
    transport = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": "no key"}))

    async def go():
        async with httpx.AsyncClient(transport=transport) as http:
            await probe(http, "http://fake/v1", None)

    with pytest.raises(TargetUnreachableError, match="HTTP 401: no key"):
        asyncio.run(go())
