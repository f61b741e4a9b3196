"""Adapter-slot admission: which adapter requests may take one of a replica's LoRA slots.

Boundary: pure, like ``policy``: plain views in, a :class:`Plan` out, ``now`` passed in. It
runs after either policy (fcfs or tokenflow) and only narrows that plan's start list; the
vLLM scheduler subclass applies the result.

A slot holds one adapter for the running batch (vLLM's ``max_loras``); an adapter keeps its
slot while any of its requests runs. The rules (docs/decisions/0022-lora-slots.md):

1. A request whose adapter already holds a slot joins the batch in the plan's order: the
   batch fills from resident adapters, as vLLM's own admission does.
2. A new adapter takes a free slot, in the plan's order, unless its tenant's adapters already
   hold ``tenant_share`` of the slots while another tenant has adapter requests running or
   waiting (``TENANT_SLOT_SHARE``; a tenant alone may use every slot, and any tenant at least
   one). This rule pauses nothing: it bounds what a tenant *adds*; rule 4 takes slots back.
3. No request waits for a slot without bound. One that has waited ``wait_s`` (since arrival,
   or since it was paused) goes first, and when every slot is taken the resident adapter that
   will free soonest (a tenant above its share first, then the fewest running requests, then
   the fewest tokens left) takes no new requests until it drains (``LORA_DRAIN``). Without
   that, a closed loop of requests for resident adapters keeps every slot busy forever.
4. A tenant below its share that asks for a slot when none is free takes one at once from
   another tenant above its share: that adapter's running requests are paused
   (``LORA_PREEMPT``; vLLM's recompute preemption, or a KV offload where the connector is
   on), so the slot frees within the step. Draining alone is not enough: a flood of
   ``ignore_eos`` requests held every slot for ~90 s after the wait bound (0025). Against
   thrash, a request paused before and started again less than ``preempt_min_run_s`` ago is
   not paused again (its adapter is not chosen); against starvation, the paused requests
   wait as any paused request does: they go first once overdue (rule 3), and take a slot at
   once when the rival tenant leaves.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .model import Action, Capacity, Decision, Plan, Reason, RequestState, RequestView


@dataclass(frozen=True)
class SlotParams:
    """Knobs of adapter-slot admission (``EngineSettings.lora_slot_wait_s`` and
    ``lora_tenant_slot_share``)."""

    wait_s: float = 2.0
    """A request kept waiting this long for a slot gets the next one (a slot drains for it)."""
    tenant_share: float = 0.5
    """Most of the slots one tenant's adapters may hold while another tenant is active."""
    preempt_min_run_s: float = 2.0
    """A request paused before and started again less than this long ago is not paused for
    another tenant's slot (rule 4): it makes progress between two pauses."""

    def __post_init__(self) -> None:
        if not self.wait_s > 0:
            raise ValueError(f"wait_s must be > 0, got {self.wait_s}")
        if not 0 < self.tenant_share <= 1:
            raise ValueError(f"tenant_share must be in (0, 1], got {self.tenant_share}")
        if not self.preempt_min_run_s >= 0:
            raise ValueError(f"preempt_min_run_s must be >= 0, got {self.preempt_min_run_s}")


def tenant_slot_limit(max_loras: int, share: float, active_tenants: int) -> int:
    """Slots one tenant may hold: all of them alone, else ``share`` of them (at least one)."""
    if active_tenants <= 1:
        return max_loras
    return max(1, math.floor(share * max_loras + 1e-9))


def waited_s(v: RequestView, now: float) -> float:
    """How long a request not running has been kept out of the batch."""
    since = v.paused_since if v.state is RequestState.PAUSED and v.paused_since is not None \
        else v.arrival
    return now - since


def _drain_victim(
    running: list[RequestView], candidates: set[str], over_share: set[str],
) -> str | None:
    """The resident adapter (of ``candidates``) that will free its slot soonest."""
    load: dict[str, tuple[int, int]] = {}
    for v in running:
        if v.adapter_id in candidates:
            n, left = load.get(v.adapter_id, (0, 0))
            load[v.adapter_id] = (n + 1, left + max(0, v.max_tokens - v.generated_tokens))
    if not load:
        return None
    return min(load, key=lambda a: (a not in over_share, *load[a], a))


def recently_restarted(v: RequestView, now: float, min_run_s: float) -> bool:
    """A running request paused before and started again less than ``min_run_s`` ago."""
    return v.num_pauses > 0 and v.running_since is not None and now - v.running_since < min_run_s


def _preempt_victim(
    running: list[RequestView], candidates: set[str], now: float, min_run_s: float,
) -> str | None:
    """The adapter of ``candidates`` whose slot costs least to free now (fewest running
    requests, then fewest tokens done), skipping adapters with a request just restarted."""
    cost: dict[str, tuple[int, int]] = {}
    shielded: set[str] = set()
    for v in running:
        if v.adapter_id in candidates:
            n, done = cost.get(v.adapter_id, (0, 0))
            cost[v.adapter_id] = (n + 1, done + v.generated_tokens)
            if recently_restarted(v, now, min_run_s):
                shielded.add(v.adapter_id)
    return min((a for a in cost if a not in shielded), key=lambda a: (*cost[a], a), default=None)


def _as_start(d: Decision) -> Decision:
    """A held decision turned into the start it would be."""
    if d.action is Action.DEFER:
        return Decision(d.request_id, Action.ADMIT, d.reason)
    if d.action is Action.KEEP_PAUSED:
        return Decision(d.request_id, Action.RESUME, d.reason)
    return d


def decide_slots(
    plan: Plan, views: Iterable[RequestView], cap: Capacity, now: float,
    params: SlotParams | None = None,
) -> Plan:
    """``plan`` with adapter requests that may not take a slot this step deferred (or kept
    paused), requests overdue for a slot moved to the front of the start order, and the
    running requests of an adapter whose slot a tenant below its share takes paused."""
    p = params or SlotParams()
    by_id = {v.request_id: v for v in views}
    running = [by_id[d.request_id] for d in plan.decisions
               if d.action is Action.KEEP_RUNNING and d.request_id in by_id]
    # Candidates: the plan's starts, and those it held back for want of a slot only (this
    # pass decides slots, with the wait bound the policy's own check lacks).
    starting = [_as_start(d) for d in plan.decisions if d.action in (Action.ADMIT, Action.RESUME)
                or d.reason is Reason.LORA_SLOTS_FULL]
    if not starting:
        return plan
    candidates = {d.request_id for d in starting}
    resident: set[str] = {v.adapter_id for v in running if v.adapter_id is not None}
    owner: dict[str, str | None] = {v.adapter_id: v.tenant for v in by_id.values()
                                    if v.adapter_id is not None}
    active = {v.tenant for v in by_id.values() if v.adapter_id is not None}
    limit = tenant_slot_limit(cap.max_loras, p.tenant_share, len(active))
    held: Counter[str | None] = Counter(owner[a] for a in resident)
    over_share = {a for a in resident if held[owner[a]] > limit}

    def overdue(v: RequestView) -> bool:
        return v.adapter_id is not None and v.adapter_id not in resident \
            and waited_s(v, now) >= p.wait_s

    # Overdue requests first (longest wait first), then the plan's order.
    first = sorted((d for d in starting if overdue(by_id[d.request_id])),
                   key=lambda d: (-waited_s(by_id[d.request_id], now), d.request_id))
    first_ids = {d.request_id for d in first}
    order = first + [d for d in starting if d.request_id not in first_ids]

    slots = set(resident)
    draining: set[str] = set()
    evicted: set[str] = set()  # resident adapters whose running requests are paused (rule 4)
    started: list[Decision] = []
    deferred: list[Decision] = []

    def defer(d: Decision, reason: Reason) -> None:
        action = Action.KEEP_PAUSED if d.action is Action.RESUME else Action.DEFER
        deferred.append(Decision(d.request_id, action, reason))

    for d in order:
        v = by_id[d.request_id]
        a = v.adapter_id
        if a is None:
            started.append(d)
            continue
        if a in evicted:
            defer(d, Reason.LORA_PREEMPT)
            continue
        if a in slots:
            if a in draining:
                defer(d, Reason.LORA_DRAIN)
            else:
                started.append(d)
            continue
        at_share = len(active) > 1 and held[v.tenant] >= limit
        if not at_share and len(slots) >= cap.max_loras:
            # Rule 4: a tenant below its share takes a slot from a tenant above it.
            rivals = {r for r in slots - draining - evicted
                      if owner[r] != v.tenant and held[owner[r]] > limit}
            victim = _preempt_victim(running, rivals, now, p.preempt_min_run_s)
            if victim is not None:
                evicted.add(victim)
                slots.discard(victim)
                held[owner[victim]] -= 1
        if not at_share and len(slots) < cap.max_loras:
            slots.add(a)
            held[v.tenant] += 1
            started.append(d)
            continue
        if d.request_id in first_ids:
            # A slot must free for it: its own tenant's, when the tenant is at its share.
            pool = {r for r in resident if owner[r] == v.tenant} if at_share else set(resident)
            if not draining & pool:
                victim = _drain_victim(running, pool - draining, over_share)
                if victim is not None:
                    draining.add(victim)
        defer(d, Reason.TENANT_SLOT_SHARE if at_share else Reason.LORA_SLOTS_FULL)

    # Requests of a draining adapter that were already accepted above (before the drain was
    # chosen) wait too: the slot only frees if nothing new joins it.
    kept: list[Decision] = []
    for d in started:
        a = by_id[d.request_id].adapter_id
        if a in evicted:
            defer(d, Reason.LORA_PREEMPT)
        elif a in draining:
            defer(d, Reason.LORA_DRAIN)
        else:
            kept.append(d)
    untouched = [d for d in plan.decisions if d.request_id not in candidates]
    keep_running = [d for d in untouched if d.action is Action.KEEP_RUNNING]
    paused = tuple(Decision(d.request_id, Action.PAUSE, Reason.LORA_PREEMPT)
                   for d in keep_running if by_id[d.request_id].adapter_id in evicted)
    return Plan(tuple(d for d in keep_running if by_id[d.request_id].adapter_id not in evicted)
                + tuple(kept)
                + tuple(d for d in untouched if d.action is not Action.KEEP_RUNNING)
                + paused + tuple(deferred))
