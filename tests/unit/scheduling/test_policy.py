"""The TokenFlow policy, pure: buffer arithmetic, decisions with reasons, invariants."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policyviews import P, R, W, view

from lorafleet.serving.scheduling import (
    Action,
    Capacity,
    Reason,
    RequestView,
    StepCost,
    TokenFlowParams,
    UnknownPolicyError,
    advance_reader,
    buffer_occupancy,
    decide_fcfs,
    decide_tokenflow,
    make_policy,
    time_to_stall,
)


def by_id(plan):
    return {d.request_id: d for d in plan.decisions}


def test_buffer_occupancy_and_time_to_stall():
    v = view("a", R, first_token_time=10.0, generated_tokens=50, consumption_rate=5.0)
    assert buffer_occupancy(v, now=14.0) == 30.0
    assert time_to_stall(v, now=14.0) == 6.0
    assert buffer_occupancy(v, now=30.0) == 0.0  # never below zero
    assert buffer_occupancy(view("b", R), now=5.0) == 0.0  # no first token yet
    assert time_to_stall(view("c", R, streaming=False), now=1.0) == math.inf
    assert time_to_stall(v, now=30.0) == -10.0  # the reader has waited 10 s


def test_reader_model_shifts_after_it_ran_dry():
    # 20 tokens at 5 tok/s from t=0: dry at 4 s. More tokens at 6 s: it waited, reads on from 6.
    assert advance_reader(0.0, 0.0, delivered=20, rate=5.0, now=6.0) == (20.0, 6.0)
    # Tokens that came before it ran dry change nothing.
    assert advance_reader(0.0, 0.0, delivered=20, rate=5.0, now=3.0) == (0.0, 0.0)
    v = view("a", R, first_token_time=0.0, generated_tokens=30, consumption_rate=5.0,
             reader_tokens=20.0, reader_at=6.0)
    assert time_to_stall(v, now=7.0) == 1.0


def test_a_stalled_paused_stream_becomes_more_urgent_than_newer_arrivals():
    """Its urgency grows with the time its reader waits, as a newcomer's does with its wait."""
    p = TokenFlowParams(resume_margin_s=1.0, ttft_target_s=0.5)
    # Paused at 10 s with a reader that ran dry at 12 s; now 20 s: stalled for 8 s.
    paused = view("p", P, first_token_time=0.0, generated_tokens=60, consumption_rate=5.0,
                  paused_since=10.0, num_pauses=1)
    new = view("new", W, arrival=16.0)
    d = by_id(decide_tokenflow([paused, new], Capacity(1, 4), now=20.0, params=p))
    assert d["p"].action is Action.RESUME and d["new"].action is Action.DEFER
    older = view("old", W, arrival=5.0)  # waited 15 s for its first token: goes first
    d = by_id(decide_tokenflow([paused, older], Capacity(1, 4), now=20.0, params=p))
    assert d["old"].action is Action.ADMIT and d["p"].action is Action.KEEP_PAUSED


def test_new_request_preempts_a_long_buffer_when_the_batch_is_full():
    now = 20.0
    long = view("long", R, first_token_time=1.0, generated_tokens=200, consumption_rate=5.0)
    short = view("short", R, first_token_time=15.0, generated_tokens=30, consumption_rate=5.0)
    new = view("new", W, arrival=19.9)
    plan = decide_tokenflow([long, short, new], Capacity(max_running=2, max_loras=4), now)
    d = by_id(plan)
    assert d["long"].action is Action.PAUSE and d["long"].reason is Reason.BUFFER_LONG
    assert d["short"].action is Action.KEEP_RUNNING and d["short"].reason is Reason.BUFFER_SHORT
    assert d["new"].action is Action.ADMIT and d["new"].reason is Reason.TTFT_URGENCY
    assert plan.to_pause == ("long",) and plan.to_start == ("new",)


def test_two_streams_with_similar_buffers_do_not_trade_places_every_step():
    now = 30.0
    cap = Capacity(max_running=1, max_loras=4)
    # A paused stream with *more* buffer never displaces a running one (the resume margin
    # once made a paused stream look 0.55 s more urgent than it was: the two swapped back
    # and forth every step).
    a = view("a", R, first_token_time=10.0, generated_tokens=74, consumption_rate=3.0)
    richer = view("b", P, first_token_time=10.0, generated_tokens=75, consumption_rate=3.0,
                  paused_since=29.0)
    assert by_id(decide_tokenflow([a, richer], cap, now))["a"].action is Action.KEEP_RUNNING
    # Buffers: a ~4.7 s (running), b ~3.3 s (paused): b is clearly the one to run.
    a = view("a", R, first_token_time=10.0, generated_tokens=74, consumption_rate=3.0)
    b = view("b", P, first_token_time=10.0, generated_tokens=70, consumption_rate=3.0,
             paused_since=29.0)
    d = by_id(decide_tokenflow([a, b], cap, now))
    assert d["a"].action is Action.PAUSE and d["b"].action is Action.RESUME
    # One step later, the places swapped: without a minimum run (unknown start) the swap is not
    # undone, as both are compared by when they would have to be resumed.
    a2 = dataclasses.replace(a, state=P, paused_since=now)
    b2 = dataclasses.replace(b, state=R, paused_since=None, generated_tokens=71)
    d = by_id(decide_tokenflow([a2, b2], cap, now + 0.05))
    assert d["b"].action is Action.KEEP_RUNNING and d["a"].action is Action.KEEP_PAUSED
    # A stream resumed less than min_run_s ago keeps its slot even against a more urgent one.
    urgent = dataclasses.replace(a2, generated_tokens=64)
    fresh = dataclasses.replace(b2, running_since=now, generated_tokens=90)
    d = by_id(decide_tokenflow([urgent, fresh], cap, now + 0.05))
    assert d["b"].action is Action.KEEP_RUNNING and d["b"].reason is Reason.MIN_RUN
    d = by_id(decide_tokenflow([urgent, fresh], cap, now + 2.5))
    assert d["b"].action is Action.PAUSE and d["a"].action is Action.RESUME
    # ...but not against a newcomer waiting for its first token.
    new = view("new", W, arrival=now)
    d = by_id(decide_tokenflow([fresh, new], cap, now + 0.05))
    assert d["new"].action is Action.ADMIT and d["b"].action is Action.PAUSE


def test_nothing_is_paused_when_the_batch_has_room():
    long = view("long", R, first_token_time=1.0, generated_tokens=200)
    plan = decide_tokenflow([long, view("new", W, arrival=9.0)], Capacity(8, 4), now=10.0)
    assert plan.to_pause == ()
    assert set(plan.to_start) == {"new"}


def test_paused_request_resumes_before_its_buffer_drains():
    p = TokenFlowParams(resume_margin_s=1.0, prefill_tokens_per_s=1000.0)
    # 10 tokens left at 5 tok/s: stalls in 2 s; resume cost 0.22 s + 1 s margin -> still ahead,
    # but more urgent than the running one with a 20 s buffer.
    paused = view("p", P, first_token_time=0.0, generated_tokens=60, consumption_rate=5.0,
                  paused_since=9.0, num_pauses=1, prompt_tokens=160)
    busy = view("r", R, first_token_time=0.0, generated_tokens=150, consumption_rate=5.0)
    plan = decide_tokenflow([paused, busy], Capacity(1, 4), now=10.0, params=p)
    d = by_id(plan)
    assert d["p"].action is Action.RESUME and d["p"].reason is Reason.BUFFER_DRAINING
    assert d["r"].action is Action.PAUSE


def test_pause_bound_and_wait_bound_force_service():
    p = TokenFlowParams(max_pause_s=5.0, max_wait_s=3.0)
    paused = view("p", P, first_token_time=0.0, generated_tokens=900, paused_since=1.0)
    waiting = view("w", W, arrival=0.0, streaming=False, max_tokens=10_000)
    busy = view("r", R, first_token_time=0.0, generated_tokens=900)
    plan = decide_tokenflow([paused, waiting, busy], Capacity(2, 4), now=10.0, params=p)
    d = by_id(plan)
    assert d["p"].reason is Reason.PAUSE_BOUND and d["p"].action is Action.RESUME
    assert d["w"].reason is Reason.WAIT_BOUND and d["w"].action is Action.ADMIT
    assert d["r"].action is Action.PAUSE


def test_lora_slots_are_never_exceeded_and_the_refusal_says_why():
    running = [view("r1", R, adapter_id="a", first_token_time=0.0, generated_tokens=1)]
    waiting = [view("w1", W, arrival=1.0, adapter_id="b"), view("w2", W, arrival=1.1, adapter_id="a")]
    plan = decide_tokenflow(running + waiting, Capacity(8, max_loras=1), now=2.0)
    d = by_id(plan)
    assert d["w1"].action is Action.DEFER and d["w1"].reason is Reason.LORA_SLOTS_FULL
    assert d["w2"].action is Action.ADMIT


def test_kv_blocks_bound_admission():
    running = [view("r", R, prompt_tokens=300, first_token_time=0.0, generated_tokens=1)]
    plan = decide_tokenflow(running + [view("w", W, prompt_tokens=300)],
                            Capacity(8, 4, kv_blocks=12, block_size=32), now=0.1)
    assert by_id(plan)["w"].reason is Reason.KV_FULL


def test_non_streaming_runs_by_deadline():
    p = TokenFlowParams(tpot_estimate_s=0.1)
    relaxed = view("late", W, arrival=0.0, streaming=False, max_tokens=10, deadline=100.0)
    urgent = view("soon", W, arrival=0.5, streaming=False, max_tokens=10, deadline=3.0)
    plan = decide_tokenflow([relaxed, urgent], Capacity(1, 4), now=1.0, params=p)
    assert plan.to_start == ("soon",)
    assert by_id(plan)["soon"].reason is Reason.DEADLINE


def test_fcfs_is_arrival_order_and_never_pauses():
    vs = [view("b", W, arrival=2.0), view("a", W, arrival=1.0),
          view("x", R, first_token_time=0.0, generated_tokens=900), view("p", P, arrival=5.0)]
    plan = decide_fcfs(vs, Capacity(1, 1), now=10.0)
    assert plan.to_pause == ()
    assert plan.to_start == ("p", "a", "b")
    assert {d.reason for d in plan.decisions} == {Reason.FCFS}


def test_factory_rejects_unknown_names():
    assert make_policy("fcfs") is decide_fcfs
    make_policy("tokenflow")
    with pytest.raises(UnknownPolicyError, match="known: fcfs, tokenflow"):
        make_policy("lifo")


# -- properties ---------------------------------------------------------------------------

adapters = st.sampled_from([None, "a", "b", "c", "d"])


@st.composite
def snapshots(draw):
    """A consistent snapshot: running set within max_loras, paused/waiting arbitrary."""
    max_loras = draw(st.integers(1, 3))
    now = 100.0
    views = []
    run_adapters: set[str] = set()
    for i in range(draw(st.integers(0, 12))):
        state = draw(st.sampled_from([W, R, P]))
        ad = draw(adapters)
        if state is R and ad is not None and ad not in run_adapters:
            if len(run_adapters) >= max_loras:
                ad = None
            else:
                run_adapters.add(ad)
        started = state is not W
        views.append(RequestView(
            request_id=f"r{i}",
            arrival=draw(st.floats(50.0, 100.0)),
            state=state,
            prompt_tokens=draw(st.integers(1, 500)),
            max_tokens=draw(st.integers(1, 300)),
            generated_tokens=draw(st.integers(1, 300)) if started else 0,
            streaming=draw(st.booleans()),
            consumption_rate=draw(st.floats(0.5, 50.0)),
            first_token_time=draw(st.floats(60.0, 100.0)) if started else None,
            adapter_id=ad,
            paused_since=draw(st.floats(80.0, 100.0)) if state is P else None,
            num_pauses=draw(st.integers(0, 6)) if started else 0,
        ))
    cap = Capacity(max_running=draw(st.integers(1, 8)), max_loras=max_loras,
                   kv_blocks=draw(st.one_of(st.none(), st.integers(1, 200))),
                   step_cost=draw(st.one_of(st.none(), st.builds(
                       StepCost, st.floats(0.001, 0.1), st.floats(0.0, 0.05),
                       st.floats(0.0, 0.01)))))
    return views, cap, now


@given(snapshots())
@settings(max_examples=300, deadline=None)
def test_every_request_gets_exactly_one_decision_and_the_adapter_bound_holds(snap):
    views, cap, now = snap
    plan = decide_tokenflow(views, cap, now)
    assert sorted(d.request_id for d in plan.decisions) == sorted(v.request_id for v in views)
    state = {v.request_id: v for v in views}
    runs = [d for d in plan.decisions if d.action in (Action.ADMIT, Action.RESUME, Action.KEEP_RUNNING)]
    assert len({state[d.request_id].adapter_id for d in runs} - {None}) <= cap.max_loras
    # Only running requests are paused; only those whose buffer outlasts the threshold, or
    # streams past the reading-rate cap.
    p = TokenFlowParams()
    for d in plan.with_action(Action.PAUSE):
        v = state[d.request_id]
        assert v.state is R and v.num_pauses < p.max_pauses_per_request
        if d.reason is Reason.RATE_CAP:
            assert v.streaming and cap.step_cost is not None
        elif v.streaming:
            assert time_to_stall(v, now) > p.pause_min_buffer_s
    # New work only starts where a slot is free (protected running requests may overflow).
    started = plan.with_action(Action.ADMIT, Action.RESUME)
    kept = plan.with_action(Action.KEEP_RUNNING)
    assert not started or len(kept) + len(started) <= max(cap.max_running, len(kept))


@given(snapshots())
@settings(max_examples=200, deadline=None)
def test_decisions_are_deterministic_and_independent_of_input_order(snap):
    views, cap, now = snap
    a = decide_tokenflow(views, cap, now)
    b = decide_tokenflow(list(reversed(views)), cap, now)
    assert a == b


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 25))
    return [
        (draw(st.floats(0.0, 10.0)), draw(st.integers(5, 40)), draw(st.floats(2.0, 8.0)),
         draw(st.booleans()), draw(st.sampled_from([None, "a", "b", "c"])))
        for _ in range(n)
    ], draw(st.integers(1, 6)), draw(st.integers(1, 2)), draw(st.booleans())


@given(workloads())
@settings(max_examples=60, deadline=None)
def test_simulated_bounded_load_nobody_waits_forever_and_pauses_are_bounded(wl):
    """A toy engine (10 tok/s per running request) driven by the policy for 120 s, with or
    without the reading-rate cap (the engine's true step cost)."""
    arrivals, slots, max_loras, budget = wl
    p = TokenFlowParams(max_wait_s=5.0, max_pause_s=6.0)
    cap = Capacity(max_running=slots, max_loras=max_loras,
                   step_cost=StepCost(0.1, 0.0, 0.0) if budget else None)
    dt = 0.1
    views = {
        f"r{i}": RequestView(request_id=f"r{i}", arrival=a, state=W, prompt_tokens=10,
                             max_tokens=m, consumption_rate=c, streaming=s, adapter_id=ad)
        for i, (a, m, c, s, ad) in enumerate(arrivals)
    }
    started_at: dict[str, float] = {}
    longest_pause = 0.0
    done: set[str] = set()
    t = 0.0
    while t < 120.0 and len(done) < len(views):
        live = [v for v in views.values() if v.arrival <= t and v.request_id not in done]
        plan = decide_tokenflow(live, cap, t, p)
        runs = [d for d in plan.decisions if d.action in (Action.ADMIT, Action.RESUME, Action.KEEP_RUNNING)]
        assert len({views[d.request_id].adapter_id for d in runs} - {None}) <= max_loras
        for d in plan.decisions:
            v = views[d.request_id]
            if d.action is Action.PAUSE:
                v = dataclasses.replace(v, state=P, paused_since=t, num_pauses=v.num_pauses + 1)
            elif d.action in (Action.ADMIT, Action.RESUME, Action.KEEP_RUNNING):
                if v.paused_since is not None:
                    longest_pause = max(longest_pause, t - v.paused_since)
                started_at.setdefault(v.request_id, t)
                g = v.generated_tokens + 1
                v = dataclasses.replace(
                    v, state=R, paused_since=None, generated_tokens=g,
                    first_token_time=v.first_token_time if v.first_token_time is not None else t,
                )
                if g >= v.max_tokens:
                    done.add(v.request_id)
            views[d.request_id] = v
        t += dt
    assert done == set(views), "every request finishes under bounded load"
    # Past its bound a request goes first, in arrival order among the overdue: it waits at most
    # the bound plus the work of those ahead of it (each at most `longest_run` per slot).
    longest_run = 40 * dt
    queue_bound = (len(views) / slots + 1) * longest_run + 1.0
    for rid, v in views.items():
        assert started_at[rid] - v.arrival <= p.max_wait_s + queue_bound
        assert v.num_pauses <= p.max_pauses_per_request
    assert longest_pause <= p.max_pause_s + queue_bound
