"""Per-tenant admission: max concurrent requests, requests per minute, tokens per minute.

``decide_admission`` is pure (state and clock passed in) and returns either an admission
or a refusal with the seconds to wait (the ``Retry-After`` header). ``QuotaBook`` holds
the per-tenant state of one ingress process; with several ingress replicas each enforces
its share (documented limitation: budgets are per ingress replica).

Requests per minute: a token bucket of capacity ``rpm`` refilled at ``rpm/60`` per second.
Tokens per minute: a bucket of capacity ``tpm`` refilled at ``tpm/60`` per second; a
request is charged its prompt tokens plus its output limit at admission, and the unused
part of the output limit is refunded when it finishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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


def _bucket(b: Bucket | None, capacity: int, now: float) -> Bucket:
    b = b or Bucket(float(capacity), now)
    return b.refilled(float(capacity), capacity / 60.0, now)


def decide_admission(quota: Quota, usage: TenantUsage, cost_tokens: int, now: float) -> Admit | Refuse:
    """Admit the request (returning the charged usage) or refuse it with a wait time."""
    if quota.max_concurrent is not None and usage.in_flight >= quota.max_concurrent:
        return Refuse(
            "concurrency", 1.0, f"Too many concurrent requests (limit {quota.max_concurrent})."
        )
    requests = usage.requests
    if quota.requests_per_minute is not None:
        requests = _bucket(requests, quota.requests_per_minute, now)
        if requests.level < 1.0:
            rate = quota.requests_per_minute / 60.0
            wait = (1.0 - requests.level) / rate if rate > 0 else 60.0
            return Refuse(
                "requests_per_minute",
                wait,
                f"Rate limit reached: {quota.requests_per_minute} requests per minute.",
            )
        requests = replace(requests, level=requests.level - 1.0)
    tokens = usage.tokens
    if quota.tokens_per_minute is not None:
        if cost_tokens > quota.tokens_per_minute:
            return Refuse(
                "too_large",
                60.0,
                f"This request needs {cost_tokens} tokens, more than the tenant's "
                f"{quota.tokens_per_minute} tokens per minute.",
            )
        tokens = _bucket(tokens, quota.tokens_per_minute, now)
        if tokens.level < cost_tokens:
            rate = quota.tokens_per_minute / 60.0
            wait = (cost_tokens - tokens.level) / rate if rate > 0 else 60.0
            return Refuse(
                "tokens_per_minute",
                wait,
                f"Rate limit reached: {quota.tokens_per_minute} tokens per minute.",
            )
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


class QuotaBook:
    """Usage per tenant for one ingress process (owned by its event loop; no lock needed)."""

    def __init__(self) -> None:
        self._usage: dict[str, TenantUsage] = {}

    def admit(self, tenant: str, quota: Quota, cost_tokens: int, now: float) -> Admit | Refuse:
        decision = decide_admission(quota, self._usage.get(tenant, TenantUsage()), cost_tokens, now)
        if isinstance(decision, Admit):
            self._usage[tenant] = decision.usage
        return decision

    def release(self, tenant: str, quota: Quota, refund_tokens: int) -> None:
        self._usage[tenant] = settle(self._usage.get(tenant, TenantUsage()), quota, refund_tokens)

    def in_flight(self, tenant: str) -> int:
        return self._usage.get(tenant, TenantUsage()).in_flight
