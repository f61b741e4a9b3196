"""Adapter-slot admission, pure: fill from resident adapters, per-tenant share, bounded wait."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policyviews import P, R, W, view

from lorafleet.serving.scheduling import (
    Action,
    Capacity,
    Reason,
    RequestView,
    TokenFlowParams,
    decide_fcfs,
    decide_tokenflow,
)
from lorafleet.serving.scheduling.slots import SlotParams, decide_slots, tenant_slot_limit


def fcfs_slots(views: list[RequestView], cap: Capacity, now: float,
               p: SlotParams | None = None):
    plan = decide_slots(decide_fcfs(views, cap, now), views, cap, now, p)
    return plan, {d.request_id: d for d in plan.decisions}


def batch_adapters(plan, views: list[RequestView]) -> set[str]:
    state = {v.request_id: v for v in views}
    run = plan.with_action(Action.KEEP_RUNNING, Action.ADMIT, Action.RESUME)
    return {state[d.request_id].adapter_id for d in run} - {None}


def test_the_limit_is_all_slots_alone_and_the_share_otherwise():
    assert tenant_slot_limit(8, 0.5, active_tenants=1) == 8
    assert tenant_slot_limit(8, 0.5, active_tenants=2) == 4
    assert tenant_slot_limit(1, 0.5, active_tenants=3) == 1  # at least one slot each
    assert tenant_slot_limit(5, 0.3, active_tenants=2) == 1
    with pytest.raises(ValueError, match="tenant_share"):
        SlotParams(tenant_share=1.5)
    with pytest.raises(ValueError, match="wait_s"):
        SlotParams(wait_s=0)


def test_a_tenant_alone_may_use_every_slot():
    views = [view(f"a{i}", adapter=f"alice/x{i}", arrival=0.1 * i) for i in range(6)]
    plan, d = fcfs_slots(views, Capacity(max_running=16, max_loras=4), now=0.5)
    assert [r for r in plan.to_start] == ["a0", "a1", "a2", "a3"]
    assert d["a4"].reason is Reason.LORA_SLOTS_FULL and d["a4"].action is Action.DEFER


def test_with_two_tenants_a_flooding_one_gets_its_share_and_the_other_a_slot():
    flood = [view(f"a{i}", adapter=f"alice/x{i}", arrival=0.01 * i) for i in range(8)]
    bob = view("b0", adapter="bob/y", arrival=1.0)
    views = [*flood, bob]
    plan, d = fcfs_slots(views, Capacity(max_running=16, max_loras=4), now=1.1)
    assert set(plan.to_start) == {"a0", "a1", "b0"}
    assert d["a2"].reason is Reason.TENANT_SLOT_SHARE
    assert len(batch_adapters(plan, views)) <= 4


def test_the_share_limits_new_adapters_not_requests_of_resident_ones():
    running = [view(f"r{i}", R, adapter=f"alice/x{i}") for i in range(2)]
    more = [view("a-same", adapter="alice/x0", arrival=1.0),
            view("a-new", adapter="alice/x9", arrival=1.0)]
    bob = view("b0", R, adapter="bob/y")
    views = [*running, bob, *more]
    plan, d = fcfs_slots(views, Capacity(max_running=16, max_loras=4), now=1.5)
    assert "a-same" in plan.to_start  # joins a slot alice already holds
    assert d["a-new"].reason is Reason.TENANT_SLOT_SHARE
    # Nobody running is paused for the share.
    assert {x.request_id for x in running} <= {x.request_id for x in plan.decisions
                                                 if x.action is Action.KEEP_RUNNING}


def test_the_batch_fills_from_resident_adapters_while_a_new_one_waits_within_the_bound():
    running = [view(f"r{i}", R, adapter=f"t/x{i}") for i in range(4)]
    new = view("new", adapter="t/x9", arrival=0.0)
    same = view("same", adapter="t/x1", arrival=0.5)
    views = [*running, new, same]
    plan, d = fcfs_slots(views, Capacity(max_running=16, max_loras=4), now=1.0)
    assert plan.to_start == ("same",)
    assert d["new"].reason is Reason.LORA_SLOTS_FULL


def test_a_request_kept_waiting_past_the_bound_drains_the_slot_that_frees_soonest():
    # x0 has two requests running, x1 one with 90 tokens left, x2 one with 10 left, x3 two.
    running = [view("r0", R, adapter="t/x0"), view("r0b", R, adapter="t/x0"),
               view("r1", R, adapter="t/x1", generated_tokens=10),
               view("r2", R, adapter="t/x2", generated_tokens=90),
               view("r3", R, adapter="t/x3"), view("r3b", R, adapter="t/x3")]
    old = view("old", adapter="t/x9", arrival=0.0)
    joins = [view(f"j{i}", adapter=f"t/x{i}", arrival=2.5) for i in range(4)]
    views = [*running, old, *joins]
    plan, d = fcfs_slots(views, Capacity(max_running=16, max_loras=4), now=3.0,
                         p=SlotParams(wait_s=2.0))
    assert d["j2"].reason is Reason.LORA_DRAIN and d["j2"].action is Action.DEFER
    assert set(plan.to_start) == {"j0", "j1", "j3"}
    assert d["old"].action is Action.DEFER
    # Once x2's last request is done the slot is free and the overdue request goes first.
    views = [v for v in views if v.request_id != "r2"]
    plan, d = fcfs_slots(views, Capacity(max_running=16, max_loras=4), now=3.5)
    assert plan.to_start[0] == "old"
    assert d["j2"].reason is Reason.LORA_SLOTS_FULL  # x2 lost its slot to x9


def test_an_overdue_tenant_at_its_share_drains_one_of_its_own_adapters():
    running = [view("a0", R, adapter="alice/x0"), view("a1", R, adapter="alice/x1"),
               view("a1b", R, adapter="alice/x1"),
               view("b0", R, adapter="bob/y0", generated_tokens=99),
               view("b1", R, adapter="bob/y1", generated_tokens=99)]
    old = view("old", adapter="alice/x9", arrival=0.0)
    join = view("join", adapter="alice/x0", arrival=2.9)
    plan, d = fcfs_slots([*running, old, join], Capacity(max_running=16, max_loras=4), now=3.0)
    assert d["old"].reason is Reason.TENANT_SLOT_SHARE
    assert d["join"].reason is Reason.LORA_DRAIN  # alice's x0 drains, not bob's adapters


def test_paused_requests_stay_paused_rather_than_deferred():
    running = [view(f"r{i}", R, adapter=f"t/x{i}") for i in range(2)]
    paused = view("p", P, adapter="t/x5", generated_tokens=5, paused_since=0.9,
                  first_token_time=0.2)
    plan = decide_slots(decide_fcfs([*running, paused], Capacity(16, 2), 1.0),
                        [*running, paused], Capacity(16, 2), 1.0)
    (dec,) = [x for x in plan.decisions if x.request_id == "p"]
    assert dec.action is Action.KEEP_PAUSED and dec.reason is Reason.LORA_SLOTS_FULL


def flooded(now: float = 1.0) -> list[RequestView]:
    """alice holds all 4 slots (x0: 3 requests, x1-x3: 1 each, x3 with more done); bob's
    request for his adapter has just arrived."""
    running = [view("a0", R, adapter="alice/x0"), view("a0b", R, adapter="alice/x0"),
               view("a0c", R, adapter="alice/x0"), view("a1", R, adapter="alice/x1",
                                                        generated_tokens=50),
               view("a2", R, adapter="alice/x2", generated_tokens=40),
               view("a3", R, adapter="alice/x3", generated_tokens=10)]
    return [*running, view("b", adapter="bob/y", arrival=now - 0.01)]


def test_a_tenant_below_its_share_takes_a_slot_at_once_from_one_above_it():
    views = flooded()
    plan, d = fcfs_slots(views, Capacity(max_running=16, max_loras=4), now=1.0)
    # No wait bound: bob holds none of his 2 slots, alice holds 4 > 2.
    assert plan.to_start == ("b",)
    # The cheapest slot to free: one running request with the fewest tokens done.
    assert d["a3"].action is Action.PAUSE and d["a3"].reason is Reason.LORA_PREEMPT
    assert [x.request_id for x in plan.with_action(Action.PAUSE)] == ["a3"]
    assert len(batch_adapters(plan, views)) == 4


def test_a_request_restarted_after_a_pause_is_not_paused_again_before_it_ran_a_while():
    views = flooded()
    views[5] = view("a3", R, adapter="alice/x3", generated_tokens=10, num_pauses=1,
                    running_since=0.5)
    plan, d = fcfs_slots(views, Capacity(max_running=16, max_loras=4), now=1.0,
                         p=SlotParams(preempt_min_run_s=2.0))
    assert d["a3"].action is Action.KEEP_RUNNING
    assert d["a2"].action is Action.PAUSE  # the next cheapest slot instead
    # Once it ran min_run_s it may be paused again.
    plan, d = fcfs_slots(views, Capacity(max_running=16, max_loras=4), now=2.6,
                         p=SlotParams(preempt_min_run_s=2.0))
    assert d["a3"].action is Action.PAUSE


def test_the_preempted_adapters_requests_wait_and_come_back_when_the_rival_leaves():
    paused = [view("a3", P, adapter="alice/x3", generated_tokens=10, paused_since=1.0,
                   first_token_time=0.3),
              view("a3-new", adapter="alice/x3", arrival=1.2)]
    running = [v for v in flooded() if v.request_id not in ("a3", "b")]
    bob = view("b", R, adapter="bob/y")
    plan, d = fcfs_slots([*running, bob, *paused], Capacity(max_running=16, max_loras=4),
                         now=1.5)
    assert d["a3"].action is Action.KEEP_PAUSED and d["a3-new"].action is Action.DEFER
    assert not plan.with_action(Action.PAUSE)  # nothing else is taken from alice
    # bob is done: alice is alone again and takes the slot back at once.
    plan, d = fcfs_slots([*running, *paused], Capacity(max_running=16, max_loras=4), now=1.6)
    assert set(plan.to_start) == {"a3", "a3-new"}


def test_no_slot_is_taken_from_a_tenant_within_its_share_nor_by_one_at_its_share():
    # alice 2, carol 2 (both at the share of 2): bob waits for a drain, nobody is paused.
    running = [view("a0", R, adapter="alice/x0"), view("a1", R, adapter="alice/x1"),
               view("c0", R, adapter="carol/z0"), view("c1", R, adapter="carol/z1")]
    plan, d = fcfs_slots([*running, view("b", adapter="bob/y", arrival=0.9)],
                         Capacity(max_running=16, max_loras=4), now=1.0)
    assert not plan.with_action(Action.PAUSE) and d["b"].reason is Reason.LORA_SLOTS_FULL
    # alice at her share asks for a third adapter: it never takes one of bob's slots.
    running = [view("a0", R, adapter="alice/x0"), view("a1", R, adapter="alice/x1"),
               view("b0", R, adapter="bob/y0"), view("b1", R, adapter="bob/y1"),
               view("b2", R, adapter="bob/y2")]
    plan, d = fcfs_slots([*running[:4], view("a9", adapter="alice/x9", arrival=0.0)],
                         Capacity(max_running=16, max_loras=4), now=5.0)
    assert not plan.with_action(Action.PAUSE)
    assert d["a9"].reason is Reason.TENANT_SLOT_SHARE


@st.composite
def snapshots(draw):
    max_loras = draw(st.integers(1, 4))
    tenants = draw(st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True))
    adapters = [f"{t}/{i}" for t in tenants for i in range(3)]
    views: list[RequestView] = []
    resident: set[str] = set()
    for i in range(draw(st.integers(0, 12))):
        adapter = draw(st.sampled_from([None, *adapters]))
        state = draw(st.sampled_from([W, R, P]))
        if state is R and adapter is not None and adapter not in resident:
            if len(resident) >= max_loras:
                state = W
            else:
                resident.add(adapter)
        views.append(view(f"q{i}", state, adapter=adapter,
                          arrival=draw(st.floats(0, 10)), paused_since=1.0,
                          generated_tokens=3 if state is not W else 0,
                          num_pauses=draw(st.integers(0, 1)) if state is R else 0,
                          running_since=draw(st.floats(0, 20)) if state is R else None))
    cap = Capacity(max_running=draw(st.integers(1, 16)), max_loras=max_loras)
    return views, cap, draw(st.floats(0, 20)), draw(st.sampled_from(["fcfs", "tokenflow"]))


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_invariants_slots_share_and_one_decision_each(snap):
    views, cap, now, policy = snap
    now = max(now, max((v.arrival for v in views), default=0.0))
    before = (decide_fcfs(views, cap, now) if policy == "fcfs"
              else decide_tokenflow(views, cap, now, TokenFlowParams()))
    plan = decide_slots(before, views, cap, now, SlotParams(tenant_share=0.5))
    assert sorted(d.request_id for d in plan.decisions) == sorted(v.request_id for v in views)
    state = {v.request_id: v for v in views}
    # Never more adapters in the batch than slots. A running request is paused only to give
    # its adapter's slot to a tenant below its share, and only while its own tenant is above.
    assert len(batch_adapters(plan, views)) <= cap.max_loras
    kept = {d.request_id for d in before.decisions if d.action is Action.KEEP_RUNNING}
    still = {d.request_id for d in plan.with_action(Action.KEEP_RUNNING)}
    active_tenants = {v.tenant for v in views if v.adapter_id is not None}
    share = tenant_slot_limit(cap.max_loras, 0.5, len(active_tenants))
    for d in plan.decisions:
        if d.request_id in kept - still:
            assert d.action is Action.PAUSE and d.reason is Reason.LORA_PREEMPT
            victim = state[d.request_id]
            held_by = {state[r].adapter_id for r in kept if state[r].tenant == victim.tenant}
            assert len(held_by) > share
            started = [state[r] for r in plan.to_start]
            assert any(v.tenant != victim.tenant and v.adapter_id is not None for v in started)
    # Every adapter whose requests were paused lost all of them (its slot is free).
    preempted = {state[r].adapter_id for r in kept - still}
    assert not any(state[r].adapter_id in preempted for r in still)
    # It starts only what the policy started or held for want of a slot; a tenant with a
    # rival never adds adapters past its share.
    slot_held = {d.request_id for d in before.decisions if d.reason is Reason.LORA_SLOTS_FULL}
    assert set(plan.to_start) <= set(before.to_start) | slot_held
    active = {v.tenant for v in views if v.adapter_id is not None}
    limit = tenant_slot_limit(cap.max_loras, 0.5, len(active))
    resident = {state[r].adapter_id for r in still} - {None}
    for t in active:
        had = {a for a in resident if state_tenant(a) == t}
        added = {state[r].adapter_id for r in plan.to_start} - {None} - resident
        added_t = {a for a in added if state_tenant(a) == t}
        assert not added_t or len(had | added_t) <= limit


def state_tenant(adapter: str) -> str:
    return adapter.split("/")[0]
