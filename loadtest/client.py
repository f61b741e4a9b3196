"""Async OpenAI-compatible client that records when each streamed token arrives.

Boundary: the only network code of the runner. :func:`send` never raises for a failed request:
it returns a :class:`~lorafleet.loadtest.metrics.RequestRecord` with ``status``/``error`` set.
The simulated reader is not a slow socket reader (that would only exercise TCP buffers): the
client records arrival times at full speed and assigns the request its reader rate; the reader
is replayed afterwards by :func:`lorafleet.loadtest.metrics.simulate_reader`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from lorafleet.loadtest.errors import TargetUnreachableError
from lorafleet.loadtest.metrics import RequestRecord
from lorafleet.loadtest.workload import PlannedRequest

MAX_ERROR_BODY = 2000
MAX_CHUNKS = 100_000  # bound on SSE events read from one response


def build_body(
    req: PlannedRequest, endpoint: str, *, temperature: float, ignore_eos: bool,
    declare_reader_rate: bool = False,
) -> dict[str, Any]:
    """The JSON body of an OpenAI chat or completions request (plus, when asked, LoRAFleet's
    ``consumption_rate`` extension carrying the simulated reader's speed)."""
    body: dict[str, Any] = {
        "model": req.model,
        "max_tokens": req.max_tokens,
        "temperature": temperature,
        "stream": req.stream,
    }
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if declare_reader_rate and req.stream:
        body["lorafleet"] = {"consumption_rate": round(req.reader_rate, 3)}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:MAX_ERROR_BODY]
        if isinstance(err, str):
            return err[:MAX_ERROR_BODY]
    except (ValueError, AttributeError):
        pass
    return text[:MAX_ERROR_BODY]


def _delta_text(choice: dict[str, Any]) -> str | None:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta.get("content") or delta.get("reasoning_content")
    return choice.get("text")


async def send(
    http: httpx.AsyncClient,
    target: str,
    req: PlannedRequest,
    *,
    api_key: str | None,
    endpoint: str = "chat",
    temperature: float = 0.0,
    ignore_eos: bool = False,
    declare_reader_rate: bool = False,
    run_start: float,
    timeout_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> RequestRecord:
    """Send one request; record token arrivals, usage, status and errors."""
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = build_body(req, endpoint, temperature=temperature, ignore_eos=ignore_eos,
                      declare_reader_rate=declare_reader_rate)
    start = clock()
    state: dict[str, Any] = {"times": [], "chunks": 0, "usage": None, "status": None}

    async def _do() -> str | None:
        async with http.stream(
            "POST", target.rstrip("/") + path, json=body, headers=headers
        ) as resp:
            state["status"] = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return _error_message(text)
            if not req.stream:
                data = json.loads(await resp.aread())
                state["usage"] = data.get("usage")
                choices = data.get("choices") or []
                if choices:
                    msg = choices[0].get("message") or {}
                    text = msg.get("content") if isinstance(msg, dict) else None
                    text = text or choices[0].get("text") or ""
                    state["chunks"] = len(text.split())
                return None
            n_events = 0
            async for line in resp.aiter_lines():
                n_events += 1
                if n_events > MAX_CHUNKS:
                    return f"stream: more than {MAX_CHUNKS} events"
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    return "stream: " + _error_message(payload)
                if event.get("usage"):
                    state["usage"] = event["usage"]
                for choice in event.get("choices") or []:
                    if _delta_text(choice):
                        state["times"].append(clock() - start)
                        state["chunks"] += 1
            return None

    error: str | None
    try:
        error = await asyncio.wait_for(_do(), timeout=timeout_s)
    except TimeoutError:
        error = f"timeout: no complete answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError, TypeError) as exc:  # malformed JSON from the server
        error = f"protocol: {exc}"
    end = clock()
    usage = state["usage"] or {}
    n_out = usage.get("completion_tokens")
    if not isinstance(n_out, int):
        n_out = state["chunks"]
    return record_of(
        req,
        start_s=start - run_start,
        token_times=tuple(state["times"]),
        e2e_s=end - start,
        n_out=n_out,
        prompt_tokens=usage.get("prompt_tokens"),
        status=state["status"],
        error=error,
    )


def record_of(req: PlannedRequest, *, start_s: float, **observed: Any) -> RequestRecord:
    """The record of `req`: what the plan said of it, and what the client `observed`."""
    return RequestRecord(index=req.index, tenant=req.tenant, adapter=req.model, stream=req.stream,
                         scheduled_s=req.at_s, start_s=start_s, reader_rate=req.reader_rate,
                         max_tokens=req.max_tokens, **observed)


async def probe(http: httpx.AsyncClient, target: str, api_key: str | None) -> list[str]:
    """``GET {target}/models``: the served model ids, or a clear :class:`TargetUnreachableError`."""
    url = target.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = await http.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        raise TargetUnreachableError(
            f"target {target} is unreachable (GET {url}: {type(exc).__name__}: {exc}); "
            "is the server running, and does the URL end with /v1?"
        ) from None
    if resp.status_code != 200:
        raise TargetUnreachableError(
            f"target {target} answered GET {url} with HTTP {resp.status_code}: "
            f"{_error_message(resp.text)}"
        )
    try:
        return [m["id"] for m in resp.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TargetUnreachableError(
            f"target {target}: GET {url} did not answer an OpenAI model list"
        ) from None
