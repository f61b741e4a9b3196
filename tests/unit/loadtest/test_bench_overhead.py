"""``bench overhead``'s account: hop means from two Prometheus snapshots, CPU per token.

The breakdown must add up: the TTFT rows of LoRAFleet's path sum to the client's mean TTFT
(each row is a difference of cumulative stages), and a hop with no observation between the
snapshots is "unknown", never 0.
"""

from __future__ import annotations

from lorafleet.loadtest.bench.overhead import (
    Snapshot,
    breakdown,
    component_of,
    histograms,
    mean_ms,
)


def page(obs: dict[tuple[str, str, str], tuple[float, float]]) -> str:
    """A Prometheus page with histograms (family, label name, value) -> (sum, count)."""
    lines = []
    for fam in sorted({f for f, _, _ in obs}):
        lines.append(f"# TYPE {fam} histogram")
        for (f, label, value), (s, c) in obs.items():
            if f != fam:
                continue
            lab = f'{{{label}="{value}"}}' if label else ""
            inf = f'{{{label}="{value}",le="+Inf"}}' if label else '{le="+Inf"}'
            lines += [f"{fam}_bucket{inf} {c}", f"{fam}_count{lab} {c}", f"{fam}_sum{lab} {s}"]
    return "\n".join(lines) + "\n"


def snap(obs: dict[tuple[str, str, str], tuple[float, float]], cpu: dict[str, float]) -> Snapshot:
    return Snapshot(0.0, histograms(page(obs)), cpu)


STAGE = "lorafleet_request_stage_seconds"
HOP = "lorafleet_replica_hop_seconds"
TOKEN = "lorafleet_token_hop_seconds"


def test_hop_means_are_deltas_between_snapshots_and_missing_is_none() -> None:
    a = snap({(HOP, "hop", "engine_token"): (1.0, 10)}, {})
    b = snap({(HOP, "hop", "engine_token"): (1.7, 20)}, {})
    assert abs(mean_ms(a, b, HOP, "engine_token") - 70.0) < 1e-9
    assert mean_ms(a, b, HOP, "engine_first_token") is None


def test_lorafleet_ttft_rows_add_up_to_the_client_ttft() -> None:
    # Two requests: queue 10, dispatched 30, replica reached +5, engine 200, first delta at
    # 240, written at 245 (ms from the proxy's stamp); the client saw 260.
    b_obs = {
        ("lorafleet_request_queue_seconds", "tenant", "bench"): (0.020, 2),
        (STAGE, "stage", "dispatched"): (0.060, 2),
        (STAGE, "stage", "first_delta"): (0.480, 2),
        (STAGE, "stage", "first_written"): (0.490, 2),
        (HOP, "hop", "ingress_to_replica"): (0.010, 2),
        (HOP, "hop", "engine_first_token"): (0.400, 2),
        (HOP, "hop", "engine_token"): (0.070 * 126, 126),
        (TOKEN, "hop", "replica_to_ingress"): (0.002 * 128, 128),
    }
    a = snap({}, {"proxy": 1.0, "engine core": 5.0})
    b = snap(b_obs, {"proxy": 1.128, "engine core": 15.0})
    doc = {"requests": [
        {"error": None, "metrics": {"ttft_s": 0.260, "tpot_s": 0.072, "n_out": 64}},
        {"error": None, "metrics": {"ttft_s": 0.260, "tpot_s": 0.072, "n_out": 64}},
        {"error": "boom", "metrics": {}},
    ]}
    out = breakdown("lorafleet", doc, a, b)
    rows = dict(out.ttft)
    parts = [v for k, v in out.ttft if not k.startswith("  ")]  # indented rows are details
    assert abs(sum(parts) - 260.0) < 1e-6
    assert abs(rows["replica -> ingress (first delta)"] - 5.0) < 1e-6
    assert abs(rows["HTTP in/out via proxy + client"] - 15.0) < 1e-6
    assert abs(dict(out.token)["engine output interval (replica)"] - 70.0) < 1e-6
    assert abs(out.cpu_ms_per_token["proxy"] - 1.0) < 1e-6  # 0.128 s over 128 tokens
    assert abs(out.cpu_ms_per_token["engine core"] - 1000.0 * 10.0 / 128) < 1e-6


def test_processes_are_named_by_their_component() -> None:
    assert component_of("ray::ServeReplica:lorafleet:Ingress", False, "lorafleet") == "ingress"
    assert component_of("ray::ProxyActor", False, "lorafleet") == "proxy"
    assert component_of("ray::ServeReplica:lorafleet:EngineReplica", False, "lorafleet") \
        == "replica"
    assert component_of("VLLM::EngineCore", False, "vllm") == "engine core"
    assert component_of("VLLM::Worker", False, "lorafleet") == "engine worker"
    assert component_of("python -m vllm.entrypoints.openai.api_server", True, "vllm") \
        == "api server"
    assert component_of("/usr/bin/gcs_server --x", False, "lorafleet") == "ray system"
