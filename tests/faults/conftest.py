"""One real server for the fault suites: ``lorafleet serve --demo`` on Ray, two engine
replicas, its registry in a real ``redis-server`` that the tests stop and restart.

Redis runs with an append-only file (fsync always) in the test's directory, so a restart on
the same port brings back everything the server wrote, as a production Redis with
persistence would. At most one server runs at a time (the machine has two cores).
"""

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


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Redis:
    """A redis-server with persistence that can be stopped and started on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@dataclass
class Server:
    base_url: str
    keys: dict[str, str]
    admin_key: str
    data_dir: Path
    log: Path
    pid: int
    redis: Redis

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def tenant(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = prepare_base_model(DATA_DIR / "models" / DEMO_MODEL_NAME, progress=False)
    data = tmp_path_factory.mktemp("fault-serve")
    redis = Redis(data)
    redis.start()
    port = free_port()
    log = data / "server.log"
    cmd = [
        sys.executable, "-m", "lorafleet.serving.cli", "serve", "--demo",
        "--model-dir", str(model), "--data-dir", str(data), "--port", str(port),
        "--registry", redis.url,
        "--replicas", "2", "--max-model-len", "1024", "--kv-cache-gib", "0.5", "--dtype", "float32",
        "--max-loras", "4", "--max-lora-rank", "16",
    ]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(DATA_DIR / "vllm-cache")}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 480
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
        yield Server(base, keys, (data / "admin.key").read_text().strip(), data, log, proc.pid, redis)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        redis.stop()
