"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Boundary: HTTP in, engine calls out; the tenancy, quota and metering edge. Bodies are parsed
with vLLM's own request models (``body.py``), sequences run and are metered by
``generation.py``, and ``responses.py`` formats what comes back. Order of checks:
authenticate, parse and validate the body, resolve the model inside the caller's tenant,
apply the request policy (``request_policy``), then the checks that need no tokenizer (a
prompt whose token floor fills the context; a refusal the tenant's last rate refusal makes
certain), then render and length-check the prompt off the event loop, build vLLM's sampling
parameters, admit against the tenant's quota (one concurrency slot per sequence), then
generate. Streaming answers are Server-Sent Events ending with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from vllm.exceptions import VLLMClientError
from vllm.tool_parsers.abstract_tool_parser import ToolParserManager

from .arrival import RECEIVED_AT_HEADER, queued_seconds
from .body import ChatBody, CompletionBody, parse_request, read_json
from .errors import APIError, InvalidRequest, RateLimited
from .generation import Generation, GenerationStream, collect, stream_events
from .prompts import RenderedPrompt
from .quotas import RefusalMemo, Refuse, retry_after_header
from .request_policy import RequestPolicy, check_ignore_eos
from .schemas import Model, ModelList
from .services import ApiServices
from .tenancy import Resolved
from .tools import constrain

__all__ = ["build_openai_router", "check_tool_parser"]


def check_tool_parser(name: str | None) -> None:
    """Refuse, at start, a tool parser name that vLLM's ToolParserManager does not know."""
    if name is None:
        return
    try:
        ToolParserManager.get_tool_parser(name)
    except KeyError:
        known = ", ".join(sorted(ToolParserManager.list_registered()))
        raise ValueError(f"unknown tool_call_parser {name!r}; vLLM knows: {known}") from None

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


async def _admit(
    services: ApiServices, request: Request, model_cls: type[ChatBody] | type[CompletionBody]
) -> tuple[Any, Any, Resolved, float]:
    arrival = services.clock()
    queued = 0.0
    if services.trust_arrival_stamp:
        queued = queued_seconds(request.headers.get(RECEIVED_AT_HEADER), services.wall_clock())
    tenant = await services.tenancy.authenticate(request.headers.get("authorization"))
    if services.trust_arrival_stamp:
        services.metrics.queue.labels(tenant.name).observe(queued)
    body = parse_request(model_cls, await read_json(request, services.max_body_bytes))
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


def _sampling_params(body: ChatBody | CompletionBody, prompts: list[RenderedPrompt]) -> list[Any]:
    """vLLM's ``SamplingParams`` per prompt, from vLLM's own request model, for one sequence:
    the ``n`` choices run as separate sequences (their own seeds), so ``n`` > 1 is allowed at
    temperature 0 as OpenAI allows it (vLLM refuses greedy ``n`` > 1 within one request)."""
    one = body.model_copy(update={"n": 1})
    try:
        return [one.to_sampling_params(p.max_tokens, {}) for p in prompts]
    except (VLLMClientError, ValueError, TypeError) as e:
        raise InvalidRequest(str(e.args[0]) if e.args else str(e),
                             param=getattr(e, "parameter", None)) from e


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
    policy = policy or services.request_policy
    check_tool_parser(policy.tool_call_parser)
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

    def cost_floor(floors: list[int], body: ChatBody | CompletionBody) -> int:
        """A lower bound of the tokens the request will be charged, before tokenizing."""
        out = body.output_limit()
        n = body.n or 1
        if out is None:  # prompt + (context - prompt) * n, least when the prompt fills it
            return sum(max_len - 1 + n for _ in floors)
        return sum(f + out * n for f in floors)

    async def _run(
        request: Request,
        body: ChatBody | CompletionBody,
        tenant: Any,
        resolved: Resolved,
        arrival: float,
        floors: list[int],
        render: Callable[[], list[RenderedPrompt]],
    ) -> Any:
        label = services.metrics.adapter_label(
            f"{resolved.adapter.tenant}/{resolved.adapter.name}" if resolved.adapter else None
        )
        check_ignore_eos(policy, tenant.name, body.ignore_eos)
        param = "messages" if isinstance(body, ChatBody) else "prompt"
        for f in floors:
            services.renderer.check_floor(f, param)
            services.renderer.check_output_limit(f, body.output_limit())
        early = memo.early(tenant.name, tenant.quota, cost_floor(floors, body), services.clock())
        if early is not None:
            raise _refused(services, tenant, label, early)
        prompts: list[RenderedPrompt] = await gate.run(tenant.name, render)
        params = _sampling_params(body, prompts)
        n = body.n or 1
        cost = sum(len(p.token_ids) + p.max_tokens * n for p in prompts)
        sequences = len(prompts) * n
        now = services.clock()
        decision = await services.quotas.admit(tenant.name, tenant.quota, cost, now, sequences)
        memo.note(tenant.name, tenant.quota, cost, decision, now)
        if isinstance(decision, Refuse):
            raise _refused(services, tenant, label, decision)
        try:
            gen = Generation(services, tenant.name, tenant.quota, resolved, prompts, body, arrival,
                             cost, params, policy.tool_call_parser)
        except BaseException:
            services.quotas.release(tenant.name, tenant.quota, cost, sequences)
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return GenerationStream(gen, stream_events(gen, include_usage))
        task = asyncio.create_task(collect(gen))
        watcher = asyncio.create_task(_watch_disconnect(request, task))
        status = 499
        try:
            result = await task
            status = 200
            await gen.finish(status)  # slots free before the answer is sent (generation.py)
        except APIError as e:
            status = e.status
            await gen.finish(status)
            raise
        finally:
            watcher.cancel()
            gen.close(status)
        return JSONResponse(result)

    @router.post("/chat/completions", openapi_extra=_body_schema(ChatBody))
    async def chat(request: Request) -> Any:
        tenant, body, resolved, arrival = await _admit(services, request, ChatBody)
        constrain(body, policy.tool_call_parser)
        text_bytes = sum(len(_text_of(m).encode()) for m in body.messages)
        floors = [services.renderer.token_floor(text_bytes)]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None

        def render() -> list[RenderedPrompt]:
            return [services.renderer.chat(
                body.messages, body.output_limit(), tools=tools, documents=body.documents,
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message)]

        return await _run(request, body, tenant, resolved, arrival, floors, render)

    @router.post("/completions", openapi_extra=_body_schema(CompletionBody))
    async def completions(request: Request) -> Any:
        tenant, body, resolved, arrival = await _admit(services, request, CompletionBody)
        if body.echo and body.logprobs is not None:
            raise InvalidRequest("'echo' with 'logprobs' is not supported (prompt logprobs).",
                                 param="echo")
        raw = body.prompts()
        floors = [len(p) if isinstance(p, list) else services.renderer.token_floor(len(p.encode()))
                  for p in raw]

        def render() -> list[RenderedPrompt]:
            return [services.renderer.completion(p, body.output_limit(), body.add_special_tokens)
                    for p in raw]

        return await _run(request, body, tenant, resolved, arrival, floors, render)

    return router


def _text_of(message: Any) -> str:
    from .prompts import message_text

    return message_text(message.get("content")) if isinstance(message, dict) else ""
