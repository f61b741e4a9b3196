"""``lorafleet soak``: the pure decisions (capacity, growth) and the command's bounds."""

from __future__ import annotations

import argparse

import pytest

from lorafleet.loadtest.metrics import RequestRecord
from lorafleet.loadtest.soak import (
    Level,
    _check_target,
    decide_capacity,
    decide_growth,
    level_from_records,
    register,
)


def level(c: int, ttft: float, tpot: float, errors: int = 0) -> Level:
    return Level(c, 10, errors, ttft, ttft, tpot, tpot, 100.0)


def test_capacity_is_the_last_level_before_the_first_miss() -> None:
    levels = [level(1, 0.1, 0.01), level(2, 0.2, 0.02), level(4, 3.0, 0.02), level(8, 0.1, 0.01)]
    assert decide_capacity(levels, ttft_p99_s=1.0, tpot_p99_s=0.1) == 2
    assert decide_capacity([level(1, 0.1, 0.01, errors=1)], 1.0, 0.1) is None
    assert decide_capacity([], 1.0, 0.1) is None
    assert decide_capacity(list(reversed(levels[:2])), 1.0, 0.1) == 2


def test_growth_compares_the_first_and_last_fifth_after_warmup() -> None:
    flat = decide_growth([500.0, 900.0] + [100.0] * 20)
    assert flat["first"] == flat["last"] == 100.0 and flat["ratio"] == 1.0
    grows = decide_growth([0.0, 0.0] + [100.0 + i for i in range(20)])
    assert grows["ratio"] is not None and grows["ratio"] > 1.1
    assert decide_growth([])["ratio"] is None


def test_level_from_records_counts_errors_and_latencies() -> None:
    ok = RequestRecord(0, "alice", "pirate", True, 0, 0, token_times=(0.5, 0.6, 0.7), e2e_s=0.7,
                       n_out=3, status=200)
    bad = RequestRecord(1, "bob", "json", True, 0, 0, status=503, error="down")
    lv = level_from_records(2, [ok, bad], wall_s=1.0)
    assert lv.requests == 2 and lv.errors == 1
    assert lv.ttft_p99_s == pytest.approx(0.5) and lv.tpot_p50_s == pytest.approx(0.1)
    assert lv.tokens_per_s == 3.0


def test_only_loopback_unless_told_otherwise() -> None:
    assert _check_target("http://127.0.0.1:8000/", False) == "http://127.0.0.1:8000"
    with pytest.raises(SystemExit):
        _check_target("http://example.com:8000", False)
    assert _check_target("http://example.com:8000", True) == "http://example.com:8000"


def test_commands_are_bounded() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    run = parser.parse_args(["soak", "run", "--out", "x.json"])
    assert run.duration == 300 and run.max_requests == 10_000
    sweep = parser.parse_args(["soak", "sweep", "--out", "y.json", "--duration", "60"])
    assert sweep.duration == 60 and sweep.levels == "1,2,4,8,16,32"
