"""A registry that can be switched off, and a clock the test moves: the tenancy layer's
outage tests drive both (``tests/faults``)."""

from __future__ import annotations

from typing import Any

from lorafleet.adapters.errors import RegistryUnavailable

__all__ = ["Clock", "Switchable"]


class Switchable:
    """Wraps a registry; every call raises ``RegistryUnavailable`` while ``down``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise RegistryUnavailable("registry switched off by the test")
            return await attr(*args, **kwargs)

        return call


class Clock:
    """A clock the test moves: calling it reads ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
