"""A short workload against a real stock vLLM OpenAI server (tiny random Llama), checked
against the server's own Prometheus counters."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from lorafleet.loadtest.bench import servers
from lorafleet.loadtest.runner import run_workload
from lorafleet.loadtest.workload import parse_workload

# heavy: 80 s (stock vllm serve and LoRAFleet started side by side).
pytestmark = [pytest.mark.vllm, pytest.mark.heavy]

REPO = Path(__file__).parents[3]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    from lorafleet.serving.demo import make_tiny_model

    model = make_tiny_model(REPO / ".lorafleet" / "models" / "tiny-llama")
    tmp = tmp_path_factory.mktemp("vllm")
    port = servers.free_port()
    opts = servers.VLLMOptions(model_dir=Path(model), served_model_name="tiny", adapters={},
                               max_loras=1, max_lora_rank=8, max_cpu_loras=1,
                               max_model_len=512, kv_cache_mib=1024)
    cmd, env = servers.vllm_command(opts, port)
    env["VLLM_CACHE_ROOT"] = str(tmp / "cache")
    # Waits for the server's own /health (and fails at once if it exits); the limit is only
    # a backstop for a hung start on a loaded machine.
    with servers.running("vllm", cmd, env, port, tmp / "vllm.log", 600) as srv:
        yield srv


def counter(text: str, name: str) -> float:
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M):
        total += float(m.group(1))
    return total


def test_results_match_server_counters(vllm_server):
    wl = parse_workload({
        "seed": 5, "duration_s": 30, "max_requests": 12, "max_concurrency": 4,
        "tenants": [{"name": "t"}],
        "models": {"entries": [{"model": "tiny"}, {"model": "no-such-adapter"}],
                   "popularity": {"kind": "weights"}},
        "arrival": {"kind": "poisson", "rate": 6},
        "prompts": {"words": {"dist": "uniform", "low": 3, "high": 12}},
        "max_tokens": {"dist": "constant", "value": 16}, "ignore_eos": True,
        "stream": 0.75, "endpoint": "chat",
    })
    doc = run_workload(wl, vllm_server.base_url + "/v1", {"t": None})
    reqs = doc["requests"]
    metrics = httpx.get(vllm_server.base_url + "/metrics").text
    ok = [r for r in reqs if r["status"] == 200 and r["error"] is None]
    bad = [r for r in reqs if r["adapter"] == "no-such-adapter"]
    assert len(reqs) == 12 and bad and all(r["status"] == 404 for r in bad)
    assert len(ok) == 12 - len(bad)
    # _warmup-free run: the counters count exactly our requests.
    assert counter(metrics, "vllm:request_success_total") == len(ok)
    assert counter(metrics, "vllm:generation_tokens_total") == sum(r["n_out"] for r in ok)
    assert counter(metrics, "vllm:prompt_tokens_total") == sum(r["prompt_tokens"] for r in ok)
    assert all(r["n_out"] == 16 for r in ok)
    streamed = [r for r in ok if r["stream"]]
    assert streamed and all(len(r["token_times"]) >= 15 for r in streamed)
    s = doc["summary"]
    assert s["output_tokens"] == 16 * len(ok) and s["ttft_s"]["p50"] > 0
