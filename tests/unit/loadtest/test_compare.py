"""Ratios between two results files."""

from __future__ import annotations

import pytest

from lorafleet.loadtest.compare import compare_results, compare_summaries, ratio


def summary(tok_s, ttft50, ok=10, requests=10):
    return {
        "requests": requests, "ok": ok, "output_tokens_per_s": tok_s,
        "effective_tokens_per_s": tok_s / 2, "requests_per_s": 1.0,
        "ttft_s": {"p50": ttft50, "p90": None, "p99": ttft50 * 2},
        "tpot_s": {"p50": 0.05, "p99": 0.1}, "itl_s": {"p99": 0.1},
        "e2e_s": {"p50": 1.0, "p99": 2.0}, "stall_s_total": 0.0, "stalled_requests": 0,
        "slo_attainment": 0.9,
    }


def test_ratio():
    assert ratio(2.0, 3.0) == 1.5
    assert ratio(0.0, 0.0) == 1.0
    assert ratio(0.0, 1.0) is None
    assert ratio(None, 1.0) is None


def test_compare_summaries_gives_b_over_a():
    cmp = compare_summaries(summary(100, 0.2), summary(150, 0.1, ok=8))
    assert cmp["output tok/s"]["ratio"] == 1.5
    assert cmp["TTFT p50 s"]["ratio"] == pytest.approx(0.5)
    assert cmp["TTFT p90 s"]["ratio"] is None
    assert cmp["stall s total"]["ratio"] == 1.0
    assert cmp["failed requests"]["b"] == 2 and cmp["failed requests"]["diff"] == 2


def test_compare_results_by_common_groups():
    a = {"summary": summary(1, 1), "by_adapter": {"x": summary(1, 1), "y": summary(1, 1)}}
    b = {"summary": summary(2, 1), "by_adapter": {"x": summary(3, 1)}}
    out = compare_results(a, b, "vllm", "lorafleet")
    assert out["ratio"] == "lorafleet / vllm"
    assert list(out["by_adapter"]) == ["x"]
    assert out["by_adapter"]["x"]["output tok/s"]["ratio"] == 3
