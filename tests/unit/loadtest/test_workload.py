"""Workload validation, loading and seeded generation."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import pytest

from lorafleet.loadtest.errors import WorkloadError
from lorafleet.loadtest.workload import (
    burst_rate_at,
    generate_plan,
    load_workload,
    parse_workload,
    resolve_api_keys,
)

WORKLOADS = Path(__file__).parents[3] / "loadtest" / "workloads"


def doc(**over):
    base = {
        "seed": 1,
        "duration_s": 10_000,
        "max_requests": 4000,
        "tenants": [{"name": "a", "api_key": "k"}, {"name": "b", "weight": 3}],
        "models": {"popularity": {"kind": "zipf", "s": 1.2},
                   "entries": [{"model": f"m{i}"} for i in range(5)]},
        "arrival": {"kind": "poisson", "rate": 4.0},
        "prompts": {"words": {"dist": "uniform", "low": 5, "high": 15}},
        "max_tokens": {"dist": "normal", "mean": 64, "std": 8, "min": 16, "max": 128},
    }
    base.update(over)
    return base


def test_example_workloads_load():
    files = sorted(WORKLOADS.glob("*.yaml"))
    assert files
    for path in files:
        wl, _ = load_workload(path)
        assert generate_plan(wl, _)


def test_same_seed_same_plan_other_seed_other_plan():
    a = generate_plan(parse_workload(doc()))
    b = generate_plan(parse_workload(doc()))
    c = generate_plan(parse_workload(doc(seed=2)))
    assert a == b
    assert a != c


def test_poisson_mean_interarrival():
    plan = generate_plan(parse_workload(doc()))
    gaps = [y.at_s - x.at_s for x, y in zip(plan, plan[1:], strict=False)]
    assert len(plan) == 4000
    assert statistics.mean(gaps) == pytest.approx(1 / 4.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 4.0, rel=0.1)  # exponential: sd = mean


def test_zipf_rank_frequencies_are_ordered_and_near_the_law():
    plan = generate_plan(parse_workload(doc()))
    counts = Counter(p.model for p in plan)
    freqs = [counts[f"m{i}"] for i in range(5)]
    assert freqs == sorted(freqs, reverse=True)
    weights = [1 / k**1.2 for k in range(1, 6)]
    assert freqs[0] / len(plan) == pytest.approx(weights[0] / sum(weights), rel=0.08)


def test_tenant_weights_and_model_restriction():
    wl = parse_workload(doc(models={"entries": [{"model": "x", "tenant": "a"}, {"model": "y"}]}))
    plan = generate_plan(wl)
    tenants = Counter(p.tenant for p in plan)
    assert tenants["b"] / len(plan) == pytest.approx(0.75, abs=0.03)
    assert all(p.model == "y" for p in plan if p.tenant == "b")


def test_bounds_are_respected():
    plan = generate_plan(parse_workload(doc(duration_s=5.0)))
    assert all(p.at_s <= 5.0 for p in plan) and len(plan) < 60
    assert len(generate_plan(parse_workload(doc(max_requests=7)))) == 7
    lengths = [p.max_tokens for p in generate_plan(parse_workload(doc()))]
    assert min(lengths) >= 16 and max(lengths) <= 128


def test_bursts_concentrate_arrivals():
    arrival = {"kind": "bursts", "base_rate": 0.5, "burst_rate": 10, "burst_duration_s": 2,
               "period_s": 20}
    wl = parse_workload(doc(arrival=arrival, duration_s=2000))
    plan = generate_plan(wl)
    in_burst = sum(1 for p in plan if burst_rate_at(wl.arrival, p.at_s) == 10)
    # expected per period: 20 in the burst, 0.5 * 18 = 9 outside
    assert in_burst / len(plan) == pytest.approx(20 / 29, abs=0.04)


def test_stream_fraction_and_reader_rate():
    plan = generate_plan(parse_workload(doc(stream=0.25)))
    assert sum(p.stream for p in plan) / len(plan) == pytest.approx(0.25, abs=0.03)
    rates = [p.reader_rate for p in plan]
    assert min(rates) >= 2 and max(rates) <= 20  # default distribution's clip
    assert statistics.median(rates) == pytest.approx(6.0, rel=0.05)


def test_closed_loop_and_trace(tmp_path):
    closed = generate_plan(parse_workload(doc(arrival={"kind": "closed", "concurrency": 4},
                                              max_requests=9)))
    assert [p.at_s for p in closed] == [0.0] * 9
    (tmp_path / "t.csv").write_text("timestamp,x\n100.0,1\n100.5,1\n102.0,1\n")
    import yaml

    (tmp_path / "w.yaml").write_text(yaml.safe_dump(doc(
        arrival={"kind": "trace", "file": "t.csv", "time_scale": 2.0})))
    wl, trace = load_workload(tmp_path / "w.yaml")
    assert [p.at_s for p in generate_plan(wl, trace)] == [0.0, 1.0, 4.0]


def test_prompt_set():
    plan = generate_plan(parse_workload(doc(prompts={"prompts": ["hi", "yo"]})))
    assert {p.prompt for p in plan} == {"hi", "yo"}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"arrival": {"kind": "poisson", "rate": -1}}, "arrival.poisson.rate"),
        ({"arrival": {"kind": "sometimes"}}, "arrival"),
        ({"tenants": []}, "tenants"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"models": {"entries": [{"model": "x", "tenant": "zed"}]}}, "unknown tenant 'zed'"),
        ({"prompts": {}}, "exactly one of"),
        ({"stream": 1.5}, "fraction"),
        ({"max_tokens": {"dist": "uniform", "low": 5, "high": 1}}, "high must be >= low"),
    ],
)
def test_validation_errors_name_the_path(override, fragment):
    with pytest.raises(WorkloadError) as err:
        parse_workload(doc(**override), "w.yaml")
    assert "invalid workload w.yaml" in str(err.value)
    assert fragment in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(WorkloadError, match="cannot read workload"):
        load_workload(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(WorkloadError, match="not valid YAML"):
        load_workload(tmp_path / "bad.yaml")


def test_api_keys_from_env():
    wl = parse_workload(doc(tenants=[{"name": "a", "api_key_env": "K_A"}, {"name": "b"}]))
    assert resolve_api_keys(wl, {"K_A": "secret"}, default="d") == {"a": "secret", "b": "d"}
    with pytest.raises(WorkloadError, match="K_A is not set"):
        resolve_api_keys(wl, {})
