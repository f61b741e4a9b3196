"""Per-tenant share of the running batch: a tenant with many sequences is paused down to a
cap while a smaller tenant competes, so the smaller one's steps stay near their alone speed.

Boundary: pure, like ``policy`` and ``slots``: views and capacity in, the views the policy
may schedule and decisions for the rest out, ``now`` passed in. It runs first (before the
policy, fcfs or tokenflow, and slot admission); the vLLM scheduler subclass applies the
result.

Why: a decode step's time grows with the batch (on the CPU steeply, on a GPU once
compute-bound; ``Capacity.step_cost`` is that cost, learned from the engine's own steps). A
tenant running 2 streams next to a flood of 32 sequences waits for steps of 34: 5.8-7x its
TPOT alone on a 2-core CPU (docs/decisions/0025-tenant-fairness.md). Batch seats alone are no
answer: an equal share of 64 seats still lets the flood run 32.

The rule (``TokenFlowParams.tenant_max_slowdown`` = ``s``; 0 turns it off):
- A tenant's *demand* is how many of its requests the step sees (running, waiting, paused),
  base-model requests included: the engine tells the scheduler who sent each request.
  Requests with no tenant (none given) are not counted.
- With two or more tenants, every tenant may run at most ``c`` sequences, ``c`` the largest
  number such that a decode step of everyone's ``min(demand, c)`` sequences is predicted to
  take at most ``s`` times the step of the smallest tenant's sequences alone. ``c`` is never
  below the smallest tenant's demand (max-min fair: nobody is cut below what a smaller
  tenant runs; tenants of similar size are not cut at all, however slow the batch), nor
  below one.
- A tenant whose last request ended less than ``tenant_linger_s`` ago still counts, with
  the demand it had (the scheduler remembers it): a client's next request (a closed loop,
  a conversation's next turn) comes just after its last one ends, and lifting the cap in
  between resumes the flood's paused sequences by recompute, a long step that the next
  request's first token then waits for.
- A tenant alone, an unknown step cost, or a batch within the bound: nothing changes. On a
  GPU, where a decode step costs about the same up to a large batch, the cap rarely binds.
- Which of a capped tenant's requests the policy may schedule: those it started again less
  than ``min_run_s`` ago after a pause (no thrash: a request makes progress between two
  pauses) and those kept waiting past ``max_wait_s`` or paused past ``max_pause_s`` (the
  policies' own bounds: no request of a capped tenant waits for its first token, or for its
  next, without bound; above the cap they rotate),
  then its running ones, then its paused ones (longest paused first), then its waiting ones
  (oldest first); within each, those on the adapter where it runs the most sequences first
  (fewest distinct adapters in the step), and among running ones those with the most tokens
  done (least work lost). The rest pause or wait
  (``TENANT_BATCH_SHARE``) and run again as the cap rises or its own requests end; the cap
  never reaches zero, so the tenant is never starved.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from .model import (
    Action,
    Capacity,
    Decision,
    Plan,
    Reason,
    RequestState,
    RequestView,
    StepCost,
    TokenFlowParams,
)
from .policy import Policy
from .slots import recently_restarted


def tenant_batch_cap(demand: Mapping[str, int], cost: StepCost, max_slowdown: float) -> int | None:
    """Most sequences each tenant may run this step (``None``: no cap needed)."""
    if len(demand) < 2 or max_slowdown <= 0:
        return None
    smallest, largest = max(1, min(demand.values())), max(demand.values())
    bound = max_slowdown * cost.step_s(smallest, smallest)
    for c in range(largest, smallest - 1, -1):
        n = sum(min(d, c) for d in demand.values())
        if cost.step_s(n, n) <= bound:
            return None if c >= largest else c
    return smallest if smallest < largest else None


def hold_above_cap(
    views: Iterable[RequestView], cap: Capacity, now: float, params: TokenFlowParams | None = None,
    lingering: Mapping[str, int] | None = None,
) -> tuple[list[RequestView], tuple[Decision, ...]]:
    """The requests the policy may schedule this step, and decisions for those held above
    the cap (running: paused; paused: kept paused; waiting: deferred). ``lingering``: the
    demand of tenants with no request now whose last one ended less than
    ``tenant_linger_s`` ago; they still count."""
    p = params or TokenFlowParams()
    vs = list(views)
    if cap.step_cost is None or p.tenant_max_slowdown <= 0:
        return vs, ()
    demand: Counter[str] = Counter(v.tenant for v in vs if v.tenant is not None)
    for t, n in (lingering or {}).items():
        if t not in demand and n > 0:
            demand[t] = n
    c = tenant_batch_cap(demand, cap.step_cost, p.tenant_max_slowdown)
    if c is None:
        return vs, ()

    # A capped tenant keeps its sequences on as few adapters as it can: each distinct adapter
    # adds LoRA work to every step (a few ms on the CPU in process, 0025).
    on_adapter: Counter[str | None] = Counter(v.adapter_id for v in vs
                                              if v.state is RequestState.RUNNING)

    def rank(v: RequestView) -> tuple[int, int, str, float, str]:
        grouped = (-on_adapter[v.adapter_id], v.adapter_id or "")
        if v.state is RequestState.RUNNING:
            shielded = recently_restarted(v, now, p.min_run_s)
            return (0 if shielded else 1, *grouped, -v.generated_tokens, v.request_id)
        paused = v.state is RequestState.PAUSED
        since = v.paused_since if paused and v.paused_since is not None else v.arrival
        # The policies' own bounds hold under the cap too: a request kept out past them runs.
        overdue = now - since >= (p.max_pause_s if paused else p.max_wait_s)
        return (0 if overdue else 2 if paused else 3, *grouped, since, v.request_id)

    over: set[str] = set()
    for t in (t for t, d in demand.items() if d > c):
        mine = sorted((v for v in vs if v.tenant == t), key=rank)
        over.update(v.request_id for i, v in enumerate(mine) if i >= c and rank(v)[0] != 0)
    held = {RequestState.RUNNING: Action.PAUSE, RequestState.PAUSED: Action.KEEP_PAUSED,
            RequestState.WAITING: Action.DEFER}
    return ([v for v in vs if v.request_id not in over],
            tuple(Decision(v.request_id, held[v.state], Reason.TENANT_BATCH_SHARE)
                  for v in vs if v.request_id in over))


def decide_with_batch_share(
    policy: Policy, views: Iterable[RequestView], cap: Capacity, now: float,
    params: TokenFlowParams | None = None, lingering: Mapping[str, int] | None = None,
) -> Plan:
    """``policy``'s plan over the requests within the cap, plus the held ones' decisions.
    The cap applies first so that the policy's own limits (batch seats, the reading-rate
    cap) fill the batch from what remains: applied after, a policy that admits in arrival
    order would have given the seats to the flood and the cap would then leave them empty."""
    allowed, held = hold_above_cap(views, cap, now, params, lingering)
    return Plan(policy(allowed, cap, now).decisions + held)
