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

Concurrency counts sequences, not requests: a completion with ``n=4`` over two prompts runs
eight sequences on the engine and holds eight of the tenant's ``max_concurrent`` slots, so
one request cannot take more of a replica than that many single requests would. A request
with more sequences than the tenant's limit is refused outright (``sequences``).
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
    # "concurrency" | "sequences" | "requests_per_minute" | "tokens_per_minute" | "too_large"
    reason: str
    retry_after: float
    message: str


def refusal(reason: str, quota: Quota, cost_tokens: int, retry_after: float,
            sequences: int = 1) -> Refuse:
    """The refusal for ``reason``, with the message a client sees (one place, both books)."""
    messages = {
        "concurrency": f"Too many concurrent requests (limit {quota.max_concurrent} sequences "
                       "at once; a request holds one per choice and prompt).",
        "sequences": f"This request runs {sequences} sequences (n x prompts), more than the "
                     f"tenant's limit of {quota.max_concurrent} at once.",
        "requests_per_minute": f"Rate limit reached: {quota.requests_per_minute} requests per minute.",
        "too_large": f"This request needs {cost_tokens} tokens, more than the tenant's "
                     f"{quota.tokens_per_minute} tokens per minute.",
        "tokens_per_minute": f"Rate limit reached: {quota.tokens_per_minute} tokens per minute.",
    }
    return Refuse(reason, retry_after, messages[reason])


def _bucket(b: Bucket | None, capacity: int, now: float) -> Bucket:
    b = b or Bucket(float(capacity), now)
    return b.refilled(float(capacity), capacity / 60.0, now)


def decide_admission(quota: Quota, usage: TenantUsage, cost_tokens: int, now: float,
                     sequences: int = 1) -> Admit | Refuse:
    """Admit the request (returning the charged usage) or refuse it with a wait time.

    ``sequences`` is how many engine sequences the request runs (n x prompts); each holds a
    concurrency slot until the request ends."""
    if quota.max_concurrent is not None:
        if sequences > quota.max_concurrent:
            return refusal("sequences", quota, cost_tokens, 60.0, sequences)
        if usage.in_flight + sequences > quota.max_concurrent:
            return refusal("concurrency", quota, cost_tokens, 1.0, sequences)
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
    return Admit(TenantUsage(usage.in_flight + sequences, requests, tokens))


def settle(usage: TenantUsage, quota: Quota, refund_tokens: int, sequences: int = 1) -> TenantUsage:
    """A request finished: free its sequences' slots and refund unused output tokens."""
    tokens = usage.tokens
    if tokens is not None and quota.tokens_per_minute is not None and refund_tokens > 0:
        tokens = replace(tokens, level=min(float(quota.tokens_per_minute), tokens.level + refund_tokens))
    return TenantUsage(max(0, usage.in_flight - sequences), usage.requests, tokens)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class Quotas(Protocol):
    """What the routes need from a book: admit (may wait on I/O), release (never waits)."""

    async def admit(self, tenant: str, quota: Quota, cost_tokens: int, now: float,
                    sequences: int = 1) -> Admit | Refuse:
        """Charge and admit, or refuse; ``now`` is the caller's clock (a book may keep its own).
        ``sequences`` slots of ``max_concurrent`` are taken (n x prompts of the request)."""
        ...

    def release(self, tenant: str, quota: Quota, refund_tokens: int, sequences: int = 1) -> None:
        """One admitted request of ``tenant`` finished: free its slots, refund unused tokens.
        Called from ``finally`` blocks, so it must not wait: I/O goes to the background."""
        ...

    async def settled(self, tenant: str | None = None) -> None:
        """Wait until every release made so far (of ``tenant``, or of every tenant) has taken
        effect: before a request's last bytes, in tests, at shutdown."""
        ...

    async def close(self) -> None: ...


class QuotaBook:
    """Usage per tenant for one ingress process (owned by its event loop; no lock needed)."""

    def __init__(self) -> None:
        self._usage: dict[str, TenantUsage] = {}

    async def admit(self, tenant: str, quota: Quota, cost_tokens: int, now: float,
                    sequences: int = 1) -> Admit | Refuse:
        return self.admit_now(tenant, quota, cost_tokens, now, sequences)

    def admit_now(self, tenant: str, quota: Quota, cost_tokens: int, now: float,
                  sequences: int = 1) -> Admit | Refuse:
        """``admit`` without the coroutine (the Redis book's fallback calls it directly)."""
        decision = decide_admission(quota, self._usage.get(tenant, TenantUsage()), cost_tokens,
                                    now, sequences)
        if isinstance(decision, Admit):
            self._usage[tenant] = decision.usage
        return decision

    def release(self, tenant: str, quota: Quota, refund_tokens: int, sequences: int = 1) -> None:
        self._usage[tenant] = settle(self._usage.get(tenant, TenantUsage()), quota, refund_tokens,
                                     sequences)

    def in_flight(self, tenant: str) -> int:
        return self._usage.get(tenant, TenantUsage()).in_flight

    async def settled(self, tenant: str | None = None) -> None:
        """Nothing to wait for: releases here take effect at once."""

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class _Refused:
    """The last refusal a book gave a tenant in this process, with what it implies."""

    quota: Quota
    reason: str
    cost_tokens: int
    until: float  # the refusal's own clock: when its retry_after ends


def decide_early(last: _Refused | None, quota: Quota, cost_floor: int, now: float) -> Refuse | None:
    """A refusal that is certain without asking the book (and before tokenizing), or None.

    ``cost_floor`` is a lower bound of the request's cost (its prompt not yet tokenized). Only
    conclusions that hold whatever other ingresses did meanwhile are drawn: buckets only
    refill at their rate, so a request bucket that was empty until ``until`` still is, and a
    token bucket whose level was ``cost - retry_after * rate`` when it refused holds at most
    ``cost - (until - now) * rate`` now.
    """
    if quota.tokens_per_minute is not None and cost_floor > quota.tokens_per_minute:
        return refusal("too_large", quota, cost_floor, 60.0)
    if last is None or last.quota != quota or now >= last.until:
        return None
    left = last.until - now
    if last.reason == "requests_per_minute":
        return refusal(last.reason, quota, cost_floor, left)
    if last.reason == "tokens_per_minute" and quota.tokens_per_minute:
        rate = quota.tokens_per_minute / 60.0
        level_at_most = last.cost_tokens - left * rate
        if cost_floor > level_at_most:
            return refusal(last.reason, quota, cost_floor, (cost_floor - level_at_most) / rate)
    return None


class RefusalMemo:
    """Per-process memory of each tenant's last rate refusal, so that a tenant being refused
    is refused again before its prompt is tokenized (``decide_early``). Bounded: the oldest
    entries go first."""

    def __init__(self, max_tenants: int = 10_000) -> None:
        self._last: dict[str, _Refused] = {}
        self._max = max_tenants

    def early(self, tenant: str, quota: Quota, cost_floor: int, now: float) -> Refuse | None:
        return decide_early(self._last.get(tenant), quota, cost_floor, now)

    def note(self, tenant: str, quota: Quota, cost_tokens: int, decision: Admit | Refuse,
             now: float) -> None:
        """Remember a book's decision (a rate refusal; anything else forgets the tenant)."""
        self._last.pop(tenant, None)
        if isinstance(decision, Refuse) and decision.reason in ("requests_per_minute",
                                                                "tokens_per_minute"):
            if len(self._last) >= self._max:
                del self._last[next(iter(self._last))]
            self._last[tenant] = _Refused(quota, decision.reason, cost_tokens,
                                          now + decision.retry_after)
