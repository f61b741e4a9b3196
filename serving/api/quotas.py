"""Per-tenant admission: max concurrent requests, requests per minute, tokens per minute.

``decide_admission`` is pure (state and clock passed in) and returns either an admission
or a refusal with the seconds to wait (the ``Retry-After`` header). Two books apply it:
``QuotaBook`` here holds the per-tenant state of one process (the SQLite, single-process
mode, and the fallback while Redis is unreachable); ``RedisQuotaBook``
(``quotas_redis.py``) keeps the same state in Redis so that every ingress replica draws
on one budget. Both implement ``Quotas``, and one test suite runs against both.

Requests per minute: a token bucket of capacity ``rpm`` refilled at ``rpm/60`` per second.
Tokens per minute: a bucket of capacity ``tpm`` refilled at ``tpm/60`` per second; a
request is charged its prompt tokens plus its output limit at admission, and the unused
part of the output limit is refunded when it finishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

from lorafleet.adapters.model import Quota


@dataclass(frozen=True)
class Bucket:
    level: float
    updated: float

    def refilled(self, capacity: float, per_second: float, now: float) -> Bucket:
        level = min(capacity, self.level + max(0.0, now - self.updated) * per_second)
        return Bucket(level, now)


@dataclass(frozen=True)
class TenantUsage:
    in_flight: int = 0
    requests: Bucket | None = None
    tokens: Bucket | None = None


@dataclass(frozen=True)
class Admit:
    usage: TenantUsage


@dataclass(frozen=True)
class Refuse:
    reason: str  # "concurrency" | "requests_per_minute" | "tokens_per_minute" | "too_large"
    retry_after: float
    message: str


def refusal(reason: str, quota: Quota, cost_tokens: int, retry_after: float) -> Refuse:
    """The refusal for ``reason``, with the message a client sees (one place, both books)."""
    messages = {
        "concurrency": f"Too many concurrent requests (limit {quota.max_concurrent}).",
        "requests_per_minute": f"Rate limit reached: {quota.requests_per_minute} requests per minute.",
        "too_large": f"This request needs {cost_tokens} tokens, more than the tenant's "
                     f"{quota.tokens_per_minute} tokens per minute.",
        "tokens_per_minute": f"Rate limit reached: {quota.tokens_per_minute} tokens per minute.",
    }
    return Refuse(reason, retry_after, messages[reason])


def _bucket(b: Bucket | None, capacity: int, now: float) -> Bucket:
    b = b or Bucket(float(capacity), now)
    return b.refilled(float(capacity), capacity / 60.0, now)


def decide_admission(quota: Quota, usage: TenantUsage, cost_tokens: int, now: float) -> Admit | Refuse:
    """Admit the request (returning the charged usage) or refuse it with a wait time."""
    if quota.max_concurrent is not None and usage.in_flight >= quota.max_concurrent:
        return refusal("concurrency", quota, cost_tokens, 1.0)
    requests = usage.requests
    if quota.requests_per_minute is not None:
        requests = _bucket(requests, quota.requests_per_minute, now)
        if requests.level < 1.0:
            rate = quota.requests_per_minute / 60.0
            wait = (1.0 - requests.level) / rate if rate > 0 else 60.0
            return refusal("requests_per_minute", quota, cost_tokens, wait)
        requests = replace(requests, level=requests.level - 1.0)
    tokens = usage.tokens
    if quota.tokens_per_minute is not None:
        if cost_tokens > quota.tokens_per_minute:
            return refusal("too_large", quota, cost_tokens, 60.0)
        tokens = _bucket(tokens, quota.tokens_per_minute, now)
        if tokens.level < cost_tokens:
            rate = quota.tokens_per_minute / 60.0
            wait = (cost_tokens - tokens.level) / rate if rate > 0 else 60.0
            return refusal("tokens_per_minute", quota, cost_tokens, wait)
        tokens = replace(tokens, level=tokens.level - cost_tokens)
    return Admit(TenantUsage(usage.in_flight + 1, requests, tokens))


def settle(usage: TenantUsage, quota: Quota, refund_tokens: int) -> TenantUsage:
    """A request finished: free its concurrency slot and refund unused output tokens."""
    tokens = usage.tokens
    if tokens is not None and quota.tokens_per_minute is not None and refund_tokens > 0:
        tokens = replace(tokens, level=min(float(quota.tokens_per_minute), tokens.level + refund_tokens))
    return TenantUsage(max(0, usage.in_flight - 1), usage.requests, tokens)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Quotas(Protocol):
    """What the routes need from a book: admit (may wait on I/O), release (never waits)."""

    async def admit(self, tenant: str, quota: Quota, cost_tokens: int, now: float) -> Admit | Refuse:
        """Charge and admit, or refuse; ``now`` is the caller's clock (a book may keep its own)."""
        ...

    def release(self, tenant: str, quota: Quota, refund_tokens: int) -> None:
        """One admitted request of ``tenant`` finished: free its slot, refund unused tokens.
        Called from ``finally`` blocks, so it must not wait: I/O goes to the background."""
        ...

    async def settled(self) -> None:
        """Wait until every release made so far has taken effect (tests, shutdown)."""
        ...

    async def close(self) -> None: ...


class QuotaBook:
    """Usage per tenant for one ingress process (owned by its event loop; no lock needed)."""

    def __init__(self) -> None:
        self._usage: dict[str, TenantUsage] = {}

    async def admit(self, tenant: str, quota: Quota, cost_tokens: int, now: float) -> Admit | Refuse:
        return self.admit_now(tenant, quota, cost_tokens, now)

    def admit_now(self, tenant: str, quota: Quota, cost_tokens: int, now: float) -> Admit | Refuse:
        """``admit`` without the coroutine (the Redis book's fallback calls it directly)."""
        decision = decide_admission(quota, self._usage.get(tenant, TenantUsage()), cost_tokens, now)
        if isinstance(decision, Admit):
            self._usage[tenant] = decision.usage
        return decision

    def release(self, tenant: str, quota: Quota, refund_tokens: int) -> None:
        self._usage[tenant] = settle(self._usage.get(tenant, TenantUsage()), quota, refund_tokens)

    def in_flight(self, tenant: str) -> int:
        return self._usage.get(tenant, TenantUsage()).in_flight

    async def settled(self) -> None:
        """Nothing to wait for: releases here take effect at once."""

    async def close(self) -> None:
        return None
