"""The life of one admitted request: its engine sequences, its meter, its quota slots.

Boundary: from an admitted request to bytes on the wire. ``Generation`` owns the quota
slots the book granted (one per sequence) and releases them exactly once whatever happens:
the non-streaming path closes it in ``finally``, and a streaming response
(``GenerationStream``) closes it when the ASGI call ends, whether or not its body generator
ever started (a client gone before the first byte never starts it, and a never-started async
generator runs no ``finally``). Formatting is ``responses.py``'s.

A request that ends normally (or with an error event) releases its slots, and waits until the
book has the release, *before* its last bytes (a stream's ``data: [DONE]``, a whole answer's
body): a client that keeps N requests in flight under a limit of N is then never refused,
whichever ingress replica its next request reaches. A cluster-wide book (Redis) lands a
release after a round trip, and only the releasing process waits for its own releases at
admission; the wait costs that round trip once per request, after its last token.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine.errors import AdapterLoadError, EngineError, RequestRefused, public_message
from ..engine.protocol import AdapterRef, GenerateRequest, SamplingOptions, TokenDelta
from .body import ChatBody, CompletionBody
from .errors import APIError, InvalidRequest, ServiceUnavailable
from .metering import RequestMeter
from .prompts import RenderedPrompt
from .request_policy import tenant_cache_salt
from .responses import Choice, LogprobRequest, chat_logprobs, completion_logprobs, sse
from .services import ApiServices
from .tenancy import Resolved
from .tools import ToolCalls

__all__ = ["Generation", "GenerationStream", "collect", "merge_choices", "stream_events"]

log = logging.getLogger(__name__)


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
        body: ChatBody | CompletionBody,
        arrival: float,
        charged: int,
        params: list[Any],
        tool_parser: str | None = None,
    ) -> None:
        self.services = services
        self.tenant = tenant_name
        self.quota = quota
        self.resolved = resolved
        self.prompts = prompts
        self.body = body
        self.chat = isinstance(body, ChatBody)
        n = body.n or 1
        self.sequences = len(prompts) * n
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
        tokenizer = services.renderer.tokenizer
        top = body.logprobs if isinstance(body, CompletionBody) else (
            body.top_logprobs if body.logprobs else None)
        self.logprobs = LogprobRequest(top, bool(body.return_tokens_as_token_ids),
                                       lambda t: tokenizer.decode([t]))
        self.choices: list[Choice] = []
        ref = AdapterRef.of(adapter) if adapter else None
        salt = tenant_cache_salt(tenant_name)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        self.engine_requests = []
        for p_index, prompt in enumerate(prompts):
            echo = ""
            if isinstance(body, CompletionBody) and body.echo:
                echo = services.renderer.prompt_text(body.prompts()[p_index])
            for i in range(n):
                seed = None if body.seed is None else body.seed + i
                tools = ToolCalls(body, tool_parser, tokenizer) if isinstance(body, ChatBody) \
                    else None
                self.choices.append(Choice(len(self.choices), tools, echo))
                self.engine_requests.append(
                    GenerateRequest(
                        request_id=f"{tenant_name}-{self.id}-{p_index * n + i}",
                        prompt_token_ids=prompt.token_ids,
                        sampling=SamplingOptions(
                            max_tokens=prompt.max_tokens,
                            temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p,
                            seed=seed,
                            stop=tuple(stops),
                            ignore_eos=body.ignore_eos,
                            presence_penalty=body.presence_penalty or 0.0,
                            frequency_penalty=body.frequency_penalty or 0.0,
                        ),
                        adapter=ref,
                        cache_salt=salt,
                        tenant=tenant_name,
                        streaming=bool(body.stream),
                        consumption_rate=body.lorafleet.consumption_rate if body.lorafleet else None,
                        vllm_params=params[p_index],
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

    def stage(self, name: str, now: float) -> None:
        """The request reached a stage of its path (``ServingMetrics.stage``) at ``now``."""
        self.services.metrics.stage.labels(name).observe(max(0.0, now - self.meter.arrival))

    async def deltas(self) -> AsyncIterator[tuple[int, TokenDelta]]:
        clock = self.services.clock
        self.stage("dispatched", clock())
        first = True
        try:
            async for i, delta in merge_choices(self.services, self.engine_requests):
                if first:
                    first = False
                    self.stage("first_delta", clock())
                self.meter.on_tokens(i, len(delta.token_ids), clock())
                self.choices[i].add(delta)
                yield i, delta
        except AdapterLoadError as e:
            raise ServiceUnavailable(
                f"The model `{self.resolved.model}` could not be loaded: {public_message(e)}") from e
        except RequestRefused as e:
            raise InvalidRequest(f"The request was refused: {public_message(e)}") from e
        except EngineError as e:
            raise ServiceUnavailable("The engine is unavailable; retry shortly.") from e

    def close(self, status: int) -> None:
        """End the request: its meter, and its quota slots (the release may still be on
        its way to a cluster-wide book; ``finish`` waits for it)."""
        if self.meter.finished:
            return
        self.meter.finish(status, self.services.clock())
        self.services.metrics.in_flight.labels(self.tenant).dec()
        refund = max(0, self.reserved_tokens - self.meter.completion_tokens)
        self.services.quotas.release(self.tenant, self.quota, refund, self.sequences)

    async def finish(self, status: int) -> None:
        """``close``, then wait until the book has the release: called before the answer's
        last bytes (the stream's ``[DONE]``, a whole answer's body), so that a client's next
        request, on whichever ingress replica, finds the slots free (module doc)."""
        self.close(status)
        await self.services.quotas.settled(self.tenant)

    # -- bodies -------------------------------------------------------------------------

    def _head(self, obj: str) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created,
                "model": self.resolved.model}

    def final_body(self) -> dict[str, Any]:
        if self.chat:
            choices = [c.chat(self.logprobs) for c in self.choices]
            head = self._head("chat.completion")
        else:
            choices = [c.completion(self.logprobs) for c in self.choices]
            head = self._head("text_completion")
        return {**head, "choices": choices, "usage": self.usage()}


class GenerationStream(StreamingResponse):
    """An SSE response that closes its ``Generation`` when the ASGI call ends, however it
    ends (see the module doc)."""

    def __init__(self, gen: Generation, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close(499)  # a no-op when the stream already closed it with its status


async def collect(gen: Generation) -> dict[str, Any]:
    """Run the request to its end; the response body."""
    async for _ in gen.deltas():
        pass
    return gen.final_body()


def _chat_chunk(gen: Generation, choice: Choice, delta: TokenDelta) -> dict[str, Any] | None:
    message: dict[str, Any] = {}
    tools = choice.tools
    if tools is not None and tools.streams_calls:
        calls = tools.stream(delta.text)
        if calls:
            message["tool_calls"] = calls
    elif delta.text:
        message["content"] = delta.text
    logprobs = None
    if gen.logprobs.top is not None and delta.token_ids:
        logprobs = chat_logprobs(gen.logprobs, delta.token_ids, delta.logprobs or ())
    if not message and logprobs is None:
        return None
    return {"index": choice.index, "delta": message, "logprobs": logprobs, "finish_reason": None}


def _text_chunk(gen: Generation, choice: Choice, delta: TokenDelta, first: bool
                ) -> dict[str, Any] | None:
    text = (choice.prefix if first else "") + delta.text
    logprobs = None
    if gen.logprobs.top is not None and delta.token_ids:
        if first:
            choice.offset = len(choice.prefix)
        logprobs, choice.offset = completion_logprobs(
            gen.logprobs, delta.token_ids, delta.logprobs or (), choice.offset)
    if not text and logprobs is None:
        return None
    return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": None,
            "stop_reason": None}


def _finish(gen: Generation, choice: Choice, chunk: dict[str, Any] | None) -> dict[str, Any]:
    """The choice's last chunk: its last delta (if any) with the finish reason, as vLLM
    sends it. ``auto`` tool calls, read from the whole text, go out here."""
    if gen.chat:
        tools = choice.tools
        plain = tools is None or tools.mode == "none"
        # The last delta's text may be empty; it still goes out as content (as vLLM sends it).
        chunk = chunk or {"index": choice.index, "delta": {"content": ""} if plain else {},
                          "logprobs": None}
        called = bool(tools and tools.called)
        if tools is not None and tools.mode == "auto":
            content, calls = tools.final(choice.text)
            called = bool(calls)
            if calls:
                chunk["delta"]["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
            elif content:
                chunk["delta"]["content"] = content
        return {**chunk, "finish_reason": choice.final_reason(called),
                "stop_reason": choice.stop_reason}
    chunk = chunk or {"index": choice.index, "text": "", "logprobs": None}
    return {**chunk, "finish_reason": choice.finish_reason or "stop",
            "stop_reason": choice.stop_reason}


async def stream_events(gen: Generation, include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE events of a streaming request, ending with ``data: [DONE]``."""
    head = gen._head("chat.completion.chunk" if gen.chat else "text_completion")
    extra = {"usage": None} if include_usage else {}
    status = 200
    started: set[int] = set()
    buffered_auto = {c.index for c in gen.choices if c.tools is not None and c.tools.mode == "auto"}
    try:
        if gen.chat:
            for c in gen.choices:
                role = {"index": c.index, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}
                yield sse({**head, "choices": [role], **extra})
        clock = gen.services.clock
        write_hop = gen.services.metrics.token_hop.labels("ingress_write")
        async for i, delta in gen.deltas():
            received = clock()
            choice = gen.choices[i]
            if i in buffered_auto:
                chunk = None  # auto tool calls are read from the whole text at the end
            elif gen.chat:
                chunk = _chat_chunk(gen, choice, delta)
            else:
                chunk = _text_chunk(gen, choice, delta, i not in started)
            started.add(i)
            if delta.finish_reason:
                chunk = _finish(gen, choice, chunk)
            if chunk is not None:
                yield sse({**head, "choices": [chunk], **extra})  # returns once sent
                written = clock()
                if gen.meter.first_written is None:
                    gen.stage("first_written", written)
                gen.meter.on_written(written)
                write_hop.observe(written - received)
        if include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
        await gen.finish(status)
        yield b"data: [DONE]\n\n"
    except asyncio.CancelledError:
        status = 499  # client went away; the engine requests were aborted by the generators
        raise
    except APIError as e:
        status = e.status
        yield sse(e.body())
        await gen.finish(status)
        yield b"data: [DONE]\n\n"
    except Exception:
        status = 500
        log.exception("stream %s failed", gen.id)
        yield sse(APIError("Internal error while streaming.").body())
        await gen.finish(status)
        yield b"data: [DONE]\n\n"
    finally:
        gen.close(status)  # a no-op after finish; a client gone mid-stream ends here
