"""Who runs, who waits and who pauses, in the real ``TokenFlowScheduler`` with no model.

The rule (docs/scheduling.md): ``tokenflow`` fills ``max_running`` slots; when a request
arrives with every slot taken, the stream whose reader has the most seconds of text
buffered pauses (vLLM's own preemption; it is parked outside vLLM's queue) and the newcomer
runs; a pause lasts at most ``max_pause_s``. ``fcfs`` (stock vLLM) never pauses anyone
for a newcomer. Built by ``tests/support/schedulerfactory.py`` (vLLM's configs from the tiny
model's ``config.json``, a fake model runner, a test clock); ``tiny_model`` is the
session's (tests/support/tinyengine.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from schedulerfactory import create_scheduler, make_request, running_ids, step

pytestmark = pytest.mark.middle


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(scheduler: Any, clock: Clock, steps: int, dt: float = 0.02) -> None:
    for _ in range(steps):
        step(scheduler)
        clock.now += dt


def two_readers(tiny_model: Path, policy: str = "tokenflow", max_num_seqs: int = 4
                ) -> tuple[Any, Clock]:
    """a (reads 1 tok/s) and b (2 tok/s) have run 2.4 s at ~50 tok/s: both hold long buffers,
    a's the longest in seconds."""
    clock = Clock()
    s = create_scheduler(tiny_model, policy=policy, max_running=2, max_num_seqs=max_num_seqs,
                         clock=clock)
    s.add_request(make_request("a", consumption_rate=1.0, max_tokens=400))
    s.add_request(make_request("b", consumption_rate=2.0, max_tokens=400))
    run(s, clock, 120)
    return s, clock


def test_tokenflow_fills_its_slots_and_the_rest_wait(tiny_model: Path) -> None:
    s = create_scheduler(tiny_model, max_running=2, max_num_seqs=4, clock=Clock())
    for i in range(4):
        s.add_request(make_request(f"r{i}", arrival=float(i) * 0.001))
    step(s)
    assert running_ids(s) == ["r0", "r1"]  # first come first
    assert s.get_request_counts() == (2, 2)


def test_a_newcomer_pauses_the_stream_with_the_longest_buffer(tiny_model: Path) -> None:
    s, clock = two_readers(tiny_model)
    assert running_ids(s) == ["a", "b"]
    s.add_request(make_request("c", consumption_rate=2.0, arrival=clock.now, max_tokens=400))
    run(s, clock, 1)
    assert running_ids(s) == ["b", "c"]
    assert s.requests["a"].num_output_tokens == 120  # paused, its output kept
    assert s.get_request_counts() == (2, 1)  # a still counts as waiting: it is ours


def test_a_pause_lasts_at_most_max_pause_s(tiny_model: Path) -> None:
    s, clock = two_readers(tiny_model)
    s.add_request(make_request("c", consumption_rate=2.0, arrival=clock.now, max_tokens=400))
    run(s, clock, 1)
    clock.now += 15.1  # TokenFlowParams.max_pause_s = 15
    run(s, clock, 1)
    assert "a" in running_ids(s)


def test_fcfs_never_pauses_for_a_newcomer(tiny_model: Path) -> None:
    s, clock = two_readers(tiny_model, policy="fcfs", max_num_seqs=2)  # every slot taken
    s.add_request(make_request("c", arrival=clock.now, max_tokens=400))
    run(s, clock, 5)
    assert running_ids(s) == ["a", "b"]
    assert s.get_request_counts() == (2, 1)

