"""The admission rule, pure: token buckets per minute, concurrency, the refund at the end.

The clock is passed in (``now``), so every case is exact. The same cases run against the
in-process book and the Redis book in ``tests/component/registry/test_quota_books.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.adapters.model import Quota
from lorafleet.serving.api.quotas import (
    Admit,
    QuotaBook,
    RefusalMemo,
    Refuse,
    TenantUsage,
    decide_admission,
    decide_early,
    settle,
)

pytestmark = pytest.mark.middle


def test_concurrency_limit_then_release_frees_the_slot() -> None:
    q = Quota(max_concurrent=2)
    usage = TenantUsage()
    for _ in range(2):
        d = decide_admission(q, usage, 10, now=0.0)
        assert isinstance(d, Admit)
        usage = d.usage
    refused = decide_admission(q, usage, 10, now=0.0)
    assert isinstance(refused, Refuse) and refused.reason == "concurrency"
    assert isinstance(decide_admission(q, settle(usage, q, 0), 10, now=0.0), Admit)


def test_requests_per_minute_bucket_refills_continuously() -> None:
    q = Quota(requests_per_minute=60)  # one per second after the burst
    usage = TenantUsage()
    for _ in range(60):
        d = decide_admission(q, usage, 1, now=100.0)
        assert isinstance(d, Admit)
        usage = settle(d.usage, q, 0)
    refused = decide_admission(q, usage, 1, now=100.0)
    assert isinstance(refused, Refuse) and refused.reason == "requests_per_minute"
    assert refused.retry_after == 1.0
    assert isinstance(decide_admission(q, usage, 1, now=100.5), Refuse)
    assert isinstance(decide_admission(q, usage, 1, now=101.0), Admit)


def test_tokens_are_charged_at_admission_and_unused_output_refunded() -> None:
    q = Quota(tokens_per_minute=1000)
    d = decide_admission(q, TenantUsage(), 800, now=0.0)  # prompt + max_tokens
    assert isinstance(d, Admit)
    refused = decide_admission(q, d.usage, 300, now=0.0)
    assert isinstance(refused, Refuse) and refused.reason == "tokens_per_minute"
    assert abs(refused.retry_after - 100 / (1000 / 60)) < 1e-9
    usage = settle(d.usage, q, refund_tokens=500)  # only 300 of the 800 were used
    assert isinstance(decide_admission(q, usage, 300, now=0.0), Admit)
    too_large = decide_admission(q, TenantUsage(), 1001, now=0.0)
    assert isinstance(too_large, Refuse) and too_large.reason == "too_large"


def test_refund_never_overfills_the_bucket() -> None:
    q = Quota(tokens_per_minute=100)
    d = decide_admission(q, TenantUsage(), 10, now=0.0)
    assert isinstance(d, Admit)
    usage = settle(d.usage, q, refund_tokens=10_000)
    assert usage.tokens is not None and usage.tokens.level == 100


async def test_in_process_book_keeps_usage_per_tenant() -> None:
    book = QuotaBook()
    q = Quota(max_concurrent=1)
    assert isinstance(await book.admit("alice", q, 1, 0.0), Admit)
    assert isinstance(await book.admit("bob", q, 1, 0.0), Admit)
    assert isinstance(await book.admit("alice", q, 1, 0.0), Refuse)
    book.release("alice", q, 0)
    assert book.in_flight("alice") == 0
    assert isinstance(await book.admit("alice", q, 1, 0.0), Admit)


def test_each_sequence_holds_a_slot() -> None:
    q = Quota(max_concurrent=4)
    d = decide_admission(q, TenantUsage(), 10, now=0.0, sequences=3)
    assert isinstance(d, Admit) and d.usage.in_flight == 3
    refused = decide_admission(q, d.usage, 10, now=0.0, sequences=2)
    assert isinstance(refused, Refuse) and refused.reason == "concurrency"
    assert isinstance(decide_admission(q, d.usage, 10, now=0.0), Admit)
    assert settle(d.usage, q, 0, sequences=3).in_flight == 0
    never = decide_admission(q, TenantUsage(), 10, now=0.0, sequences=5)
    assert isinstance(never, Refuse) and never.reason == "sequences"


async def test_in_process_book_counts_sequences() -> None:
    book = QuotaBook()
    q = Quota(max_concurrent=4)
    assert isinstance(await book.admit("alice", q, 1, 0.0, sequences=4), Admit)
    assert isinstance(await book.admit("alice", q, 1, 0.0), Refuse)
    book.release("alice", q, 0, sequences=4)
    assert book.in_flight("alice") == 0


def test_an_early_refusal_is_only_drawn_when_certain() -> None:
    q = Quota(requests_per_minute=60, tokens_per_minute=600)  # 1 request and 10 tokens a second
    memo = RefusalMemo()
    assert memo.early("alice", q, 10, now=0.0) is None  # nothing known yet
    memo.note("alice", q, 1, Refuse("requests_per_minute", 2.0, "m"), now=0.0)
    early = memo.early("alice", q, 1, now=1.5)
    assert early is not None and early.reason == "requests_per_minute"
    assert early.retry_after == 0.5
    assert memo.early("alice", q, 1, now=2.0) is None  # the bucket may hold one again
    assert memo.early("bob", q, 1, now=1.0) is None
    assert memo.early("alice", Quota(requests_per_minute=600), 1, now=1.0) is None  # new quota
    # The token bucket held 100 - 5 * 10 = 50 when it refused a cost of 100 for 5 s.
    memo.note("alice", q, 100, Refuse("tokens_per_minute", 5.0, "m"), now=0.0)
    assert memo.early("alice", q, 60, now=0.0) is not None  # 60 > 50
    assert memo.early("alice", q, 50, now=0.0) is None  # might fit
    assert memo.early("alice", q, 60, now=2.0) is None  # 50 + 2 * 10 = 70 now
    memo.note("alice", q, 1, Admit(TenantUsage()), now=0.0)
    assert memo.early("alice", q, 60, now=0.0) is None  # an admission forgets the refusal
    too_large = decide_early(None, q, 601, now=0.0)
    assert too_large is not None and too_large.reason == "too_large"


@settings(max_examples=200, deadline=None)
@given(
    rpm=st.integers(1, 120),
    tpm=st.integers(50, 5000),
    arrivals=st.lists(st.tuples(st.floats(0, 5), st.integers(1, 60)), max_size=200),
)
def test_admitted_work_never_exceeds_burst_plus_refill(
    rpm: int, tpm: int, arrivals: list[tuple[float, int]]
) -> None:
    """Invariant: over [0, T], admitted requests <= rpm + rpm*T/60, tokens <= tpm + tpm*T/60."""
    q = Quota(requests_per_minute=rpm, tokens_per_minute=tpm)
    usage, now, admitted, tokens = TenantUsage(), 0.0, 0, 0
    for gap, cost in arrivals:
        now += gap
        d = decide_admission(q, usage, cost, now)
        if isinstance(d, Admit):
            usage = settle(d.usage, q, 0)
            admitted += 1
            tokens += cost
        assert admitted <= rpm + rpm * now / 60 + 1e-9
        assert tokens <= tpm + tpm * now / 60 + 1e-9
