"""bench's server handling: both systems get the same engine knobs; stop leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from lorafleet.loadtest.bench import servers
from lorafleet.loadtest.bench.harness import register_adapters
from lorafleet.loadtest.errors import ServerStartError


def _flags(cmd: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command line (flags without a value map to "")."""
    out: dict[str, str] = {}
    for i, tok in enumerate(cmd):
        if tok.startswith("--"):
            nxt = cmd[i + 1] if i + 1 < len(cmd) else ""
            out[tok] = "" if nxt.startswith("--") else nxt
    return out


def test_both_systems_get_the_same_engine_knobs(tmp_path: Path) -> None:
    common = dict(
        model_dir=tmp_path / "m", served_model_name="M", max_loras=8, max_lora_rank=8,
        max_cpu_loras=32, max_model_len=1024, kv_cache_mib=96, max_num_seqs=48, reserved_cpus=1,
    )
    vcmd, venv = servers.vllm_command(servers.VLLMOptions(adapters={}, **common), 1)
    lcmd, lenv = servers.lorafleet_command(
        servers.LoRAFleetOptions(data_dir=tmp_path / "d", admin_key="k", **common), 2
    )
    v, lf = _flags(vcmd), _flags(lcmd)
    for flag in ("--max-loras", "--max-lora-rank", "--max-cpu-loras", "--max-model-len",
                 "--max-num-seqs", "--dtype", "--served-model-name"):
        assert v[flag] == lf[flag], flag
    assert v["--dtype"] != "auto"  # explicit, so both resolve it the same way
    # KV cache: the same bytes for both (not vLLM's whole-GiB CPU environment variable).
    assert float(lf["--kv-cache-gib"]) * 2**30 == int(v["--kv-cache-memory-bytes"]) == 96 * 2**20
    assert "VLLM_CPU_KVCACHE_SPACE" not in venv
    assert venv["VLLM_CPU_NUM_OF_RESERVED_CPU"] == lenv["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert lf["--no-demo"] == ""


def test_unset_slots_leave_lorafleet_its_platform_default(tmp_path: Path) -> None:
    common = dict(model_dir=tmp_path / "m", served_model_name="M", max_loras=None,
                  max_lora_rank=8, max_cpu_loras=32)
    lcmd, lenv = servers.lorafleet_command(
        servers.LoRAFleetOptions(data_dir=tmp_path / "d", admin_key="k", intake_concurrency=3,
                                 **common), 2)
    assert "--max-loras" not in lcmd
    assert lenv["LORAFLEET_INTAKE_MAX_CONCURRENT"] == "3"
    # Stock vLLM's own default is one slot: it must be given a number, never left to guess.
    with pytest.raises(ServerStartError):
        servers.vllm_command(servers.VLLMOptions(adapters={}, **common), 1)


def test_registration_runs_imports_concurrently_and_retries_busy_ones(tmp_path: Path) -> None:
    """A server that runs two imports at once and answers 503 to a third: four threads finish
    every import, in less time than one at a time would take, and none is lost."""
    running: set[str] = set()
    done: list[str] = []
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        name = json.loads(request.content)["name"]
        with lock:
            if len(running) >= 2:
                return httpx.Response(503, json={"error": {"message": "busy"}})
            running.add(name)
        time.sleep(0.1)
        with lock:
            running.discard(name)
            done.append(name)
        return httpx.Response(201, json={"name": name})

    admin = servers.AdminClient("http://test", "k")
    admin._http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    admin.BUSY_RETRY_S = 0.01
    names = [f"a{i:02d}" for i in range(8)]
    took = register_adapters(admin, "t", [(n, tmp_path / n, True) for n in names],
                             concurrency=4)
    assert sorted(done) == names
    assert took < 8 * 0.1  # two at a time: ~0.4 s


PARENT = textwrap.dedent("""
    import signal, subprocess, sys, time
    # A child in a session of its own (as Ray starts its workers) that ignores SIGTERM.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
        start_new_session=True,
    )
    open(sys.argv[1], "w").write(str(child.pid))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the parent exits, the child stays
    time.sleep(120)
""")


def test_stop_kills_descendants_outside_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    server = servers.start(
        "fake", [sys.executable, "-c", PARENT, str(pid_file)], env={}, port=0,
        log_path=tmp_path / "log",
    )
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = psutil.Process(int(pid_file.read_text()))
    assert child.is_running()
    survivors = servers.stop(server, term_timeout_s=5, reap_timeout_s=0.5)
    assert survivors == []
    assert server.proc.poll() is not None
    with contextlib.suppress(psutil.NoSuchProcess):
        assert child.status() == psutil.STATUS_ZOMBIE


def test_stop_of_an_exited_server_is_a_no_op(tmp_path: Path) -> None:
    server = servers.start("fake", [sys.executable, "-c", "pass"], env={}, port=0,
                           log_path=tmp_path / "log")
    server.proc.wait(timeout=30)
    assert servers.stop(server) == []
    assert isinstance(server.proc, subprocess.Popen)


def test_resolver_view_names_the_model_path(tmp_path: Path) -> None:
    """vLLM's filesystem resolver compares base_model_name_or_path with the model path."""
    import json

    src = tmp_path / "cold" / "c00"
    src.mkdir(parents=True)
    (src / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "M", "r": 8}))
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    model_dir = tmp_path / "models" / "M"
    view = servers.resolver_view(tmp_path / "cold", ["c00"], model_dir, tmp_path / "view")
    config = json.loads((view / "c00" / "adapter_config.json").read_text())
    assert config == {"peft_type": "LORA", "base_model_name_or_path": str(model_dir), "r": 8}
    assert (view / "c00" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"] == "M"
    servers.resolver_view(tmp_path / "cold", ["c00"], model_dir, tmp_path / "view")  # idempotent
