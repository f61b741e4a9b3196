"""A TCP proxy that can stop forwarding: a network path whose packets are dropped.

A stopped server refuses connections at once; a black-holed one does not answer at all:
connections stay open (new ones are accepted, as a kernel backlog would) and reads wait until
the client's own timeout runs out. ``blackhole()`` stops moving bytes in both directions and
``heal()`` moves them again, nothing lost (TCP retransmits what a partition held back), so a
client that waited long enough gets its answer after the heal.

Usage (inside a running event loop)::

    proxy = await BlackholeProxy.start("127.0.0.1", redis_port)
    client = Redis(port=proxy.port)
    proxy.blackhole()
    ...
    proxy.heal()
    await proxy.close()
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["BlackholeProxy"]


class BlackholeProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False
        self.port = 0

    @classmethod
    async def start(cls, target_host: str, target_port: int) -> BlackholeProxy:
        proxy = cls(target_host, target_port)
        proxy._server = await asyncio.start_server(proxy._accept, "127.0.0.1", 0)
        proxy.port = proxy._server.sockets[0].getsockname()[1]
        return proxy

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def blackhole(self) -> None:
        """Stop forwarding: bytes sent either way wait, unanswered, until ``heal``."""
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self._closed = True
        self._flowing.set()  # connections waiting for the path to heal give up instead
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A black-holed path does not even complete the upstream connection.
        await self._flowing.wait()
        if self._closed:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(src, dst))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(65536)
                if not data:
                    break
                # Read before the black hole began: held back until it heals.
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(dst)
            with contextlib.suppress(Exception):
                dst.close()
