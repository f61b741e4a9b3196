"""Per-tenant share of the running batch: a tenant with many sequences is paused down to a
cap while a smaller tenant competes, so the smaller one's steps stay near their alone speed.

Boundary: pure, like ``policy`` and ``slots``: a :class:`Plan`, views and capacity in, a
narrower plan out, ``now`` passed in. It runs last (after the policy and slot admission);
the vLLM scheduler subclass applies the result.

Why: a decode step's time grows with the batch (on the CPU steeply, on a GPU once
compute-bound; ``Capacity.step_cost`` is that cost, learned from the engine's own steps). A
tenant running 2 streams next to a flood of 32 sequences waits for steps of 34: 5.8-7x its
TPOT alone on a 2-core CPU (docs/decisions/0025-tenant-fairness.md). Batch seats alone are no
answer: an equal share of 64 seats still lets the flood run 32.

The rule (``TokenFlowParams.tenant_max_slowdown`` = ``s``; 0 turns it off):
- A tenant's *demand* is how many of its requests the step sees (running, waiting, paused).
  Requests with no tenant (the base model) are not counted.
- With two or more tenants, every tenant may run at most ``c`` sequences, ``c`` the largest
  number such that a decode step of everyone's ``min(demand, c)`` sequences is predicted to
  take at most ``s`` times the step of the smallest tenant's sequences alone. ``c`` is never
  below the smallest tenant's demand (max-min fair: nobody is cut below what a smaller
  tenant runs; tenants of similar size are not cut at all, however slow the batch), nor
  below one.
- A tenant alone, an unknown step cost, or a batch within the bound: nothing changes. On a
  GPU, where a decode step costs about the same up to a large batch, the cap rarely binds.
- Which of a capped tenant's requests run: those it started again less than ``min_run_s``
  after a pause (no thrash: a request makes progress between two pauses), then its running
  ones with the most tokens done (least work lost), then its starts in the plan's order. The
  rest pause or wait (``TENANT_BATCH_SHARE``) and run again as the cap rises or its own
  requests end; the cap never reaches zero, so the tenant is never starved.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from .model import Action, Capacity, Decision, Plan, Reason, RequestView, StepCost, TokenFlowParams
from .slots import recently_restarted

_IN_BATCH = (Action.KEEP_RUNNING, Action.ADMIT, Action.RESUME)


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
    return smallest


def decide_batch_share(
    plan: Plan, views: Iterable[RequestView], cap: Capacity, now: float,
    params: TokenFlowParams | None = None,
) -> Plan:
    """``plan`` with the sequences of tenants above the batch cap paused or held back."""
    p = params or TokenFlowParams()
    if cap.step_cost is None or p.tenant_max_slowdown <= 0:
        return plan
    by_id = {v.request_id: v for v in views}
    demand: Counter[str] = Counter(v.tenant for v in by_id.values() if v.tenant is not None)
    c = tenant_batch_cap(demand, cap.step_cost, p.tenant_max_slowdown)
    if c is None:
        return plan
    capped = {t for t, d in demand.items() if d > c}

    def rank(d: Decision) -> tuple[int, int, int]:
        v = by_id[d.request_id]
        if d.action is Action.KEEP_RUNNING:
            shielded = recently_restarted(v, now, p.min_run_s)
            return (0 if shielded else 1, -v.generated_tokens, 0)
        return (2, 0, 0)  # sorted() is stable: starts keep the plan's order

    over: set[str] = set()
    for t in capped:
        mine = sorted((d for d in plan.decisions if d.action in _IN_BATCH
                       and d.request_id in by_id and by_id[d.request_id].tenant == t), key=rank)
        over.update(d.request_id for i, d in enumerate(mine)
                    if i >= c and rank(d)[0] != 0)
    if not over:
        return plan
    held = {Action.KEEP_RUNNING: Action.PAUSE, Action.ADMIT: Action.DEFER,
            Action.RESUME: Action.KEEP_PAUSED}
    return Plan(tuple(d for d in plan.decisions if d.request_id not in over)
                + tuple(Decision(d.request_id, held[d.action], Reason.TENANT_BATCH_SHARE)
                        for d in plan.decisions if d.request_id in over))
