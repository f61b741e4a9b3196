"""The ``overload`` scenario family and its report, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from lorafleet.loadtest.bench import overload
from lorafleet.loadtest.bench.scenarios import (
    MODEL,
    OVERLOAD_CAPACITY_TOK_S,
    OVERLOAD_POINTS,
    get_scenario,
)
from lorafleet.loadtest.workload import generate_plan


@pytest.mark.parametrize("quick", [True, False])
def test_each_point_asks_its_multiple_of_capacity_with_base_and_adapters_mixed(quick: bool) -> None:
    sc = get_scenario("overload", quick)
    assert [p.name for p in sc.phases] == [f"x{r:g}" for r in OVERLOAD_POINTS[quick]]
    assert sc.max_num_seqs == 64  # vLLM's default: every system admits the whole burst
    for phase, point in zip(sc.phases, OVERLOAD_POINTS[quick], strict=True):
        plan = generate_plan(phase.workload)
        demand = sum(r.reader_rate for r in plan)
        assert demand / OVERLOAD_CAPACITY_TOK_S == pytest.approx(point, rel=0.15)
        assert all(4.0 <= r.reader_rate <= 10.0 and r.stream for r in plan)
        assert max(r.at_s for r in plan) < 3.0  # a burst
        models = {r.model for r in plan}
        assert MODEL in models and len(models - {MODEL}) >= 2


def _doc(phases: dict[str, tuple[float, float, float, float]], rates: list[float],
         counters: dict[str, float] | None = None) -> dict:
    """(effective, ttft p99, stall, output) per phase; every phase with the same readers."""
    return {"phases": {name: {
        "summary": {"effective_tokens_per_s": e, "ttft_s": {"p99": t}, "stall_s_total": s,
                    "output_tokens_per_s": o, "on_schedule_tokens_per_s": e},
        "requests": [{"reader_rate": r, "stream": True} for r in rates],
    } for name, (e, t, s, o) in phases.items()}, "server_counters": counters or {}}


def test_family_ratios_against_fcfs_and_vllm(tmp_path: Path) -> None:
    rates = [8.0] * 20  # 160 tok/s asked
    docs = {
        "vllm": _doc({"x2": (10.0, 8.0, 300.0, 70.0)}, rates),
        "lorafleet": _doc({"x2": (15.0, 6.0, 200.0, 80.0)}, rates),
        "lorafleet-tokenflow": _doc({"x2": (45.0, 1.5, 150.0, 72.0)}, rates, {
            "lorafleet_scheduler_decisions{action=pause,reason=rate_cap}": 12.0,
            "lorafleet_scheduler_pauses": 12.0,
            "lorafleet_kv_offload_blocks{direction=out}": 30.0}),
    }
    fam = overload.report(docs, tmp_path, Console(width=300, record=True))
    row = fam["rows"][0]
    assert row["demand tok/s"] == 160.0
    assert row["demand/capacity (fcfs measured)"] == pytest.approx(2.0)
    assert row["demand/capacity (nominal)"] == pytest.approx(160.0 / OVERLOAD_CAPACITY_TOK_S)
    assert row["ratios"]["effective tok/s"] == {"tokenflow/fcfs": 3.0, "tokenflow/vllm": 4.5}
    assert row["ratios"]["TTFT p99 s"]["tokenflow/fcfs"] == pytest.approx(0.25)
    assert row["ratios"]["output tok/s"]["tokenflow/fcfs"] == pytest.approx(0.9)
    assert fam["server_counters"]["lorafleet-tokenflow"] == {
        "lorafleet_scheduler_decisions{action=pause,reason=rate_cap}": 12.0,
        "lorafleet_scheduler_pauses": 12.0}
    assert json.loads((tmp_path / "overload-family.json").read_text())["rows"][0]["phase"] == "x2"
    assert (tmp_path / "overload-family.png").stat().st_size > 0


def test_rebuilds_the_report_from_a_finished_run(tmp_path: Path) -> None:
    doc = _doc({"x1.5": (20.0, 1.0, 10.0, 60.0)}, [6.0] * 10)
    (tmp_path / "lorafleet.json").write_text(json.dumps(doc))
    (tmp_path / "lorafleet-tokenflow.json").write_text(json.dumps(doc))
    assert overload.main([str(tmp_path)]) == 0
    assert (tmp_path / "overload-family.png").exists()
    assert overload.main([str(tmp_path / "missing")]) == 2
