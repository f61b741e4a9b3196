"""When a request reached the HTTP server: the start of TTFT, and its queueing time.

Boundary: a pure ASGI middleware that runs in Ray Serve's HTTP proxy, and a pure function
that the ingress uses to read what it stamped. No Ray import.

Ray Serve's proxy accepts the HTTP request, then routes it to an ingress replica through
Ray's router; on a busy node that hop queues (measured on the 2-core CPU machine under
load: 0.25-1.2 s). A TTFT that starts in the ingress handler hides that wait from the SLO.
So the proxy stamps each request with the wall-clock time it reached the HTTP server
(``RECEIVED_AT_HEADER``), through Ray's supported hook for proxy middlewares
(``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` naming ``proxy_middlewares``). The
ingress starts TTFT and end-to-end latency at that moment and exports the proxy-to-ingress
wait as ``lorafleet_request_queue_seconds``.

Trust: the middleware drops any value a client sent under that header before stamping,
and the ingress reads the header only when this process's environment says the proxy
stamps it (the same variable, set for every Ray node by ``lorafleet serve`` and the chart);
otherwise a client could inflate the metrics. Proxy and ingress may run on different nodes:
the wait then includes their clock offset (NTP keeps it to milliseconds); it is clamped
at 0 and at ``MAX_QUEUE_S``.
"""

from __future__ import annotations

import os
import time
from typing import Any

RECEIVED_AT_HEADER = "x-lorafleet-received-at"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "lorafleet.serving.api.arrival:proxy_middlewares"
MAX_QUEUE_S = 600.0
"""A stamp further back than this is not a queue but a clock or a forgery: ignored."""

_HEADER = RECEIVED_AT_HEADER.encode()


class StampArrival:
    """Pure ASGI middleware (no buffering, so streaming passes through untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != _HEADER]
            headers.append((_HEADER, repr(time.time()).encode()))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def proxy_middlewares() -> list[Any]:
    """The callback Ray Serve's proxy calls at start-up (``CALLBACK_ENV``)."""
    from starlette.middleware import Middleware

    return [Middleware(StampArrival)]


def proxy_environment() -> dict[str, str]:
    """What every Ray node's environment needs for its proxy to stamp arrivals."""
    return {CALLBACK_ENV: CALLBACK_PATH}


def proxy_stamps_arrival(environ: dict[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(CALLBACK_ENV) == CALLBACK_PATH


def queued_seconds(stamp: str | None, now_wall: float) -> float:
    """Seconds between the proxy's stamp and ``now_wall``; 0 when absent or not credible."""
    if not stamp:
        return 0.0
    try:
        waited = now_wall - float(stamp)
    except ValueError:
        return 0.0
    if not 0.0 <= waited <= MAX_QUEUE_S:  # also rejects nan
        return 0.0
    return waited
