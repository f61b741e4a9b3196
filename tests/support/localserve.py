"""Local processes the suites start: a ``redis-server`` and ``lorafleet serve --demo``.

Shared by ``tests/component/registry``, ``tests/e2e`` and ``tests/faults`` (this folder is on
pytest's ``pythonpath``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DATA_DIR = Path(os.environ.get("LORAFLEET_DATA_DIR", Path(__file__).resolve().parents[2] / ".lorafleet"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Redis:
    """A redis-server on a free port that can be stopped and started again on it. With
    ``persist`` it keeps an append-only file (fsync always) in ``root``, so a restart brings
    back everything written, as a production Redis with persistence would."""

    def __init__(self, root: Path, persist: bool = False) -> None:
        self.root = root
        self.persist = persist
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *aof, "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)


@dataclass
class DemoServer:
    base_url: str
    keys: dict[str, str]
    admin_key: str
    data_dir: Path
    log: Path
    pid: int


@contextmanager
def demo_server(data: Path, extra_args: Sequence[str] = (), timeout_s: float = 420) -> Iterator[DemoServer]:
    """``lorafleet serve --demo`` on SmolLM2 with two engine replicas, healthy and seeded;
    stopped (SIGINT, then SIGKILL) on exit."""
    from lorafleet.serving.demo import DEMO_MODEL_NAME
    from lorafleet.serving.demo.basemodel import prepare_base_model
    from lorafleet.serving.seed import DEMO_TENANTS

    model = prepare_base_model(DATA_DIR / "models" / DEMO_MODEL_NAME, progress=False)
    port = free_port()
    log = data / "server.log"
    cmd = [
        sys.executable, "-m", "lorafleet.serving.cli", "serve", "--demo",
        "--model-dir", str(model), "--data-dir", str(data), "--port", str(port),
        "--replicas", "2", "--max-model-len", "1024", "--kv-cache-gib", "0.5", "--dtype", "float32",
        "--max-loras", "4", "--max-lora-rank", "16",
        # The fault and e2e suites' streams run to their output limit on the demo tenants.
        "--ignore-eos-tenants", ",".join(DEMO_TENANTS), *extra_args,
    ]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(DATA_DIR / "vllm-cache")}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
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
        yield DemoServer(base, keys, (data / "admin.key").read_text().strip(), data, log, proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def stop_ray_cluster(cluster: Any) -> None:
    """Serve, this process's Ray connection, then every node of `cluster` (a
    ``ray.cluster_utils.Cluster``): the nodes go even when stopping Serve failed."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextmanager
def ray_sandbox() -> Iterator[str]:
    """A private place for a test's own Ray cluster; yields its temp dir.

    A short temp dir (Ray's Unix socket paths must stay under the kernel's limit), used as
    ``RAY_TMPDIR`` too (Ray writes its "current cluster" file there, so no other ``ray.init``
    on the machine can join this cluster), and no auth token file. The environment is put back
    and the directory removed on exit.
    """
    import shutil
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="lf-ray-")
    env = {"RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": "disabled"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    try:
        yield temp_dir
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
