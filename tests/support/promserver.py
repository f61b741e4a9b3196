"""A real Prometheus (Debian's `prometheus` binary) on loopback, for tests.

Boundary: process management and the HTTP API only. `PromServer` writes a config with one
scrape job (`job_name`, default lorafleet-serving, the job the rules select on) and the given
rule files, starts Prometheus on a free 127.0.0.1 port with its data in a temporary folder,
waits until /-/ready answers, and evaluates PromQL through /api/v1/query. Tests use it against
a static /metrics today and against a running LoRAFleet server in the integration test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from localserve import free_port, stop_process


class PromQueryError(RuntimeError):
    """Prometheus answered a query with an error (bad PromQL, evaluation failure)."""


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PromServer:
    """`with PromServer(target="127.0.0.1:8000", rule_files=[...]) as prom: prom.query(...)`."""

    def __init__(self, target: str, rule_files: Sequence[Path] = (), *,
                 job_name: str = "lorafleet-serving", metrics_path: str = "/metrics",
                 scrape_interval: str = "1s", evaluation_interval: str = "1s",
                 rule_interval: str | None = "1s", binary: str | None = None,
                 bearer_token: str | None = None) -> None:
        self.target = target
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.job_name = job_name
        self.metrics_path = metrics_path
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        # Rule groups may pin their own `interval` (30s in production); a test wants them fast.
        self.rule_interval = rule_interval
        self.binary = binary or prometheus_binary()
        self.bearer_token = bearer_token
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PromServer:
        if not self.binary:
            raise FileNotFoundError("prometheus is not installed (apt-get install prometheus)")
        self._dir = tempfile.TemporaryDirectory(prefix="lorafleet-prom-")
        root = Path(self._dir.name)
        rule_paths = []
        for i, path in enumerate(self.rule_files):
            if self.rule_interval is not None:
                rules = yaml.safe_load(path.read_text())
                for group in rules.get("groups", []):
                    group["interval"] = self.rule_interval
                path = root / f"rules-{i}-{path.name}"
                path.write_text(yaml.safe_dump(rules, sort_keys=False))
            rule_paths.append(path)
        scrape: dict[str, Any] = {"job_name": self.job_name, "metrics_path": self.metrics_path,
                                  "static_configs": [{"targets": [self.target]}]}
        if self.bearer_token:
            scrape["authorization"] = {"type": "Bearer", "credentials": self.bearer_token}
        config = {
            "global": {"scrape_interval": self.scrape_interval,
                       "evaluation_interval": self.evaluation_interval},
            "rule_files": [str(p) for p in rule_paths],
            "scrape_configs": [scrape],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self._log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [self.binary, f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("prometheus did not become ready")

    def log(self) -> str:
        return (Path(self._dir.name) / "prometheus.log").read_text() if self._dir else ""

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
            self._log.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> PromServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PromQueryError(f"{params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the result vector (raises PromQueryError on bad PromQL)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data]
        return result

    def targets_up(self) -> bool:
        data = self._get("/api/v1/targets", {"state": "active"})
        return any(t["health"] == "up" for t in data["activeTargets"])

    def rule_health(self) -> list[dict[str, Any]]:
        """Every loaded rule with its health ("ok", "err", "unknown") and last error."""
        data = self._get("/api/v1/rules", {})
        return [rule for group in data["groups"] for rule in group["rules"]]

    def wait_until(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until `expr` returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)
