"""The TokenFlow policy (and stock FCFS) as pure functions over request views.

Boundary: pure. ``now`` is passed in; nothing here reads a clock, the environment or vLLM.
The vLLM scheduler subclass (``vllm_scheduler``) only translates a :class:`Plan`.

The idea (see docs/scheduling.md): a streaming client reading ``c`` tokens/s, first token at
``t0``, ``g`` tokens generated, holds ``b = max(0, g - c (now - t0))`` tokens; it stalls in
``b / c`` seconds. Every request gets a *slack*: how long it can go without service before a
user notices. New requests: until their TTFT target; running/paused streams: their
time-to-stall (paused ones minus their resume cost and a margin); non-streaming: time to their
deadline minus the time their remaining tokens need. Slots go to the smallest slack first,
within batch slots, KV blocks and ``max_loras`` distinct adapters. Running requests whose buffer
is short are never paused for a rival; a request waiting or paused past a bound goes first (no
starvation).

Rotation only works while the engine feeds every running stream faster than its reader.
A *reading-rate cap* keeps it so: the streams kept running (those with a first token) may
together read at most ``1 - rate_headroom`` of what a batch of that size generates
(``Capacity.step_cost``, learned from the engine's steps), so each one gains buffer while it
runs. Newcomers are exempt until their first token (TTFT stays short); then they queue with
the paused streams. Streams that need to run (short buffer, or paused and due) get the cap in
arrival order, so nobody is overtaken by a younger stream and nobody trades places every step;
streams with buffer to spare take what is left, and yield their slot (``buffer_long``).
Refused streams pause or stay paused with reason ``rate_cap``. When the cap has room for
everyone no decision differs from the policy without it.

Between streams already started, a stream admitted or resumed less than ``min_run_s`` ago
ranks just ahead of the most urgent paused one: it yields its slot to newcomers and overdue
requests, not to a paused stream (ranking by slack alone swapped pairs every ~0.4 s).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import UnknownPolicyError
from .model import (
    Action,
    Capacity,
    Decision,
    Plan,
    Reason,
    RequestState,
    RequestView,
    TokenFlowParams,
)

__all__ = [
    "POLICIES",
    "Policy",
    "advance_reader",
    "buffer_occupancy",
    "decide_fcfs",
    "decide_tokenflow",
    "make_policy",
    "time_to_stall",
]

Policy = Callable[[Iterable[RequestView], Capacity, float], Plan]


def time_to_stall(v: RequestView, now: float) -> float:
    """Seconds until the client's reader runs dry; negative: how long it has been waiting.

    The reader reads the first token when it arrives and then ``c`` tokens/s; it needs token
    ``g + 1`` at ``reader_at + (g - reader_tokens) / c``. ``inf`` for non-streaming requests,
    0 before the first token."""
    if not v.streaming:
        return math.inf
    if v.first_token_time is None or v.generated_tokens <= 0:
        return 0.0
    at = v.reader_at if v.reader_at is not None else v.first_token_time
    return at + (v.generated_tokens - v.reader_tokens) / v.consumption_rate - now


def buffer_occupancy(v: RequestView, now: float) -> float:
    """Tokens in the client's buffer (never below 0; 0 before the first token)."""
    tts = time_to_stall(v, now)
    return 0.0 if math.isinf(tts) else max(0.0, tts * v.consumption_rate)


def advance_reader(
    reader_tokens: float, reader_at: float, delivered: int, rate: float, now: float
) -> tuple[float, float]:
    """The reader model once more tokens arrive at ``now`` after ``delivered`` ones.

    A reader that ran dry before ``now`` waited at ``delivered`` and reads on from ``now``
    (its schedule shifts, as the load test's simulated reader does); otherwise nothing moves.
    """
    if reader_at + (delivered - reader_tokens) / rate < now:
        return float(delivered), now
    return reader_tokens, reader_at


def deadline_of(v: RequestView, p: TokenFlowParams) -> float:
    """When a non-streaming request's whole answer is due."""
    if v.deadline is not None:
        return v.deadline
    return v.arrival + p.nonstream_ttft_s + p.nonstream_tpot_s * v.max_tokens


def resume_cost_s(v: RequestView, p: TokenFlowParams) -> float:
    """Seconds to bring a paused request's context back (recompute estimate, conservative)."""
    return v.context_tokens / p.prefill_tokens_per_s


@dataclass(frozen=True)
class _Scored:
    view: RequestView
    forced: bool
    slack: float
    reason: Reason


def _score(v: RequestView, now: float, p: TokenFlowParams, running_adapters: set[str]) -> _Scored:
    """Slack (seconds before a user would notice) and why, for one request."""
    adapter_cost = (
        p.adapter_load_cost_s
        if v.adapter_id is not None and v.adapter_id not in running_adapters
        and v.state is not RequestState.RUNNING
        else 0.0
    )
    if v.state is RequestState.WAITING:
        if now - v.arrival >= p.max_wait_s:
            return _Scored(v, True, -math.inf, Reason.WAIT_BOUND)
        if v.streaming:
            return _Scored(v, False, v.arrival + p.ttft_target_s - now + adapter_cost,
                           Reason.TTFT_URGENCY)
        slack = deadline_of(v, p) - now - (v.max_tokens * p.tpot_estimate_s)
        return _Scored(v, False, slack + adapter_cost, Reason.DEADLINE)
    remaining = max(0, v.max_tokens - v.generated_tokens)
    if v.streaming:
        slack = time_to_stall(v, now)
        reason = Reason.BUFFER_DRAINING
    else:
        slack = deadline_of(v, p) - now - remaining * p.tpot_estimate_s
        reason = Reason.DEADLINE
    if v.streaming:
        # Paused or not, a stream is compared by when it would have to be resumed: a running
        # one that is paused now pays the same resume later. Comparing raw buffers instead
        # made two streams with similar buffers trade places every step (bench burst-heavy:
        # 1,819 pauses in 137 s).
        slack -= p.resume_margin_s + resume_cost_s(v, p)
    if v.state is RequestState.PAUSED:
        since = v.paused_since if v.paused_since is not None else now
        if now - since >= p.max_pause_s:
            return _Scored(v, True, -math.inf, Reason.PAUSE_BOUND)
        slack -= adapter_cost
    else:
        # Running: incumbents keep their slot unless a rival is clearly more urgent.
        slack -= p.switch_hysteresis_s
    return _Scored(v, False, slack, reason)


def _protected(v: RequestView, now: float, p: TokenFlowParams) -> Reason | None:
    """Why a running request must not be paused now (``None``: it may be)."""
    if v.streaming and v.first_token_time is None:
        return Reason.AWAITING_FIRST_TOKEN
    if v.num_pauses >= p.max_pauses_per_request:
        return Reason.PAUSE_LIMIT
    if v.streaming:
        if time_to_stall(v, now) <= p.pause_min_buffer_s:
            return Reason.BUFFER_SHORT
        return None
    remaining = max(0, v.max_tokens - v.generated_tokens)
    if deadline_of(v, p) - now - remaining * p.tpot_estimate_s <= p.pause_min_buffer_s:
        return Reason.DEADLINE
    return None


def blocks_needed(v: RequestView, block_size: int) -> int:
    """KV blocks the request holds after its next token."""
    return -(-(v.context_tokens + 1) // block_size)


def reads(v: RequestView) -> float:
    """Tokens/s this request's reader takes from the engine once it streams (0 before its
    first token, and for non-streaming requests)."""
    return v.consumption_rate if v.streaming and v.generated_tokens > 0 else 0.0


def fits(cap: Capacity, p: TokenFlowParams, sequences: int, demand: float, add: float) -> bool:
    """Whether a batch of ``sequences`` can feed readers taking ``demand + add`` tokens/s in
    all, with ``rate_headroom`` to spare. Always when the step cost is unknown, and for the
    first reader of a batch: one stream the engine cannot keep up with still runs (alone)."""
    if cap.step_cost is None or p.rate_headroom >= 1.0 or add <= 0 or demand <= 0:
        return True
    total = demand + add
    return total <= (1.0 - p.rate_headroom) * cap.step_cost.decode_tokens_per_s(max(1, sequences))


def rate_cap_winners(
    reqs: list[RequestView], kept: list[RequestView], scored: dict[str, _Scored],
    cap: Capacity, p: TokenFlowParams,
) -> set[str] | None:
    """Started streams the reading-rate cap lets run (``None``: no cap).

    ``kept`` run whatever happens (counted first). Then the streams that need to run now,
    in arrival order: running ones whose buffer is short, paused ones due to resume (slack
    <= 0) or overdue; the first that does not fit ends the list (FCFS among them: nobody is
    overtaken by a younger stream, and the order is stable, so nobody trades places every
    step). Then, while room is left, streams with buffer to spare, most urgent first.

    A stream whose reader is faster than the engine can generate for one stream alone cannot
    be kept on time at any batch size: the cap does not hold it back (holding it back would
    only shrink the batch, down to one stream, and cut throughput for no on-time token)."""
    if cap.step_cost is None or p.rate_headroom >= 1.0:
        return None
    solo = (1.0 - p.rate_headroom) * cap.step_cost.stream_tokens_per_s(1)
    kept_ids = {v.request_id for v in kept}
    needy: list[RequestView] = []
    spare: list[_Scored] = []
    exempt: set[str] = set()
    for v in reqs:  # arrival order
        if reads(v) <= 0 or v.request_id in kept_ids or v.request_id not in scored:
            continue
        if reads(v) > solo:
            exempt.add(v.request_id)
            continue
        s = scored[v.request_id]
        if s.reason is Reason.BUFFER_SHORT or s.forced or (
                v.state is RequestState.PAUSED and s.slack <= 0):
            needy.append(v)
        else:
            spare.append(s)
    spare.sort(key=lambda s: (s.slack, s.view.arrival, s.view.request_id))
    n, demand = len(kept) + len(exempt), sum(reads(v) for v in kept)
    winners: set[str] = set(exempt)
    for v in needy:
        if not fits(cap, p, n + 1, demand, reads(v)):
            return winners
        winners.add(v.request_id)
        n, demand = n + 1, demand + reads(v)
    for s in spare:
        if fits(cap, p, n + 1, demand, reads(s.view)):
            winners.add(s.view.request_id)
            n, demand = n + 1, demand + reads(s.view)
    return winners


def decide_tokenflow(
    views: Iterable[RequestView], cap: Capacity, now: float, params: TokenFlowParams | None = None
) -> Plan:
    """Who runs this step: one decision per request, start order = most urgent first."""
    p = params or TokenFlowParams()
    reqs = sorted(views, key=lambda v: (v.arrival, v.request_id))
    running = [v for v in reqs if v.state is RequestState.RUNNING]
    running_adapters = {v.adapter_id for v in running if v.adapter_id is not None}

    selected: list[Decision] = []
    rejected: list[Decision] = []
    adapters: Counter[str] = Counter()  # requests per adapter in the running set
    blocks = 0
    taken = 0

    def take(v: RequestView, sign: int = 1) -> None:
        nonlocal taken, blocks
        taken += sign
        blocks += sign * blocks_needed(v, cap.block_size)
        if v.adapter_id is not None:
            adapters[v.adapter_id] += sign
            if adapters[v.adapter_id] <= 0:
                del adapters[v.adapter_id]

    # 1. Running requests that may not be paused at all keep their slot whatever it costs.
    #    Those protected only by a short buffer hold their slot against rivals (reserved
    #    here) but not against the reading-rate cap.
    contenders: list[_Scored] = []
    short: list[RequestView] = []
    kept: list[RequestView] = []
    for v in running:
        why = _protected(v, now, p)
        if why is None:
            contenders.append(_score(v, now, p, running_adapters))
        elif why is Reason.BUFFER_SHORT:
            short.append(v)
            take(v)  # reserved: released if the cap pauses it
        else:
            selected.append(Decision(v.request_id, Action.KEEP_RUNNING, why))
            kept.append(v)
            take(v)

    # 2. Everyone else competes by (forced first, slack, arrival, id).
    contenders += [_score(v, now, p, running_adapters) for v in reqs
                   if v.state is not RequestState.RUNNING]
    # A stream admitted or resumed less than min_run_s ago yields its slot to a newcomer, not
    # to a paused stream (which would then trade places with it every few steps).
    floor = min((s.slack for s in contenders if s.view.state is RequestState.PAUSED and not s.forced),
                default=math.inf)
    for i, s in enumerate(contenders):
        v = s.view
        if (v.state is RequestState.RUNNING and v.running_since is not None
                and now - v.running_since < p.min_run_s and s.slack >= floor):
            contenders[i] = _Scored(v, False, floor - 1e-6, Reason.MIN_RUN)
    scored = {s.view.request_id: s for s in contenders}
    scored.update({v.request_id: _Scored(v, False, 0.0, Reason.BUFFER_SHORT) for v in short})
    winners = rate_cap_winners(reqs, kept, scored, cap, p)

    def over_cap(v: RequestView) -> bool:
        return winners is not None and reads(v) > 0 and v.request_id not in winners
    # Overdue requests first, then the short-buffer incumbents, then the rest by slack.
    order = [(0, s.view.arrival, 0.0, s) for s in contenders if s.forced]
    order += [(1, v.arrival, 0.0, _Scored(v, False, 0.0, Reason.BUFFER_SHORT)) for v in short]
    order += [(2, s.slack, s.view.arrival, s) for s in contenders if not s.forced]
    order.sort(key=lambda o: (o[0], o[1], o[2], o[3].view.request_id))
    for cls, _, _, s in order:
        v = s.view
        if cls == 1:  # its slot is reserved; only the rate cap can take it
            if not over_cap(v):
                selected.append(Decision(v.request_id, Action.KEEP_RUNNING, Reason.BUFFER_SHORT))
            else:
                take(v, -1)
                rejected.append(Decision(v.request_id, Action.PAUSE, Reason.RATE_CAP))
            continue
        need = blocks_needed(v, cap.block_size)
        refusal: Reason | None = None
        if taken >= cap.max_running:
            refusal = Reason.NO_CAPACITY
        elif v.adapter_id is not None and v.adapter_id not in adapters and len(adapters) >= cap.max_loras:
            refusal = Reason.LORA_SLOTS_FULL
        elif cap.kv_blocks is not None and blocks + need > cap.kv_blocks and taken > 0:
            refusal = Reason.KV_FULL
        elif over_cap(v):
            refusal = Reason.RATE_CAP
        if refusal is None:
            take(v)
            action = {RequestState.RUNNING: Action.KEEP_RUNNING, RequestState.PAUSED: Action.RESUME,
                      RequestState.WAITING: Action.ADMIT}[v.state]
            selected.append(Decision(v.request_id, action, s.reason))
        else:
            action = {RequestState.RUNNING: Action.PAUSE, RequestState.PAUSED: Action.KEEP_PAUSED,
                      RequestState.WAITING: Action.DEFER}[v.state]
            # A pause is explained by the buffer that makes it harmless.
            reason = Reason.BUFFER_LONG if action is Action.PAUSE else refusal
            rejected.append(Decision(v.request_id, action, reason))
    return Plan(tuple(selected) + tuple(rejected))


def decide_fcfs(views: Iterable[RequestView], cap: Capacity, now: float) -> Plan:
    """Stock behaviour: never pause; paused (preempted) first, then arrival order; vLLM limits."""
    del cap, now  # vLLM itself enforces slots, KV and max_loras under FCFS
    reqs = sorted(views, key=lambda v: (v.state is not RequestState.PAUSED, v.arrival, v.request_id))
    action = {RequestState.RUNNING: Action.KEEP_RUNNING, RequestState.PAUSED: Action.RESUME,
              RequestState.WAITING: Action.ADMIT}
    return Plan(tuple(Decision(v.request_id, action[v.state], Reason.FCFS) for v in reqs))


POLICIES = ("fcfs", "tokenflow")


def make_policy(name: str, params: TokenFlowParams | None = None) -> Policy:
    """The policy called ``name``; unknown names are refused."""
    if name == "fcfs":
        return decide_fcfs
    if name == "tokenflow":
        p = params or TokenFlowParams()

        def tokenflow(views: Iterable[RequestView], cap: Capacity, now: float) -> Plan:
            return decide_tokenflow(views, cap, now, p)

        return tokenflow
    raise UnknownPolicyError(f"unknown scheduling policy {name!r}; known: {', '.join(POLICIES)}")
