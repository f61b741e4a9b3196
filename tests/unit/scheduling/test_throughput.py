"""The full-batch throughput estimate behind the reading-rate budget."""

from __future__ import annotations

import pytest

from lorafleet.serving.scheduling.throughput import ThroughputEstimate


def test_learns_full_batch_steps_only():
    est = ThroughputEstimate(full_at=4, min_steps=5)
    t = 0.0
    for _ in range(30):  # 8 requests, 0.1 s a step: 80 tok/s
        t += 0.1
        est.observe(t, ran=8, tokens=8)
        t += 0.02
        est.observe(t, ran=2, tokens=2)  # small batches say nothing about a full one
    assert est.value == pytest.approx(8 / 0.1, rel=0.05)


def test_unknown_until_enough_steps_and_idle_gaps_are_skipped():
    est = ThroughputEstimate(full_at=1, min_steps=3)
    est.observe(1.0, ran=4, tokens=4)
    est.observe(1.1, ran=4, tokens=4)
    assert est.value is None
    est.observe(1.2, ran=4, tokens=4)
    est.observe(1.3, ran=0, tokens=0)    # idle: the next step's gap is not a step
    est.observe(60.0, ran=4, tokens=4)
    assert est.value is None
    est.observe(60.1, ran=4, tokens=4)
    assert est.value == pytest.approx(40.0)
    est.observe(70.0, ran=4, tokens=4)   # a gap longer than max_gap_s is not a step either
    assert est.value == pytest.approx(40.0)


def test_follows_a_slower_engine():
    est = ThroughputEstimate(full_at=1, min_steps=1, alpha=0.2)
    t = 0.0
    for _ in range(20):
        t += 0.1
        est.observe(t, ran=8, tokens=8)
    for _ in range(60):
        t += 0.2
        est.observe(t, ran=8, tokens=8)
    assert est.value == pytest.approx(40.0, rel=0.02)


def test_refuses_bad_settings():
    with pytest.raises(ValueError):
        ThroughputEstimate(full_at=0)
    with pytest.raises(ValueError):
        ThroughputEstimate(full_at=1, alpha=0)
