"""The admin API on a port of its own (``ServeSettings.admin_port``).

Boundary: one uvicorn server for ``build_admin_app(services)``, started on the event loop
that runs the ingress (so the admin routes share its registry clients, which belong to that
loop). Ray Serve's HTTP proxy has one port, the public one; this listener is what makes a
second one, so that a NetworkPolicy or a firewall can keep the admin API inside the cluster
while the OpenAI API is public.

Several ingress replicas may run on one node: each binds the port with ``SO_REUSEPORT`` and
the kernel spreads connections over them (every replica answers the admin API alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from .api.app import build_admin_app
from .api.services import ApiServices

__all__ = ["AdminListener"]

log = logging.getLogger(__name__)


class AdminListener:
    """Serves the admin API on ``host:port`` until ``stop``."""

    def __init__(self, services: ApiServices, host: str, port: int) -> None:
        self.host, self.port = host, port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._socket.bind((host, port))  # fails here, at startup, if the port is taken
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(build_admin_app(services), log_level="warning", lifespan="off",
                                access_log=False)
        self._server = uvicorn.Server(config)
        # uvicorn takes SIGINT/SIGTERM while it serves (on the main thread); the ingress's
        # process (a Ray worker, `lorafleet serve`, a test) owns its signals.
        self._server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._task: asyncio.Task[None] | None = None

    def start(self) -> AdminListener:
        """Start serving on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(
            self._server.serve(sockets=[self._socket]))
        self._task.add_done_callback(self._ended)
        return self

    async def started(self) -> None:
        while not self._server.started:
            if self._task is not None and self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._socket.close()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the admin listener on %s:%d stopped: %r", self.host, self.port,
                      task.exception())
