"""The reading-rate cap in the real ``TokenFlowScheduler`` (no model, a test clock).

The clock advances by a step cost of the CPU's shape inside each ``schedule()`` (as if the
model ran), so the scheduler learns that cost from its own steps, prefill included, and caps
the running streams by it: under overload it pauses streams after their first token and
rotates them, under light load it pauses nobody, and every stream finishes with its longest
wait bounded. Built by ``tests/support/schedulerfactory.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from schedulerfactory import create_scheduler, make_request, step
from switchable import Clock

from lorafleet.serving.scheduling import StepCost

ENGINE = StepCost(base_s=0.04, per_sequence_s=0.004, per_token_s=0.0002)


def with_step_cost(s: Any, clock: Clock) -> Any:
    """`s`, whose every step moves `clock` by ``ENGINE``'s time for what the step ran."""
    schedule = s.schedule

    def timed(*args: Any, **kwargs: Any) -> Any:
        out = schedule(*args, **kwargs)
        n = len(out.num_scheduled_tokens)
        clock.now += ENGINE.step_s(n, out.total_num_scheduled_tokens) if n else 0.01
        return out

    s.schedule = timed
    return s


def drive(s: Any, clock: Clock, ids: list[str], horizon: float,
          pauses: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Steps until every request is done (or ``horizon``); token arrival times per request
    (and, into ``pauses``, how often each was paused)."""
    times: dict[str, list[float]] = {rid: [] for rid in ids}
    seen = {rid: 0 for rid in ids}
    while clock.now < horizon and any(rid in s.requests for rid in ids):
        step(s)
        if pauses is not None:
            pauses.update({rid: tr.num_pauses for rid, tr in s._tracks.items() if rid in times})
        for rid in ids:
            req = s.requests.get(rid)
            if req is None and seen[rid] >= 0:  # finished this step: its last token came now
                times[rid].append(clock.now)
                seen[rid] = -1
            elif req is not None and req.num_output_tokens > seen[rid]:
                seen[rid] = req.num_output_tokens
                times[rid].append(clock.now)
    return times


def scheduler(tiny_model: Path, clock: Clock) -> Any:
    return with_step_cost(create_scheduler(
        tiny_model, max_num_seqs=64, num_blocks=2048, clock=clock), clock)


@pytest.mark.parametrize("prompt_len", [8, 20])
def test_overload_pauses_newcomers_after_their_first_token_and_rotates(
        tiny_model: Path, prompt_len: int) -> None:
    """Short prompts: the whole burst is admitted in one step and nothing waits afterwards,
    yet the cap applies; longer ones: the burst's prefill spans two steps."""
    clock = Clock(0.0)
    s = scheduler(tiny_model, clock)
    # Learn the step cost on a light load first (a few streams, then a prefill burst).
    warm = [f"w{i}" for i in range(4)]
    for i, rid in enumerate(warm):
        s.add_request(make_request(rid, arrival=clock.now + 0.001 * i, consumption_rate=4.0,
                                   max_tokens=48))
    drive(s, clock, warm, horizon=30.0)
    est = s._step_cost.estimate
    assert est is not None
    # 32 readers at 8 tok/s: 256 tok/s asked, ~180 made with all of them in the batch.
    ids = [f"r{i:02d}" for i in range(32)]
    t0 = clock.now
    for i, rid in enumerate(ids):
        s.add_request(make_request(rid, arrival=t0 + 0.001 * i, consumption_rate=8.0,
                                   max_tokens=64, prompt_len=prompt_len))
    pauses: dict[str, int] = {}
    times = drive(s, clock, ids, horizon=t0 + 300.0, pauses=pauses)
    # Learned from its own steps (decode and prefill): close to the engine's true cost.
    est = s._step_cost.estimate
    for n in (1, 16, 32):
        assert est.step_s(n, n) == pytest.approx(ENGINE.step_s(n, n), rel=0.05)
    assert all(len(t) == 64 for t in times.values()), "every stream finishes"
    # Newcomers all got a first token fast; then streams past the cap were paused.
    assert max(t[0] for t in times.values()) - t0 < 3.0
    assert sum(pauses.values()) >= 8
    gaps = [b - a for t in times.values() for a, b in zip(t, t[1:], strict=False)]
    # Nobody waits forever: streams that need to run are served in arrival order, so no wait
    # is longer than serving every stream one after the other.
    assert max(gaps) <= 32 * 64 / ENGINE.stream_tokens_per_s(1)
    # A running stream was fed at least as fast as its reader, most of the time.
    fast = sum(1 for g in gaps if g <= 1 / 8.0)
    assert fast / len(gaps) > 0.9


def test_light_load_never_pauses(tiny_model: Path) -> None:
    clock = Clock(0.0)
    s = scheduler(tiny_model, clock)
    ids = [f"r{i}" for i in range(6)]
    for i, rid in enumerate(ids):
        s.add_request(make_request(rid, arrival=0.3 * i, consumption_rate=6.0, max_tokens=96))
    paused: set[str] = set()
    while clock.now < 120 and any(rid in s.requests for rid in ids):
        step(s)
        paused |= {rid for rid, tr in s._tracks.items() if tr.num_pauses}
    assert not paused
    assert not any(rid in s.requests for rid in ids)
