"""The whole server as a user runs it: ``lorafleet serve`` (Ray Serve + vLLM, SmolLM2 demo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lorafleet.serving.demo import DEMO_MODEL_NAME
from lorafleet.serving.demo.basemodel import prepare_base_model

DATA_DIR = Path(os.environ.get("LORAFLEET_DATA_DIR", Path(__file__).resolve().parents[2] / ".lorafleet"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    base_url: str
    keys: dict[str, str]
    admin_key: str
    data_dir: Path
    log: Path


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = prepare_base_model(DATA_DIR / "models" / DEMO_MODEL_NAME, progress=False)
    data = tmp_path_factory.mktemp("serve-data")
    port = free_port()
    log = data / "server.log"
    cmd = [
        sys.executable, "-m", "lorafleet.serving.cli", "serve", "--demo",
        "--model-dir", str(model), "--data-dir", str(data), "--port", str(port),
        "--replicas", "2", "--max-model-len", "1024", "--kv-cache-gib", "0.5", "--dtype", "float32",
        "--max-loras", "4", "--max-lora-rank", "16",
    ]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(DATA_DIR / "vllm-cache")}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200 and (
                    data / "demo-keys.json"
                ).exists():
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy in time:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        keys = json.loads((data / "demo-keys.json").read_text())
        yield Server(base, keys, (data / "admin.key").read_text().strip(), data, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
