"""Prometheus rules and the Grafana dashboard: promtool, structure, and a real Prometheus.

Boundary: the rules file and the dashboard JSON in charts/lorafleet/files/ (their single
source). promtool checks and unit-tests the rules (monitoring/tests/*.yaml); the dashboard is
checked for the structure Grafana needs (Grafana cannot be installed here); then Debian's real
Prometheus scrapes a hand-written /metrics exposition with the serving metric names and must
evaluate every recording rule, alert and panel query without error. The comparison with a
running LoRAFleet server and the load-test runner is the integration test, not this one.
"""

from __future__ import annotations

import http.server
import json
import math
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dashboards import exprs, grafana_to_promql, panels
from promserver import PromServer, prometheus_binary

REPO = Path(__file__).resolve().parents[3]
FILES = REPO / "charts" / "lorafleet" / "files"
RULES = FILES / "prometheus-rules.yaml"
DASHBOARD = FILES / "grafana-dashboard.json"
PROMTOOL_TESTS = sorted((REPO / "monitoring" / "tests").glob("*.yaml"))

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(prometheus_binary() is None,
                                      reason="prometheus is not installed (apt-get install prometheus)")


# --- promtool --------------------------------------------------------------------------------

@needs_promtool
def test_promtool_check_rules() -> None:
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests() -> None:
    assert PROMTOOL_TESTS
    out = subprocess.run(["promtool", "test", "rules", *map(str, PROMTOOL_TESTS)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_rules_follow_the_naming_convention_and_cover_every_level() -> None:
    records = {r["record"] for r in rules() if "record" in r}
    for name in records:
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", name), name
    for metric in ("lorafleet_time_to_first_token_seconds", "lorafleet_time_per_output_token_seconds"):
        for level in ("namespace_quantile", "namespace_tenant_quantile",
                      "namespace_tenant_adapter_quantile"):
            quantiles = {r["labels"]["quantile"] for r in rules()
                         if r.get("record") == f"{level}:{metric}:histogram_quantile"}
            assert quantiles == {"0.5", "0.9", "0.99"}, (level, metric)
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert {"LoRAFleetTTFTBudgetBurnFast", "LoRAFleetTPOTBudgetBurnFast",
            "LoRAFleetServingReplicaDown", "LoRAFleetAdaptersStuckNotReady"} <= alerts
    for r in rules():
        if "alert" in r:
            assert r["labels"]["severity"] in ("warning", "critical")
            assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_slo_targets_are_bucket_boundaries_of_the_serving_histograms() -> None:
    """`le` in the SLO rules must be a boundary the server exports, or the ratio is empty."""
    metrics = pytest.importorskip("lorafleet.serving.metrics")
    bounds = {"lorafleet_time_to_first_token_seconds": metrics.TTFT_BUCKETS,
              "lorafleet_time_per_output_token_seconds": metrics.TPOT_BUCKETS}
    found = 0
    for r in rules():
        for metric, le in re.findall(r'(lorafleet_\w+?)_bucket\{le="([^"]+)"\}', r["expr"]):
            assert float(le) in bounds[metric], (metric, le)
            found += 1
    assert found


# --- the dashboard ---------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert {"datasource", "namespace", "tenant", "adapter"} <= set(variables)
    used = " ".join(exprs(d))
    for name in ("namespace", "tenant", "adapter"):
        assert f"${name}" in used, f"variable ${name} is used by no panel"
    # The choices cascade: tenants of the chosen namespaces, adapters of the chosen tenants.
    assert "$namespace" in variables["tenant"]["query"]["query"]
    assert "$tenant" in variables["adapter"]["query"]["query"]
    for name in ("namespace", "tenant", "adapter"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["multi"] and variables[name]["allValue"] == ".*"
    for p in panels(d):
        gp = p["gridPos"]
        assert {"x", "y", "w", "h"} <= set(gp) and gp["x"] + gp["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"] == p["datasource"]
    # Panels do not overlap.
    cells: set[tuple[int, int]] = set()
    for p in panels(d):
        gp = p["gridPos"]
        for x in range(gp["x"], gp["x"] + gp["w"]):
            for y in range(gp["y"], gp["y"] + gp["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_dashboard_covers_what_operators_look_at() -> None:
    used = " ".join(exprs(dashboard()))
    for needle in ("lorafleet_time_to_first_token_seconds", "lorafleet_time_per_output_token_seconds",
                   "lorafleet_generation_tokens_total", "vllm:num_requests_waiting",
                   "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                   "vllm:num_preemptions_total", "lorafleet_scheduler_pauses_total",
                   "lorafleet_adapters_resident", "lorafleet_adapter_load_seconds_bucket",
                   'status!~"2.."', "lorafleet_operator_adapters",
                   "lorafleet_scheduler_decisions_total",
                   "lorafleet_scheduler_resume_latency_seconds_bucket",
                   "lorafleet_kv_offload_bytes_total", "lorafleet_kv_offload_resumes_total",
                   "lorafleet_scheduler_full_batch_tokens_per_second"):
        assert needle in used, needle


# --- a real Prometheus against a static /metrics ---------------------------------------------

def exposition(n: int) -> str:
    """Serving metrics after `n` scrapes: counters grow with n so rates are non-zero."""
    lines: list[str] = []

    def hist(name: str, labels: str, buckets: dict[str, float], total: float) -> None:
        lines.append(f"# TYPE {name} histogram")
        for le, share in buckets.items():
            lines.append(f'{name}_bucket{{{labels}le="{le}"}} {share * 100 * n}')
        lines.append(f"{name}_sum{{{labels.rstrip(',')}}} {total * n}")
        lines.append(f"{name}_count{{{labels.rstrip(',')}}} {100 * n}")

    for tenant, adapter in (("alice", "alice/poet"), ("bob", "base")):
        ta = f'tenant="{tenant}",adapter="{adapter}",'
        hist("lorafleet_time_to_first_token_seconds", ta,
             {"0.25": 0.5, "0.5": 0.8, "1.0": 0.95, "2.5": 1.0, "+Inf": 1.0}, 40.0)
        hist("lorafleet_time_per_output_token_seconds", ta,
             {"0.05": 0.5, "0.1": 0.99, "+Inf": 1.0}, 6.0)
        hist("lorafleet_e2e_request_latency_seconds", ta,
             {"1.0": 0.3, "5.0": 0.9, "+Inf": 1.0}, 300.0)
        lines += [
            "# TYPE lorafleet_requests_total counter",
            f'lorafleet_requests_total{{{ta}status="200"}} {95 * n}',
            f'lorafleet_requests_total{{{ta}status="429"}} {5 * n}',
            "# TYPE lorafleet_generation_tokens_total counter",
            f"lorafleet_generation_tokens_total{{{ta.rstrip(',')}}} {1000 * n}",
            "# TYPE lorafleet_prompt_tokens_total counter",
            f"lorafleet_prompt_tokens_total{{{ta.rstrip(',')}}} {300 * n}",
            "# TYPE lorafleet_requests_in_flight gauge",
            f'lorafleet_requests_in_flight{{tenant="{tenant}"}} 3',
            "# TYPE lorafleet_rate_limited_total counter",
            f'lorafleet_rate_limited_total{{tenant="{tenant}",reason="rpm"}} {n}',
        ]
    hist("lorafleet_adapter_load_seconds", "", {"0.5": 0.5, "2.5": 1.0, "+Inf": 1.0}, 50.0)
    hist("lorafleet_scheduler_resume_latency_seconds", 'replica="r0",',
         {"0.025": 0.6, "0.1": 0.99, "+Inf": 1.0}, 3.0)
    lines += ["# TYPE lorafleet_scheduler_decisions_total counter"] + [
        f'lorafleet_scheduler_decisions_total{{replica="r0",action="{a}",reason="{r}"}} {k * n}'
        for a, r, k in (("admit", "ttft_urgency", 5), ("pause", "buffer_long", 2),
                        ("resume", "buffer_draining", 2))]
    lines += ["# TYPE lorafleet_kv_offload_bytes_total counter"] + [
        f'lorafleet_kv_offload_bytes_total{{replica="r0",direction="{d}"}} {2**20 * n}'
        for d in ("out", "in")]
    lines += ["# TYPE lorafleet_kv_offload_resumes_total counter"] + [
        f'lorafleet_kv_offload_resumes_total{{replica="r0",result="{r}"}} {k * n}'
        for r, k in (("restored", 2), ("recomputed", 1))]
    lines += [
        "# TYPE lorafleet_adapters_resident gauge", 'lorafleet_adapters_resident{replica="r0"} 4',
        "# TYPE lorafleet_scheduler_full_batch_tokens_per_second gauge",
        'lorafleet_scheduler_full_batch_tokens_per_second{replica="r0"} 80.5',
        "# TYPE lorafleet_scheduler_pauses_total counter",
        f'lorafleet_scheduler_pauses_total{{replica="r0"}} {2 * n}',
        "# TYPE lorafleet_operator_adapters gauge",
        'lorafleet_operator_adapters{phase="Ready"} 3', 'lorafleet_operator_adapters{phase="Loading"} 1',
        "# TYPE vllm:num_requests_running gauge", 'vllm:num_requests_running{replica="r0",model_name="m"} 8',
        "# TYPE vllm:num_requests_waiting gauge", 'vllm:num_requests_waiting{replica="r0",model_name="m"} 2',
        "# TYPE vllm:kv_cache_usage_perc gauge", 'vllm:kv_cache_usage_perc{replica="r0",model_name="m"} 0.42',
        "# TYPE vllm:num_preemptions_total counter",
        f'vllm:num_preemptions_total{{replica="r0",model_name="m"}} {n}',
        "# TYPE vllm:time_to_first_token_seconds histogram",
        f'vllm:time_to_first_token_seconds_bucket{{replica="r0",model_name="m",le="0.5"}} {50 * n}',
        f'vllm:time_to_first_token_seconds_bucket{{replica="r0",model_name="m",le="+Inf"}} {100 * n}',
        f'vllm:time_to_first_token_seconds_sum{{replica="r0",model_name="m"}} {60 * n}',
        f'vllm:time_to_first_token_seconds_count{{replica="r0",model_name="m"}} {100 * n}',
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def static_metrics() -> Iterator[str]:
    scrapes = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path != "/metrics":
                self.send_error(404)
                return
            scrapes[0] += 1
            body = exposition(scrapes[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@needs_prometheus
@pytest.mark.timeout(120)
def test_rules_and_panels_evaluate_in_a_real_prometheus(static_metrics: str) -> None:
    with PromServer(static_metrics, [RULES]) as prom:
        # Rates need two scrapes; the recorded quantiles need a rule evaluation after that.
        first = prom.wait_until(
            'namespace_tenant_adapter_quantile:lorafleet_time_to_first_token_seconds:histogram_quantile'
            '{tenant="alice",quantile="0.5"}', timeout=60)
        assert first, prom.log()
        # alice: half the requests within 0.25 s -> the median is the bucket's upper edge.
        assert math.isclose(float(first[0]["value"][1]), 0.25, rel_tol=1e-6)
        assert prom.targets_up()

        health = prom.rule_health()
        assert len(health) == len(rules())
        bad = [(r["name"], r.get("lastError")) for r in health if r["health"] == "err"]
        assert not bad, bad
        for r in rules():
            if "record" in r:
                # Groups evaluate at their own offsets: wait for each recorded series.
                assert prom.wait_until(r["record"], timeout=20), r["record"]
            prom.query(r["expr"])
        # With no SLO errors in the exposition, no burn-rate alert fires; the Loading adapter
        # is pending (20 minutes `for`).
        firing = prom.query('ALERTS{alertstate="firing"}')
        assert not [a for a in firing if "Budget" in a["metric"]["alertname"]]

        empty = []
        for expr in exprs(dashboard()):
            result = prom.query(grafana_to_promql(expr))  # raises PromQueryError on bad PromQL
            if not result:
                empty.append(expr)
        # Every metric of the exposition is on the dashboard: every panel query has data.
        assert not empty, empty
