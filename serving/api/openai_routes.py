"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Boundary: HTTP in, engine calls out. Order of checks, as OpenAI does it: authenticate,
parse and validate the body, resolve the model inside the caller's tenant, render and
length-check the prompt, admit against the tenant's quota, then generate. Streaming
answers are Server-Sent Events ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from ..engine.errors import AdapterLoadError, EngineError, public_message
from ..engine.protocol import AdapterRef, GenerateRequest, SamplingOptions, TokenDelta
from .arrival import RECEIVED_AT_HEADER, queued_seconds
from .errors import (
    APIError,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
)
from .metering import RequestMeter
from .prompts import RenderedPrompt
from .quotas import Refuse, retry_after_header
from .schemas import ChatCompletionRequest, CompletionRequest, Model, ModelList
from .services import ApiServices
from .tenancy import Resolved

log = logging.getLogger(__name__)
_M = TypeVar("_M", bound=BaseModel)


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace pydantic's ``#/$defs/X`` refs by their targets (our request models are not
    recursive): inside an OpenAPI document those refs would resolve against the document
    root, where there is no ``$defs``, and break every client generator and fuzzer."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(x) for x in node]
        return node

    return dict(walk(schema))


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline_defs(model.model_json_schema())}},
        }
    }


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing oversized bodies before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than {limit} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and integer literals over
        # Python's 4300-digit conversion limit; RecursionError covers deep nesting.
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        ) from e
    if _has_lone_surrogate(data):
        # JSON allows "\ud800"; it is no text the tokenizer or a UTF-8 response can carry.
        raise InvalidRequest("The request body contains an unpaired UTF-16 surrogate escape.")
    return data


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in parsed JSON is not encodable as UTF-8.

    Iterative: the parser already accepted the nesting, a recursive walk might not.
    """
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def parse_body(model: type[_M], data: Any) -> _M:
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        if first.get("type") == "extra_forbidden":
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {param}", param=param
            ) from e
        raise InvalidRequest(f"Invalid value for '{param}': {first.get('msg')}", param=param) from e


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def merge_choices(
    services: ApiServices, requests: list[GenerateRequest]
) -> AsyncIterator[tuple[int, TokenDelta]]:
    """Run the choices' engine streams concurrently; yield (choice index, delta)."""
    if len(requests) == 1:
        async for delta in services.engines.generate(requests[0]):
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, TokenDelta | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, req: GenerateRequest) -> None:
        try:
            async for delta in services.engines.generate(req):
                await queue.put((i, delta))
            await queue.put((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Generation:
    """One admitted request: its engine requests, its meter, its quota slot."""

    def __init__(
        self,
        services: ApiServices,
        tenant_name: str,
        quota: Any,
        resolved: Resolved,
        prompts: list[RenderedPrompt],
        body: ChatCompletionRequest | CompletionRequest,
        arrival: float,
    ) -> None:
        self.services = services
        self.tenant = tenant_name
        self.quota = quota
        self.resolved = resolved
        self.prompts = prompts
        self.body = body
        self.id = uuid.uuid4().hex
        self.created = int(services.wall_clock())
        adapter = resolved.adapter
        label = services.metrics.adapter_label(
            f"{adapter.tenant}/{adapter.name}" if adapter else None
        )
        self.meter = RequestMeter(services.metrics, tenant_name, label, arrival)
        self.meter.prompt_tokens = sum(len(p.token_ids) for p in prompts)
        self.reserved_tokens = sum(p.max_tokens for p in prompts) * body.n
        ref = AdapterRef.of(adapter) if adapter else None
        priority = body.lorafleet.priority if body.lorafleet else 0
        self.engine_requests = []
        for p_index, prompt in enumerate(prompts):
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                self.engine_requests.append(
                    GenerateRequest(
                        request_id=f"{tenant_name}-{self.id}-{p_index * body.n + i}",
                        prompt_token_ids=prompt.token_ids,
                        sampling=SamplingOptions(
                            max_tokens=prompt.max_tokens,
                            temperature=body.temperature,
                            top_p=body.top_p,
                            seed=seed,
                            stop=body.stop_list(),
                            ignore_eos=body.ignore_eos,
                            presence_penalty=body.presence_penalty,
                            frequency_penalty=body.frequency_penalty,
                        ),
                        adapter=ref,
                        priority=priority,
                        streaming=bool(body.stream),
                        consumption_rate=body.lorafleet.consumption_rate if body.lorafleet else None,
                    )
                )
        services.metrics.in_flight.labels(tenant_name).inc()

    def usage(self) -> dict[str, int]:
        completion = self.meter.completion_tokens
        prompt = self.meter.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def deltas(self) -> AsyncIterator[tuple[int, TokenDelta]]:
        clock = self.services.clock
        try:
            async for i, delta in merge_choices(self.services, self.engine_requests):
                self.meter.on_tokens(i, len(delta.token_ids), clock())
                yield i, delta
        except AdapterLoadError as e:
            raise ServiceUnavailable(
                f"The model `{self.resolved.model}` could not be loaded: {public_message(e)}") from e
        except EngineError as e:
            raise ServiceUnavailable("The engine is unavailable; retry shortly.") from e

    def close(self, status: int) -> None:
        if self.meter.finished:
            return
        self.meter.finish(status, self.services.clock())
        self.services.metrics.in_flight.labels(self.tenant).dec()
        refund = max(0, self.reserved_tokens - self.meter.completion_tokens)
        self.services.quotas.release(self.tenant, self.quota, refund)


async def _admit(
    services: ApiServices, request: Request, model_cls: type[ChatCompletionRequest] | type[CompletionRequest]
) -> tuple[Any, Any, Resolved, float]:
    arrival = services.clock()
    queued = 0.0
    if services.trust_arrival_stamp:
        queued = queued_seconds(request.headers.get(RECEIVED_AT_HEADER), services.wall_clock())
    tenant = await services.tenancy.authenticate(request.headers.get("authorization"))
    if services.trust_arrival_stamp:
        services.metrics.queue.labels(tenant.name).observe(queued)
    body = parse_body(model_cls, await read_json(request, services.max_body_bytes))
    resolved = await services.tenancy.resolve(tenant, body.model)
    return tenant, body, resolved, arrival - queued


async def _check_quota(services: ApiServices, tenant: Any, cost: int, label: str) -> None:
    decision = await services.quotas.admit(tenant.name, tenant.quota, cost, services.clock())
    if isinstance(decision, Refuse):
        services.metrics.rate_limited.labels(tenant.name, decision.reason).inc()
        services.metrics.requests.labels(tenant.name, label, "429").inc()
        raise RateLimited(
            decision.message, headers={"Retry-After": retry_after_header(decision.retry_after)}
        )


async def _watch_disconnect(request: Request, task: asyncio.Task[Any]) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.25)


def build_openai_router(services: ApiServices) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        tenant = await services.tenancy.authenticate(request.headers.get("authorization"))
        created = 0
        data = [Model(id=services.served_model_name, created=created, owned_by="lorafleet")]
        for a in await services.tenancy.visible_adapters(tenant):
            data.append(
                Model(
                    id=a.name,
                    created=int(a.created_at),
                    owned_by=a.tenant if a.tenant == tenant.name else "shared",
                    root=services.served_model_name,
                    parent=services.served_model_name,
                )
            )
        return ModelList(data=data)

    @router.get("/models/{model_id:path}", response_model=Model)
    async def get_model(model_id: str, request: Request) -> Model:
        tenant = await services.tenancy.authenticate(request.headers.get("authorization"))
        resolved = await services.tenancy.resolve(tenant, model_id)
        if resolved.adapter is None:
            return Model(id=model_id, created=0, owned_by="lorafleet")
        a = resolved.adapter
        return Model(
            id=a.name,
            created=int(a.created_at),
            owned_by=a.tenant if a.tenant == tenant.name else "shared",
            root=services.served_model_name,
            parent=services.served_model_name,
        )

    async def _run(
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        tenant: Any,
        resolved: Resolved,
        arrival: float,
        prompts: list[RenderedPrompt],
        kind: str,
    ) -> Any:
        label = services.metrics.adapter_label(
            f"{resolved.adapter.tenant}/{resolved.adapter.name}" if resolved.adapter else None
        )
        cost = sum(len(p.token_ids) + p.max_tokens * body.n for p in prompts)
        await _check_quota(services, tenant, cost, label)
        gen = Generation(services, tenant.name, tenant.quota, resolved, prompts, body, arrival)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(gen, kind, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        task = asyncio.create_task(_collect(gen))
        watcher = asyncio.create_task(_watch_disconnect(request, task))
        try:
            texts, reasons = await task
        except asyncio.CancelledError:
            gen.close(499)
            raise
        except APIError as e:
            gen.close(e.status)
            raise
        finally:
            watcher.cancel()
        gen.close(200)
        return JSONResponse(_final_body(gen, kind, texts, reasons))

    @router.post("/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat(request: Request) -> Any:
        tenant, body, resolved, arrival = await _admit(services, request, ChatCompletionRequest)
        prompt = services.renderer.chat(body.messages, body.output_limit())
        return await _run(request, body, tenant, resolved, arrival, [prompt], "chat")

    @router.post("/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Any:
        tenant, body, resolved, arrival = await _admit(services, request, CompletionRequest)
        prompts = [services.renderer.completion(p, body.output_limit()) for p in body.prompts()]
        return await _run(request, body, tenant, resolved, arrival, prompts, "text")

    return router


async def _collect(gen: Generation) -> tuple[dict[int, list[str]], dict[int, str]]:
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    async for i, delta in gen.deltas():
        texts.setdefault(i, []).append(delta.text)
        if delta.finish_reason:
            reasons[i] = delta.finish_reason
    return texts, reasons


def _final_body(
    gen: Generation, kind: str, texts: dict[int, list[str]], reasons: dict[int, str]
) -> dict[str, Any]:
    count = len(gen.engine_requests)
    if kind == "chat":
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(texts.get(i, [])), "refusal": None},
                "logprobs": None,
                "finish_reason": reasons.get(i, "stop"),
            }
            for i in range(count)
        ]
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choices = [
            {
                "index": i,
                "text": "".join(texts.get(i, [])),
                "logprobs": None,
                "finish_reason": reasons.get(i, "stop"),
            }
            for i in range(count)
        ]
        obj, prefix = "text_completion", "cmpl-"
    return {
        "id": prefix + gen.id,
        "object": obj,
        "created": gen.created,
        "model": gen.resolved.model,
        "choices": choices,
        "usage": gen.usage(),
    }


async def _stream(gen: Generation, kind: str, include_usage: bool) -> AsyncIterator[bytes]:
    chat = kind == "chat"
    base = {
        "id": ("chatcmpl-" if chat else "cmpl-") + gen.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": gen.created,
        "model": gen.resolved.model,
    }
    extra = {"usage": None} if include_usage else {}

    def chunk(i: int, text: str | None, reason: str | None, first: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
        return _sse({**base, "choices": [choice], **extra})

    status = 200
    try:
        if chat:
            for i in range(len(gen.engine_requests)):
                yield chunk(i, None, None, first=True)
        async for i, delta in gen.deltas():
            if delta.text:
                yield chunk(i, delta.text, None)  # returns once the server has sent it
                gen.meter.on_written(gen.services.clock())
            if delta.finish_reason:
                yield chunk(i, None, delta.finish_reason)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": gen.usage()})
        yield b"data: [DONE]\n\n"
    except asyncio.CancelledError:
        status = 499  # client went away; the engine requests were aborted by the generators
        raise
    except APIError as e:
        status = e.status
        yield _sse(e.body())
        yield b"data: [DONE]\n\n"
    except Exception:
        status = 500
        log.exception("stream %s failed", gen.id)
        yield _sse(APIError("Internal error while streaming.").body())
        yield b"data: [DONE]\n\n"
    finally:
        gen.close(status)
