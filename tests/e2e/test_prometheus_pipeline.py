"""The Prometheus pipeline end to end: a real Prometheus scrapes the real server while the
load-test runner drives traffic; the server-side TTFT/TPOT per tenant agree with what the
client measured, and every recording rule and dashboard panel evaluates.

Tolerance. The server measures TTFT from the request reaching its HTTP server (Ray Serve's
proxy stamps it) to the first token written to the stream by the ingress; the client
measures from sending to receiving the first SSE chunk with text. The difference is the
connection set-up, the ingress-to-proxy hop of that chunk and the client's event loop:
small but not zero, and on a 2-core machine running four processes it can reach a few
hundred milliseconds. So: request counts must match exactly, the server's mean TTFT must not
exceed the client's (plus 50 ms of clock granularity), and the two may differ by at most
0.5 s + 25 %. TPOT is compared the same way with 20 ms + 30 %.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest
from dashboards import RULES, dashboard, exprs, grafana_to_promql
from promserver import PromServer, prometheus_binary

from lorafleet.loadtest.runner import probe_and_run
from lorafleet.loadtest.workload import generate_plan, parse_workload
from lorafleet.serving.demo import DEMO_MODEL_NAME

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(prometheus_binary() is None, reason="apt-get install prometheus"),
]

WORKLOAD = {
    "name": "prometheus-pipeline",
    "seed": 3,
    "duration_s": 90,
    "max_requests": 16,
    "max_concurrency": 4,
    "request_timeout_s": 120,
    "endpoint": "chat",
    "tenants": [{"name": "alice", "weight": 1}, {"name": "bob", "weight": 1}],
    "models": {"popularity": {"kind": "uniform"}, "entries": [
        {"model": DEMO_MODEL_NAME}, {"model": "french", "tenant": "alice"},
        {"model": "json", "tenant": "bob"}]},
    "arrival": {"kind": "poisson", "rate": 2.0},
    "prompts": {"words": {"dist": "uniform", "low": 5, "high": 20}},
    "max_tokens": {"dist": "constant", "value": 24},
    "stream": True,
    "slo": {"ttft_s": 5.0, "tpot_s": 0.5},
}


def _per_tenant(prom: PromServer, metric: str) -> dict[str, tuple[float, float]]:
    s = prom.query(f"sum by (tenant) ({metric}_sum)")
    c = prom.query(f"sum by (tenant) ({metric}_count)")
    sums = {r["metric"]["tenant"]: float(r["value"][1]) for r in s}
    return {r["metric"]["tenant"]: (sums[r["metric"]["tenant"]], float(r["value"][1])) for r in c}


@pytest.mark.heavy  # 80 s: a real Prometheus scraping the server under load
@pytest.mark.timeout(600)
def test_server_metrics_agree_with_the_client(demo_server):
    target = demo_server.base_url.removeprefix("http://")
    with PromServer(target, [RULES], bearer_token=demo_server.admin_key) as prom:
        # Baseline only once Prometheus has scraped the server (other tests share it).
        assert prom.wait_until('up{job="lorafleet-serving"} == 1', timeout=60), prom.log()
        time.sleep(2.5)
        before_ttft = _per_tenant(prom, "lorafleet_time_to_first_token_seconds")
        before_tpot = _per_tenant(prom, "lorafleet_time_per_output_token_seconds")
        workload = parse_workload(WORKLOAD)
        plan = generate_plan(workload)
        result = asyncio.run(probe_and_run(plan, workload, demo_server.base_url + "/v1",
                                           dict(demo_server.keys)))
        ok = [r for r in result.records if r.ok and r.token_times]
        print("client TTFT s:", [(r.tenant, r.adapter, round(r.token_times[0], 2)) for r in ok])
        assert len(ok) == len(result.records) == 16, [
            (r.status, r.error, r.n_out) for r in result.records if not (r.ok and r.token_times)]
        time.sleep(3)  # two scrapes after the last request
        ttft = _per_tenant(prom, "lorafleet_time_to_first_token_seconds")
        tpot = _per_tenant(prom, "lorafleet_time_per_output_token_seconds")
        for tenant in ("alice", "bob"):
            mine = [r for r in ok if r.tenant == tenant]
            s0, c0 = before_ttft.get(tenant, (0.0, 0.0))
            s1, c1 = ttft[tenant]
            assert c1 - c0 == len(mine), tenant
            server = (s1 - s0) / (c1 - c0)
            client = statistics.mean(r.token_times[0] for r in mine)
            assert server <= client + 0.05, (tenant, server, client)
            assert abs(client - server) <= 0.5 + 0.25 * client, (
                tenant, server, client, [(r.adapter, round(r.token_times[0], 2)) for r in mine])
            t0s, t0c = before_tpot.get(tenant, (0.0, 0.0))
            t1s, t1c = tpot[tenant]
            server_tpot = (t1s - t0s) / (t1c - t0c)
            client_tpot = statistics.mean(
                (r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
                for r in mine if len(r.token_times) > 1)
            assert abs(client_tpot - server_tpot) <= 0.02 + 0.3 * client_tpot, (
                tenant, server_tpot, client_tpot)
        # The wait before the ingress (Ray's proxy and router) is exported on its own.
        queued = _per_tenant(prom, "lorafleet_request_queue_seconds")
        assert {"alice", "bob"} <= set(queued) and all(c > 0 for _, c in queued.values()), queued
        # Recording rules ran and every dashboard query evaluates without error.
        recorded = prom.wait_until(
            "namespace_tenant_adapter_quantile:lorafleet_time_to_first_token_seconds:"
            'histogram_quantile{tenant="alice"}', timeout=60)
        assert recorded
        assert all(rule["health"] == "ok" for rule in prom.rule_health()), prom.rule_health()
        for expr in exprs(dashboard()):
            prom.query(grafana_to_promql(expr))  # raises PromQueryError on a bad query
