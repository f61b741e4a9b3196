"""The step-cost model behind the reading-rate cap: learned from every step, prefill included."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from lorafleet.serving.scheduling.metrics import SchedulerMetrics, read_counters
from lorafleet.serving.scheduling.model import StepCost
from lorafleet.serving.scheduling.step_cost import StepCostModel

TRUE = StepCost(base_s=0.02, per_sequence_s=0.004, per_token_s=0.0005)


def feed(model: StepCostModel, cost: StepCost, steps: int, seed: int = 0, noise: float = 0.0,
         max_n: int = 32) -> None:
    """Decode steps at batch sizes 1..max_n, and now and then a prefill of a few prompts."""
    rng = random.Random(seed)
    for i in range(steps):
        n = rng.randint(1, max_n)
        tokens = n + (rng.randint(50, 400) if i % 5 == 0 else 0)
        t = cost.step_s(n, tokens) * (1 + rng.uniform(-noise, noise))
        model.observe(t, n, tokens)


def test_recovers_the_cost_of_a_sequence_and_of_a_token():
    m = StepCostModel(min_steps=10)
    feed(m, TRUE, 200)
    est = m.estimate
    assert est is not None
    assert est.base_s == pytest.approx(TRUE.base_s, rel=1e-3)
    assert est.per_sequence_s == pytest.approx(TRUE.per_sequence_s, rel=1e-3)
    assert est.per_token_s == pytest.approx(TRUE.per_token_s, rel=1e-3)
    # What the policy asks: per-stream speed falls as the batch grows, throughput rises.
    assert est.stream_tokens_per_s(32) < est.stream_tokens_per_s(4) < est.stream_tokens_per_s(1)
    assert est.decode_tokens_per_s(32) == pytest.approx(32 / TRUE.step_s(32, 32), rel=1e-3)


def test_noisy_steps_give_close_predictions_and_no_negative_term():
    m = StepCostModel()
    flat = StepCost(base_s=0.03, per_sequence_s=0.0, per_token_s=0.002)  # no per-sequence cost
    feed(m, flat, 400, seed=3, noise=0.2)
    est = m.estimate
    assert est is not None
    assert min(est.base_s, est.per_sequence_s, est.per_token_s) >= 0
    for n in (1, 8, 32, 64):
        assert est.step_s(n, n) == pytest.approx(flat.step_s(n, n), rel=0.1)


def test_unknown_until_enough_steps_and_bad_steps_are_ignored():
    m = StepCostModel(min_steps=5)
    for bad in ((0.0, 4, 4), (-1.0, 4, 4), (float("nan"), 4, 4), (60.0, 4, 4), (0.1, 0, 0)):
        m.observe(*bad)
    assert m.steps == 0 and m.estimate is None
    feed(m, TRUE, 4)
    assert m.estimate is None
    feed(m, TRUE, 1)
    assert m.estimate is not None


def test_follows_an_engine_that_slows_down():
    m = StepCostModel(decay=0.98)
    feed(m, TRUE, 200)
    slow = StepCost(base_s=0.04, per_sequence_s=0.012, per_token_s=0.001)
    feed(m, slow, 400, seed=1)
    est = m.estimate
    assert est is not None
    assert est.step_s(16, 16) == pytest.approx(slow.step_s(16, 16), rel=0.02)


def test_one_batch_size_seen_predicts_no_slowdown_from_a_bigger_batch():
    """Until steps of other sizes are seen the slopes are unknown: the model says a bigger
    batch costs nothing more, so the cap admits rather than guesses."""
    m = StepCostModel(min_steps=5)
    for _ in range(50):
        m.observe(0.05, 4, 4)
    est = m.estimate
    assert est is not None
    assert est.step_s(4, 4) == pytest.approx(0.05, rel=1e-3)
    assert est.step_s(32, 32) == pytest.approx(0.05, rel=0.01)


def test_refuses_bad_settings():
    for kw in ({"decay": 0.0}, {"decay": 1.5}, {"min_steps": 0}, {"ridge": -1.0},
               {"max_step_s": 0.0}):
        with pytest.raises(ValueError):
            StepCostModel(**kw)  # type: ignore[arg-type]


def test_exported_as_gauges_with_the_full_batch_throughput_they_predict():
    reg = CollectorRegistry()
    metrics = SchedulerMetrics(reg)
    metrics.observe_step_cost(None, 8)
    assert read_counters(generate_latest(reg).decode())[
        "lorafleet_scheduler_full_batch_tokens_per_second"] == 0.0
    metrics.observe_step_cost(TRUE, 8)
    got = read_counters(generate_latest(reg).decode())
    assert got["lorafleet_scheduler_step_cost_seconds{term=base}"] == pytest.approx(0.02)
    assert got["lorafleet_scheduler_step_cost_seconds{term=per_sequence}"] == pytest.approx(0.004)
    assert got["lorafleet_scheduler_step_cost_seconds{term=per_token}"] == pytest.approx(0.0005)
    assert got["lorafleet_scheduler_full_batch_tokens_per_second"] == pytest.approx(
        TRUE.decode_tokens_per_s(8))
