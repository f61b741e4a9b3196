"""The per-tenant batch cap, pure: a flooding tenant is paused down to what keeps a smaller
tenant's decode step near its step alone; tenants alone or of similar size are not cut."""

from __future__ import annotations

from collections import Counter

import policyviews
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policyviews import P, R, W

from lorafleet.serving.scheduling import (
    Action,
    Capacity,
    Reason,
    RequestState,
    RequestView,
    StepCost,
    TokenFlowParams,
    decide_fcfs,
    decide_tokenflow,
)
from lorafleet.serving.scheduling.batch_share import (
    decide_with_batch_share,
    hold_above_cap,
    tenant_batch_cap,
)

# The 2-core CPU of 0025: ~0.08 s a step plus ~0.017 s a sequence.
CPU = StepCost(base_s=0.08, per_sequence_s=0.017, per_token_s=0.0)
# A GPU decoding a small model: the step barely grows with the batch.
GPU = StepCost(base_s=0.012, per_sequence_s=0.00005, per_token_s=0.0)


def view(rid: str, tenant: str | None, state: RequestState = R, **kw: object) -> RequestView:
    """A request of ``tenant`` on its adapter ``tenant/a`` (none: the base model)."""
    return policyviews.view(rid, state, f"{tenant}/a" if tenant is not None else None, tenant,
                            **{"max_tokens": 128, **kw})


def flood_and_steady(flood: int = 32, steady: int = 2) -> list[RequestView]:
    return ([view(f"f{i}", "flood", generated_tokens=i) for i in range(flood)]
            + [view(f"s{i}", "steady", W, arrival=1.0) for i in range(steady)])


def shared(views: list[RequestView], cost: StepCost | None, now: float = 2.0,
           p: TokenFlowParams | None = None):
    cap = Capacity(max_running=64, max_loras=64, step_cost=cost)
    plan = decide_with_batch_share(decide_fcfs, views, cap, now, p)
    return plan, {d.request_id: d for d in plan.decisions}


def in_batch(plan, tenant: str) -> int:
    return sum(1 for d in plan.with_action(Action.KEEP_RUNNING, Action.ADMIT, Action.RESUME)
               if d.request_id.startswith(tenant[0]))


def test_the_cap_is_the_largest_that_keeps_the_smallest_tenant_within_the_slowdown():
    # steady's 2 alone: 0.114 s; 1.5x = 0.171 s; 2 + 3 sequences: 0.165 s, 2 + 4: 0.182 s.
    assert tenant_batch_cap({"flood": 32, "steady": 2}, CPU, 1.5) == 3
    assert tenant_batch_cap({"flood": 32}, CPU, 1.5) is None  # alone: everything
    assert tenant_batch_cap({"flood": 32, "steady": 2}, CPU, 0) is None  # off
    # Similar sizes are not cut, however slow their shared batch.
    assert tenant_batch_cap({"a": 16, "b": 16}, CPU, 1.5) is None
    # Never below the smallest tenant's demand.
    assert tenant_batch_cap({"a": 30, "b": 8, "c": 8}, CPU, 1.5) == 8
    # On a GPU-like step cost the flood keeps everything.
    assert tenant_batch_cap({"flood": 32, "steady": 2}, GPU, 1.5) is None


def test_a_flood_is_paused_down_to_the_cap_while_a_small_tenant_competes():
    plan, d = shared(flood_and_steady(), CPU)
    assert in_batch(plan, "flood") == 3 and in_batch(plan, "steady") == 2
    # The flood keeps its running requests with the most tokens done (least work lost).
    assert {r for r in plan.to_start} == {"s0", "s1"}
    kept = {x.request_id for x in plan.with_action(Action.KEEP_RUNNING)}
    assert kept == {"f31", "f30", "f29"}
    assert d["f0"].action is Action.PAUSE and d["f0"].reason is Reason.TENANT_BATCH_SHARE
    # Under the cap the predicted step is within 1.5x of steady's step alone.
    assert CPU.step_s(5, 5) <= 1.5 * CPU.step_s(2, 2)


def test_today_the_flood_keeps_every_sequence():
    """What 0025 measured (TPOT 7x): without the cap all 32 run beside steady's 2."""
    off = TokenFlowParams(tenant_max_slowdown=0)
    plan, _ = shared(flood_and_steady(), CPU, p=off)
    assert in_batch(plan, "flood") == 32


def test_nothing_changes_alone_without_a_step_cost_or_on_a_flat_step():
    views = flood_and_steady(steady=0)
    assert in_batch(shared(views, CPU)[0], "flood") == 32
    assert in_batch(shared(flood_and_steady(), None)[0], "flood") == 32
    assert in_batch(shared(flood_and_steady(), GPU)[0], "flood") == 32


def test_a_request_restarted_after_a_pause_keeps_running_for_min_run_s():
    views = flood_and_steady()
    views[0] = view("f0", "flood", generated_tokens=0, num_pauses=1, running_since=1.5)
    p = TokenFlowParams(min_run_s=2.0)
    plan, d = shared(views, CPU, now=2.0, p=p)
    assert d["f0"].action is Action.KEEP_RUNNING
    plan, d = shared(views, CPU, now=3.6, p=p)
    assert d["f0"].action is Action.PAUSE


def test_paused_and_waiting_flood_requests_are_held_and_come_back_when_the_rival_leaves():
    views = ([view(f"f{i}", "flood") for i in range(3)]
             + [view(f"p{i}", "flood", P, generated_tokens=5, paused_since=1.0,
                     first_token_time=0.5) for i in range(4)]
             + [view("fw", "flood", W, arrival=1.5), view("s0", "steady", arrival=0.5)])
    plan, d = shared(views, CPU)
    assert d["p0"].action is Action.KEEP_PAUSED and d["fw"].action is Action.DEFER
    assert d["p0"].reason is Reason.TENANT_BATCH_SHARE
    plan, d = shared([v for v in views if v.tenant != "steady"], CPU)
    assert {"p0", "p1", "p2", "p3", "fw"} <= set(plan.to_start)


def test_above_the_cap_no_request_waits_or_stays_paused_past_the_policies_bounds():
    """The cap holds a tenant's extra requests, but no longer than ``max_wait_s`` for a first
    token or ``max_pause_s`` for the next: above the cap they rotate."""
    p = TokenFlowParams()
    views = ([view(f"f{i}", "flood", generated_tokens=50 + i) for i in range(6)]
             + [view("fw", "flood", W, arrival=0.0),
                view("fp", "flood", P, generated_tokens=5, paused_since=1.0, first_token_time=0.5),
                view("s0", "steady", arrival=0.5)])
    _, d = shared(views, CPU, now=2.0, p=p)
    assert d["fw"].action is Action.DEFER and d["fp"].action is Action.KEEP_PAUSED
    _, d = shared(views, CPU, now=p.max_wait_s + 0.1, p=p)
    assert d["fw"].action is Action.ADMIT and d["fp"].action is Action.KEEP_PAUSED
    _, d = shared(views, CPU, now=1.0 + p.max_pause_s + 0.1, p=p)
    assert d["fp"].action is Action.RESUME


def test_a_tenant_whose_request_just_ended_still_counts_so_the_flood_is_not_resumed_between():
    views = flood_and_steady(steady=0)
    cap = Capacity(max_running=64, max_loras=64, step_cost=CPU)
    allowed, held = hold_above_cap(views, cap, 2.0, None, lingering={"steady": 2})
    assert len(allowed) == 3 and all(d.action is Action.PAUSE for d in held)
    # Gone for longer (the scheduler stops passing it): the flood has everything again.
    allowed, held = hold_above_cap(views, cap, 2.0, None, lingering={})
    assert len(allowed) == 32 and not held


@st.composite
def snapshots(draw):
    views: list[RequestView] = []
    for t in draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True)):
        for i in range(draw(st.integers(1, 24))):
            state = draw(st.sampled_from([W, R, P]))
            views.append(view(f"{t}{i}", t, state, arrival=draw(st.floats(0, 5)),
                              generated_tokens=0 if state is W else draw(st.integers(1, 50)),
                              paused_since=1.0 if state is P else None,
                              num_pauses=draw(st.integers(0, 1)) if state is R else 0,
                              running_since=draw(st.floats(0, 6)) if state is R else None))
    cost = StepCost(draw(st.floats(0.001, 0.2)), draw(st.floats(0, 0.05)), 0.0)
    return views, cost, draw(st.sampled_from([1.0, 1.2, 1.5, 3.0])), draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_invariants_one_decision_each_nobody_starved_nobody_below_a_smaller_tenant(snap):
    views, cost, slowdown, tokenflow = snap
    now, p = 6.0, TokenFlowParams(tenant_max_slowdown=slowdown)
    cap = Capacity(max_running=256, max_loras=64, step_cost=cost)
    allowed, held = hold_above_cap(views, cap, now, p)
    assert sorted([v.request_id for v in allowed] + [d.request_id for d in held]) \
        == sorted(v.request_id for v in views)

    def policy(vs, c, t):
        return decide_tokenflow(vs, c, t, p) if tokenflow else decide_fcfs(vs, c, t)
    plan = decide_with_batch_share(policy, views, cap, now, p)
    assert sorted(d.request_id for d in plan.decisions) == sorted(v.request_id for v in views)
    state = {v.request_id: v for v in views}
    demand = Counter(v.tenant for v in views)
    smallest = min(demand.values())
    for t, d in demand.items():
        # Nobody is cut below the smallest tenant's demand, nor to nothing.
        assert sum(1 for v in allowed if v.tenant == t) >= min(d, max(1, smallest))
    for d in held:
        assert d.reason is Reason.TENANT_BATCH_SHARE
        v = state[d.request_id]
        # Requests restarted after a pause less than min_run_s ago are never held.
        assert not (v.state is R and v.num_pauses > 0 and v.running_since is not None
                    and now - v.running_since < p.min_run_s)
    # Where it cut, the predicted step is within the slowdown of the smallest tenant's.
    if held:
        c = tenant_batch_cap(demand, cost, slowdown)
        assert c is not None and len(demand) > 1
        n = sum(min(d, c) for d in demand.values())
        assert c == smallest or cost.step_s(n, n) <= slowdown * cost.step_s(smallest, smallest)


def test_the_knob_is_zero_or_at_least_one():
    with pytest.raises(ValueError, match="tenant_max_slowdown"):
        TokenFlowParams(tenant_max_slowdown=0.5)


def test_a_capped_tenant_keeps_its_sequences_on_the_fewest_adapters():
    flood = [RequestView(request_id=f"f{i}", state=R, adapter_id=f"flood/x{i % 4}", tenant="flood",
                         arrival=0.0, prompt_tokens=20, max_tokens=128,
                         generated_tokens=100 if i % 4 == 3 else 10) for i in range(12)]
    flood.append(RequestView(request_id="f12", state=R, adapter_id="flood/x1", tenant="flood",
                             arrival=0.0, prompt_tokens=20, max_tokens=128))
    plan, _ = shared([*flood, view("s0", "steady", W, arrival=1.0)], CPU)
    kept = {d.request_id for d in plan.with_action(Action.KEEP_RUNNING)}
    # Beside steady's 1 the cap is 2: both on x1, where the flood runs the most (4).
    assert {f.adapter_id for f in flood if f.request_id in kept} == {"flood/x1"}
