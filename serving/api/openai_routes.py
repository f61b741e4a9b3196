"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Boundary: HTTP in, engine calls out. Order of checks: authenticate, parse and validate the
body, resolve the model inside the caller's tenant, apply the request policy
(``request_policy``), then the checks that need no tokenizer (a prompt whose token floor
fills the context; a refusal the tenant's last rate refusal makes certain), then render and
length-check the prompt off the event loop, admit against the tenant's quota (one
concurrency slot per sequence), then generate. Streaming answers are Server-Sent Events
ending with ``data: [DONE]``.

A quota slot, once admitted, is released exactly once whatever happens next: the request's
``Generation`` owns it, the non-streaming path closes it in ``finally``, and a streaming
response closes it when the ASGI call ends, whether or not its body generator ever started
(a client gone before the first byte never starts it, and a never-started async generator
runs no ``finally``).
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
from starlette.types import Receive, Scope, Send

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
from .quotas import RefusalMemo, Refuse, retry_after_header
from .request_policy import RequestPolicy, check_ignore_eos, tenant_cache_salt
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
        if param is None:  # a rule over several fields
            raise InvalidRequest(f"Invalid request: {first.get('msg')}") from e
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
    """One admitted request: its engine requests, its meter, its quota slots.

    Built only after the quota book admitted ``sequences`` slots and charged ``charged``
    tokens; ``close`` gives the slots back and refunds what was not used, exactly once.
    """

    def __init__(
        self,
        services: ApiServices,
        tenant_name: str,
        quota: Any,
        resolved: Resolved,
        prompts: list[RenderedPrompt],
        body: ChatCompletionRequest | CompletionRequest,
        arrival: float,
        charged: int,
    ) -> None:
        self.services = services
        self.tenant = tenant_name
        self.quota = quota
        self.resolved = resolved
        self.prompts = prompts
        self.body = body
        self.sequences = len(prompts) * body.n
        self.id = uuid.uuid4().hex
        self.created = int(services.wall_clock())
        adapter = resolved.adapter
        label = services.metrics.adapter_label(
            f"{adapter.tenant}/{adapter.name}" if adapter else None
        )
        self.meter = RequestMeter(services.metrics, tenant_name, label, arrival)
        self.meter.prompt_tokens = sum(len(p.token_ids) for p in prompts)
        # What may come back at the end: the charge less the prompts (spent at admission).
        self.reserved_tokens = max(0, charged - self.meter.prompt_tokens)
        ref = AdapterRef.of(adapter) if adapter else None
        salt = tenant_cache_salt(tenant_name)
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
                        cache_salt=salt,
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
        self.services.quotas.release(self.tenant, self.quota, refund, self.sequences)


class GenerationStream(StreamingResponse):
    """An SSE response that closes its ``Generation`` when the ASGI call ends, however it
    ends: a client that disconnects before the body starts cancels the call with the body
    generator never entered, so the generator's own ``finally`` cannot be relied on."""

    def __init__(self, gen: Generation, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close(499)  # a no-op when the stream already closed it with its status


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


def _refused(services: ApiServices, tenant: Any, label: str, decision: Refuse) -> RateLimited:
    services.metrics.rate_limited.labels(tenant.name, decision.reason).inc()
    services.metrics.requests.labels(tenant.name, label, "429").inc()
    return RateLimited(
        decision.message, headers={"Retry-After": retry_after_header(decision.retry_after)}
    )


async def _watch_disconnect(request: Request, task: asyncio.Task[Any]) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.25)


class _TokenizeGate:
    """At most ``per_tenant`` prompts of one tenant are tokenized at once in this process:
    tokenizing runs in worker threads, and one tenant's flood must not occupy all of them."""

    def __init__(self, per_tenant: int = 2) -> None:
        self.per_tenant = per_tenant
        self._gates: dict[str, tuple[asyncio.Semaphore, int]] = {}

    async def run(self, tenant: str, fn: Any, *args: Any) -> Any:
        sem, users = self._gates.get(tenant, (asyncio.Semaphore(self.per_tenant), 0))
        self._gates[tenant] = (sem, users + 1)
        try:
            async with sem:
                return await asyncio.to_thread(fn, *args)
        finally:
            sem, users = self._gates[tenant]
            if users == 1:
                del self._gates[tenant]
            else:
                self._gates[tenant] = (sem, users - 1)


def build_openai_router(services: ApiServices, policy: RequestPolicy | None = None) -> APIRouter:
    router = APIRouter(prefix="/v1")
    policy = policy or RequestPolicy()
    memo = RefusalMemo()
    gate = _TokenizeGate()
    max_len = services.renderer.max_model_len

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

    def cost_floor(floors: list[int], body: ChatCompletionRequest | CompletionRequest) -> int:
        """A lower bound of the tokens the request will be charged, before tokenizing."""
        out = body.output_limit()
        if out is None:  # prompt + (context - prompt) * n, least when the prompt fills it
            return sum(max_len - 1 + body.n for _ in floors)
        return sum(f + out * body.n for f in floors)

    async def _run(
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        tenant: Any,
        resolved: Resolved,
        arrival: float,
        floors: list[int],
        render: Any,
        kind: str,
    ) -> Any:
        label = services.metrics.adapter_label(
            f"{resolved.adapter.tenant}/{resolved.adapter.name}" if resolved.adapter else None
        )
        check_ignore_eos(policy, tenant.name, body.ignore_eos)
        param = "messages" if kind == "chat" else "prompt"
        for f in floors:
            services.renderer.check_floor(f, param)
        early = memo.early(tenant.name, tenant.quota, cost_floor(floors, body), services.clock())
        if early is not None:
            raise _refused(services, tenant, label, early)
        prompts: list[RenderedPrompt] = await gate.run(tenant.name, render)
        cost = sum(len(p.token_ids) + p.max_tokens * body.n for p in prompts)
        sequences = len(prompts) * body.n
        now = services.clock()
        decision = await services.quotas.admit(tenant.name, tenant.quota, cost, now, sequences)
        memo.note(tenant.name, tenant.quota, cost, decision, now)
        if isinstance(decision, Refuse):
            raise _refused(services, tenant, label, decision)
        try:
            gen = Generation(services, tenant.name, tenant.quota, resolved, prompts, body, arrival,
                             cost)
        except BaseException:
            services.quotas.release(tenant.name, tenant.quota, cost, sequences)
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return GenerationStream(gen, _stream(gen, kind, include_usage))
        task = asyncio.create_task(_collect(gen))
        watcher = asyncio.create_task(_watch_disconnect(request, task))
        status = 499
        try:
            texts, reasons = await task
            status = 200
        except APIError as e:
            status = e.status
            raise
        finally:
            watcher.cancel()
            gen.close(status)
        return JSONResponse(_final_body(gen, kind, texts, reasons))

    @router.post("/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat(request: Request) -> Any:
        tenant, body, resolved, arrival = await _admit(services, request, ChatCompletionRequest)
        text_bytes = sum(len(m.text().encode()) for m in body.messages)
        floors = [services.renderer.token_floor(text_bytes)]

        def render() -> list[RenderedPrompt]:
            return [services.renderer.chat(body.messages, body.output_limit())]

        return await _run(request, body, tenant, resolved, arrival, floors, render, "chat")

    @router.post("/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Any:
        tenant, body, resolved, arrival = await _admit(services, request, CompletionRequest)
        raw = body.prompts()
        floors = [len(p) if isinstance(p, list) else services.renderer.token_floor(len(p.encode()))
                  for p in raw]

        def render() -> list[RenderedPrompt]:
            return [services.renderer.completion(p, body.output_limit()) for p in raw]

        return await _run(request, body, tenant, resolved, arrival, floors, render, "text")

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
