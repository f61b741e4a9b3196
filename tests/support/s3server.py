"""An S3-compatible server (moto) in its own process, with a log of the requests it served.

It runs out of process because moto's server imports Flask, whose context-local proxies
(``flask.request``...) raise ``RuntimeError`` on ``hasattr``; vLLM's CPU platform scans every
module's globals with ``hasattr`` when an engine starts in-process, so a Flask import in the
test process breaks every in-process engine started after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
from localserve import free_port, stop_process

_SERVER = textwrap.dedent("""
    import json, re, sys, threading
    from moto.server import ThreadedMotoServer

    port, log_path = int(sys.argv[1]), sys.argv[2]
    log, lock = open(log_path, "a", buffering=1), threading.Lock()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    app = server._server.app

    def recorder(environ, start_response):
        found = re.search(r"Credential=([^/]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        line = json.dumps([environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                           found.group(1) if found else None])
        with lock:
            log.write(line + "\\n")
        return app(environ, start_response)

    server._server.app = recorder
    sys.stdin.read()  # until the test closes our stdin
    server.stop()
""")


class S3Server:
    """``with S3Server(tmp) as s3:`` serves at ``s3.url``; ``s3.gets(part)`` lists the GETs
    whose path contains ``part`` as (method, path, access key id or None)."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.log = root / f"s3-requests-{self.port}.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> S3Server:
        self.log.touch()
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(self.port), str(self.log)],
                                     stdin=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=1)
                return self
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)

    def requests(self) -> list[tuple[str, str, str | None]]:
        lines = self.log.read_text().splitlines()
        return [tuple(json.loads(line)) for line in lines if line]  # type: ignore[misc]

    def gets(self, path_part: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests() if r[0] == "GET" and path_part in r[1]]
