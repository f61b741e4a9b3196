"""The workload files shipped in loadtest/workloads validate, and demo.yaml fits the demo."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.loadtest.workload import (
    PoissonArrival,
    generate_plan,
    load_workload,
    resolve_api_keys,
)

WORKLOADS = Path(__file__).resolve().parents[3] / "loadtest" / "workloads"


@pytest.mark.parametrize("path", sorted(WORKLOADS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_workload_is_valid(path: Path) -> None:
    workload, trace = load_workload(path)
    assert generate_plan(workload, trace)


def test_demo_workload_matches_the_embedded_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    workload, _ = load_workload(WORKLOADS / "demo.yaml")
    assert isinstance(workload.arrival, PoissonArrival)
    assert workload.stream is True
    assert 30 <= workload.duration_s <= 90
    env = {t.name: t.api_key_env for t in workload.tenants}
    assert env == {"alice": "ALICE_KEY", "bob": "BOB_KEY"}
    # Each adapter is sent only by the tenant that owns it in the demo (serving/seed.py).
    owners = {e.model: e.tenant for e in workload.models.entries}
    assert owners == {"french": "alice", "pirate": "alice", "json": "bob",
                      "SmolLM2-135M-Instruct": None}
    plan = generate_plan(workload)
    assert all(r.model in ("SmolLM2-135M-Instruct", "french", "pirate") for r in plan
               if r.tenant == "alice")
    assert all(r.model in ("SmolLM2-135M-Instruct", "json") for r in plan if r.tenant == "bob")
    assert all(3 <= r.reader_rate <= 12 for r in plan)  # human reading speed
    monkeypatch.setenv("ALICE_KEY", "lf_a_x")
    monkeypatch.setenv("BOB_KEY", "lf_b_y")
    assert resolve_api_keys(workload) == {"alice": "lf_a_x", "bob": "lf_b_y"}
