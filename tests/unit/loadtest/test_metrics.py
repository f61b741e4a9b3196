"""Metric computations on hand-made token timelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorafleet.loadtest.metrics import (
    SLO,
    RequestRecord,
    expand_token_times,
    inter_token_latencies,
    on_schedule,
    percentile,
    request_metrics,
    simulate_reader,
    summarize,
    summarize_by,
    throughput_timeline,
)


def rec(times=(), *, n_out=None, e2e=None, stream=True, status=200, error=None, rate=math.inf,
        tenant="t", adapter="m", start=0.0):
    times = tuple(times)
    return RequestRecord(
        index=0, tenant=tenant, adapter=adapter, stream=stream, scheduled_s=start, start_s=start,
        token_times=times, e2e_s=e2e if e2e is not None else (times[-1] if times else None),
        n_out=len(times) if n_out is None else n_out, status=status, error=error,
        reader_rate=rate,
    )


def test_reader_keeps_up_when_tokens_come_faster_than_it_reads():
    out = simulate_reader([0.5, 0.6, 0.7, 0.8], rate=2.0)
    assert out.on_time == 4
    assert out.stall_s == 0.0
    assert out.read_end_s == pytest.approx(0.5 + 3 * 0.5)


def test_reader_stalls_on_a_gap_and_its_schedule_shifts():
    # Reads every 0.1 s from t=1.0; token 4 is needed at 1.3 but comes at 2.0.
    out = simulate_reader([1.0, 1.1, 1.2, 2.0], rate=10.0)
    assert out.on_time == 3
    assert out.stall_s == pytest.approx(0.7)
    assert out.read_end_s == pytest.approx(2.0)


def test_after_a_stall_later_tokens_are_judged_against_the_shifted_schedule():
    # Token 2 is 0.9 s late; tokens 3 and 4 come 0.1 s apart after it, exactly on the new beat.
    out = simulate_reader([0.0, 1.0, 1.1, 1.2], rate=10.0)
    assert out.on_time == 3
    assert out.stall_s == pytest.approx(0.9)


def test_several_stalls_add_up():
    out = simulate_reader([0.0, 0.5, 0.6, 2.0], rate=4.0)  # needs at .25 (late .25), .75, 1.0
    assert out.stall_s == pytest.approx(0.25 + 1.0)
    assert out.on_time == 2


def test_on_schedule_follows_the_users_fixed_timeline():
    # Due at 1.0, 1.5, 2.0, 2.5 (target 1 s, 2 tok/s).
    assert on_schedule([0.5, 0.6, 0.7, 0.8], rate=2.0, first_due_s=1.0) == 4
    # A late first token puts the stream behind until it catches up: tokens 1-2 late, 3-4 on.
    assert on_schedule([1.8, 1.9, 2.0, 2.1], rate=2.0, first_due_s=1.0) == 2
    # A pause the buffer covers costs nothing; a stall costs every token until caught up.
    assert on_schedule([0.1, 0.2, 0.3, 2.4], rate=2.0, first_due_s=1.0) == 4
    assert on_schedule([0.1, 0.2, 3.0, 3.1, 3.2, 3.3], rate=2.0, first_due_s=1.0) == 3
    assert on_schedule([0.1, 0.2, 4.0, 4.1, 4.2], rate=2.0, first_due_s=1.0) == 2
    assert on_schedule([], rate=2.0, first_due_s=1.0) == 0
    with pytest.raises(ValueError):
        on_schedule([1.0], rate=math.inf, first_due_s=1.0)


@given(st.lists(st.floats(0, 50), min_size=1, max_size=30), st.floats(0.5, 20), st.floats(0, 5),
       st.floats(0, 10))
def test_on_schedule_invariants(times, rate, due, delay):
    n = on_schedule(times, rate, due)
    assert 0 <= n <= len(times)
    # Later arrivals never put more tokens on schedule; a later target never fewer.
    assert on_schedule([t + delay for t in times], rate, due) <= n
    assert on_schedule(times, rate, due + delay) >= n


def test_request_on_schedule_equals_effective_without_a_ttft_target_or_a_reader():
    r = rec([1.8, 1.9, 2.0, 2.1], rate=2.0)
    assert request_metrics(r, SLO()).on_schedule_tokens == request_metrics(r, SLO()).effective_tokens
    fast = rec([1.8, 1.9, 2.0, 2.1])
    assert request_metrics(fast, SLO(ttft_s=1.0)).on_schedule_tokens == 4
    assert request_metrics(r, SLO(ttft_s=1.0)).on_schedule_tokens == 2


def test_infinite_reader_never_stalls_and_empty_timeline_is_zero():
    assert simulate_reader([0.0, 5.0, 9.0], math.inf).stall_s == 0
    assert simulate_reader([0.0, 5.0, 9.0], math.inf).on_time == 3
    assert simulate_reader([], 5.0).on_time == 0
    with pytest.raises(ValueError):
        simulate_reader([1.0], 0.0)


@given(st.lists(st.floats(0, 100), min_size=1, max_size=50), st.floats(0.5, 50))
def test_reader_invariants(times, rate):
    out = simulate_reader(times, rate)
    assert 1 <= out.on_time <= len(times)
    assert out.stall_s >= 0
    # The reader finishes no earlier than the last token and than reading at full speed.
    assert out.read_end_s >= max(times) - 1e-9
    assert out.read_end_s >= min(times) + (len(times) - 1) / rate - 1e-6
    # Stall is exactly the time lost relative to uninterrupted reading.
    assert out.read_end_s == pytest.approx(min(times) + (len(times) - 1) / rate + out.stall_s)


def test_expand_token_times_puts_extra_tokens_on_the_last_chunk():
    assert expand_token_times([0.1, 0.2], 4) == [0.1, 0.2, 0.2, 0.2]
    assert expand_token_times([0.1, 0.2, 0.3], 2) == [0.1, 0.2]
    assert expand_token_times([], 3) == []


def test_streaming_request_metrics():
    r = rec([0.5, 0.6, 0.8, 1.1], e2e=1.2, rate=5.0)
    m = request_metrics(r, SLO(ttft_s=1.0, tpot_s=0.3))
    assert m.ttft_s == pytest.approx(0.5)
    assert m.tpot_s == pytest.approx((1.2 - 0.5) / 3)
    assert list(m.itls_s) == pytest.approx([0.1, 0.2, 0.3])
    assert m.effective_tokens == 4  # reader at 5 tok/s needs them at .7, .9, 1.1
    assert m.stall_s == 0
    assert m.slo_ok
    assert not request_metrics(r, SLO(ttft_s=0.4)).slo_ok
    assert not request_metrics(r, SLO(tpot_s=0.2)).slo_ok


def test_usage_count_larger_than_chunks_counts_held_back_tokens_late():
    # usage says 4 tokens, only 2 content chunks: tokens 2-4 are taken to arrive at 1.0.
    r = rec([0.0, 1.0], n_out=4, e2e=1.0, rate=10.0)
    m = request_metrics(r, SLO())
    assert m.n_out == 4
    assert m.stall_s == pytest.approx(0.9)  # token 2 needed at 0.1
    assert m.effective_tokens == 3  # tokens 3 and 4 are on the shifted beat (1.1, 1.2)


def test_non_streaming_deadline():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)  # deadline for 11 tokens: 1 + 10 * 0.1 = 2 s
    ok = request_metrics(rec(stream=False, n_out=11, e2e=1.9), slo)
    late = request_metrics(rec(stream=False, n_out=11, e2e=2.1), slo)
    assert (ok.effective_tokens, ok.slo_ok, ok.ttft_s) == (11, True, None)
    assert (late.effective_tokens, late.slo_ok) == (0, False)


def test_failed_request_counts_nothing():
    m = request_metrics(rec([0.1], status=500, error="boom"), SLO())
    assert m.effective_tokens == 0 and not m.slo_ok


def test_percentile_matches_numpy():
    data = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(data, 50) == 3.0
    assert percentile(data, 90) == pytest.approx(4.6)
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(data, 101)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40), st.sampled_from([0, 50, 90, 99]))
def test_percentile_property(data, q):
    assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)), abs=1e-6)


def test_summarize_overall_and_by_tenant():
    pairs = []
    for r in [
        rec([0.1, 0.2, 0.3], tenant="a", rate=10.0),
        rec([0.2, 0.3, 1.3], tenant="b", rate=10.0),  # stalls 0.9 s, 2 effective
        rec(status=429, error="rate limited", tenant="b"),
        rec(status=None, error="ConnectError: refused", tenant="a"),
    ]:
        pairs.append((r, request_metrics(r, SLO(ttft_s=0.15))))
    s = summarize(pairs, duration_s=2.0)
    assert (s.requests, s.ok) == (4, 2)
    assert s.errors == {"429": 1, "ConnectError": 1}
    assert s.output_tokens == 6 and s.output_tokens_per_s == 3.0
    assert s.effective_tokens == 5 and s.effective_tokens_per_s == 2.5
    # b's first token misses the 0.15 s target, and it never catches up with its timeline.
    assert s.on_schedule_tokens == 3 and s.on_schedule_tokens_per_s == 1.5
    assert s.stall_s_total == pytest.approx(0.9) and s.stalled_requests == 1
    assert s.slo_attainment == 0.25
    assert s.ttft_s["p50"] == pytest.approx(0.15)
    by = summarize_by(pairs, 2.0, lambda r: r.tenant)
    assert set(by) == {"a", "b"}
    assert by["a"].output_tokens == 3 and by["b"].errors == {"429": 1}


def test_throughput_timeline_bins_tokens_by_arrival():
    r = rec([0.1, 0.2, 1.5], start=0.5)
    tl = throughput_timeline([(r, request_metrics(r, SLO()))], bin_s=1.0, duration_s=3.0)
    assert tl == [(0.0, 2.0), (1.0, 0.0), (2.0, 1.0)]


def test_inter_token_latencies():
    assert inter_token_latencies([0.0, 0.5, 0.75]) == [0.5, 0.25]
