"""The engine protocol: the small async surface the rest of LoRAFleet sees of an engine.

Boundary: plain frozen dataclasses in, plain frozen dataclasses out. Nothing here knows
about HTTP, tenants or Ray. The vLLM implementation is ``vllm_engine.VLLMEngine``;
fast API unit tests may inject a deterministic fake that satisfies the same protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from lorafleet.adapters.model import AdapterContent, AdapterRecord

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as it travels to a replica: its stable id and its content, never a path.

    A path names a directory on one node; the replica that serves the adapter may run on
    another, or be the same pod after a restart. The replica turns ``content`` into files on
    its own node (``AdapterFiles.acquire``) before the engine loads them.
    """

    adapter_id: str
    content: AdapterContent

    @classmethod
    def of(cls, record: AdapterRecord) -> AdapterRef:
        return cls(record.adapter_id, record.content)


class AdapterFiles(Protocol):
    """Where an engine replica gets adapter files on its node (``adapters.Materializer``)."""

    async def acquire(self, content: AdapterContent) -> Path:
        """A local directory holding ``content``, verified; kept until ``release``."""
        ...

    def release(self, digest: str) -> None:
        """The engine no longer needs the files (they may be evicted)."""
        ...


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling knobs (already validated by the API layer)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class GenerateRequest:
    """One sequence to generate: prompt tokens, an optional adapter, sampling options."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingOptions
    adapter: AdapterRef | None = None
    cache_salt: str | None = None
    """Prefix-cache blocks are shared only between requests with the same salt (the tenant's)."""
    tenant: str | None = None
    """Who asked (not who owns the adapter): the scheduler's per-tenant rules count requests
    by it, base-model requests included."""
    streaming: bool = True
    """The client reads the output as a stream (the scheduler may pause it while it reads)."""
    consumption_rate: float | None = None
    """Tokens/s the client declared it reads; ``None``: the engine's default."""
    vllm_params: object | None = None
    """vLLM ``SamplingParams`` for this one sequence, built by the API layer from vLLM's own
    request model (``api/body.py``): structured outputs, logprobs and every other sampling
    field vLLM accepts. When set, the vLLM engine uses them (``sampling`` still states the
    output limit and seed); an engine without vLLM reads ``sampling`` only."""


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one generated token as vLLM reports them: the candidates in vLLM's order
    (the sampled token, then the top ones by rank), each (token id, logprob, decoded text)."""

    candidates: tuple[tuple[int, float, str | None], ...]


@dataclass(frozen=True)
class TokenDelta:
    """New output since the previous delta of the same request."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    """One entry per token of ``token_ids`` when the request asked for logprobs."""
    stop_reason: int | str | None = None
    """The stop string or token id that ended the sequence (vLLM's ``stop_reason``)."""


def merge_deltas(deltas: list[TokenDelta]) -> TokenDelta:
    """One delta carrying several consecutive ones (same request, in order)."""
    if len(deltas) == 1:
        return deltas[0]
    logprobs = None
    if any(d.logprobs is not None for d in deltas):
        logprobs = tuple(lp for d in deltas for lp in (d.logprobs or ()))
    return TokenDelta(
        text="".join(d.text for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        finish_reason=deltas[-1].finish_reason,
        logprobs=logprobs,
        stop_reason=deltas[-1].stop_reason,
    )


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine replica, for /admin and the router."""

    replica_id: str
    resident_adapters: tuple[str, ...]
    in_flight: int
    max_loras: int
    max_cpu_loras: int
    healthy: bool = True
    """False once the replica's engine has died (the replica is about to be replaced)."""
    engine_pids: tuple[int, ...] = ()
    """The engine's own processes (vLLM's engine core), so /health can be checked against them."""


@runtime_checkable
class Engine(Protocol):
    """What an engine replica must do. Kept deliberately small."""

    async def start(self) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]: ...

    async def load_adapter(self, adapter: AdapterRef) -> float:
        """Make the adapter resident; return the seconds it took (0.0 if it already was)."""
        ...

    async def unload_adapter(self, adapter_id: str) -> bool: ...

    async def stats(self) -> EngineStats: ...

    def core_metrics_text(self) -> str:
        """The engine's own Prometheus exposition (vLLM's and the scheduler's series), or ""."""
        ...

    async def shutdown(self) -> None: ...
