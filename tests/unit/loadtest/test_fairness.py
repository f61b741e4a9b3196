"""The fairness bench's arithmetic: loop-lag quantiles from the server's own histogram, the
steady tenant's percentiles, the probe's ratios, and sizes that make the flood a real one."""

from __future__ import annotations

import math

from lorafleet.loadtest.bench import fairness
from lorafleet.loadtest.cli import SCENARIOS
from lorafleet.serving.api.body import MAX_SEQUENCES
from lorafleet.serving.metrics import ServingMetrics


def test_loop_lag_quantiles_come_from_the_servers_histogram() -> None:
    m = ServingMetrics()
    before = fairness.lag_histogram(m.exposition().decode())
    for v in [0.0002] * 98 + [0.3, 4.0]:
        m.loop_lag.observe(v)
    after = fairness.lag_histogram(m.exposition().decode())
    figs = fairness.lag_figures(fairness.histogram_delta(before, after))
    assert figs["samples"] == 100
    assert figs["p50 s (bucket bound)"] == 0.0005
    assert figs["p99 s (bucket bound)"] == 0.5   # the 99th sample, 0.3 s, is in (0.25, 0.5]
    assert figs["max s (bucket bound)"] == 5.0
    assert math.isclose(figs["mean s"] or 0, (98 * 0.0002 + 4.3) / 100)


def test_a_phase_without_samples_has_no_lag_figures() -> None:
    figs = fairness.lag_figures({"count": 0.0, "sum": 0.0, "0.001": 0.0})
    assert figs["p99 s (bucket bound)"] is None and figs["mean s"] is None


def test_steady_figures_count_only_answered_streams() -> None:
    records = [{"status": 200, "ttft_s": t, "tpot_s": 0.1 * t} for t in (1.0, 2.0, 3.0)]
    records.append({"status": 429, "ttft_s": None, "tpot_s": None})
    figs = fairness.stream_figures(records)
    assert figs["requests"] == 4 and figs["answered"] == 3
    assert figs["TTFT p50 s"] == 2.0
    assert 2.9 < (figs["TTFT p99 s"] or 0) <= 3.0


def test_the_probe_compares_a_cross_tenant_prefix_with_a_miss() -> None:
    trials = [{"cross": 0.40, "miss": 0.41, "own": 0.10}, {"cross": 0.42, "miss": 0.40, "own": 0.12},
              {"cross": 0.41, "miss": 0.42, "own": 0.11}]
    figs = fairness.probe_figures(trials)
    assert figs["cross / miss"] == 1.0
    assert round(figs["own hit / miss"] or 0, 3) == round(0.11 / 0.41, 3)


def test_the_flood_is_at_the_caps_and_is_a_command() -> None:
    assert "fairness" in SCENARIOS
    assert fairness.SEQUENCE_CAP == MAX_SEQUENCES
    for quick in (True, False):
        plan = fairness.make_plan(quick)
        assert plan.flood_adapters >= plan.max_loras + 2
        assert plan.flood_workers >= plan.max_loras  # every slot busy at once
        assert plan.flood_workers * 8 >= plan.flood_max_concurrent  # the quota is spent
        assert plan.flood_max_concurrent < plan.max_num_seqs  # room is left for the others
