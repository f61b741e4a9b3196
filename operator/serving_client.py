"""A small async client for the serving admin API (docs/contracts.md), as the operator uses it.

Boundary: HTTP only, and the translation of answers into `lorafleet.operator.errors`. It decides
nothing. Tests inject an `httpx` transport (`httpx.MockTransport`, `httpx.ASGITransport`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

import httpx

from .decisions import ServingAdapter
from .errors import (
    AdapterNotFound,
    AdapterRejected,
    ServingError,
    ServingUnavailable,
    TenantMissing,
)

__all__ = ["ServingClient"]

_PREFIX = "/admin/v1"


class ServingClient:
    """The admin API calls the operator makes. Owns its `httpx.AsyncClient`; close with `aclose`."""

    def __init__(
        self,
        base_url: str,
        admin_key: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 120.0,
        replicas_ttl: float = 1.0,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {admin_key}"},
            transport=transport,
            # Registration fetches and validates the adapter: allow for a slow source.
            timeout=httpx.Timeout(timeout, connect=5.0),
        )
        # Timers of many adapters ask for the replica list: one answer serves them for a while.
        self._replicas_ttl = replicas_ttl
        self._replicas_cache: tuple[float, list[dict[str, Any]]] | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def register_adapter(self, tenant: str, name: str, source: str,
                               *, load: bool = False,
                               secret_ref: str | None = None) -> ServingAdapter:
        """Fetch, validate and register (`POST .../adapters`); an existing name is replaced.

        `secret_ref` names the Secret with the source's credentials; serving reads it from its
        mounted secrets directory (`lorafleet.adapters.secrets`), never the operator's."""
        body: dict[str, Any] = {"name": name, "source": source, "load": load}
        if secret_ref is not None:
            body["secret_ref"] = secret_ref
        try:
            data = await self._call("POST", f"/tenants/{tenant}/adapters", json=body)
        except AdapterNotFound as exc:  # the only thing a POST to the collection can miss
            raise TenantMissing(f"tenant {tenant!r} is not registered: {exc.message}",
                                status=404) from exc
        self.invalidate_replicas()
        return ServingAdapter.from_api(data)

    async def load_adapter(self, tenant: str, name: str, replicas: int) -> ServingAdapter:
        data = await self._call("POST", f"/tenants/{tenant}/adapters/{name}/load",
                                json={"replicas": replicas})
        self.invalidate_replicas()
        return ServingAdapter.from_api(data)

    async def get_adapter(self, tenant: str, name: str) -> ServingAdapter | None:
        try:
            data = await self._call("GET", f"/tenants/{tenant}/adapters/{name}")
        except AdapterNotFound:
            return None
        return ServingAdapter.from_api(data)

    async def delete_adapter(self, tenant: str, name: str) -> None:
        """Unload everywhere and unregister; an adapter serving does not know is already gone."""
        with contextlib.suppress(AdapterNotFound):
            await self._call("DELETE", f"/tenants/{tenant}/adapters/{name}")
        self.invalidate_replicas()

    async def list_replicas(self, *, now: float | None = None) -> list[dict[str, Any]]:
        """`[{replica_id, adapters: [ids]}]`, cached for `replicas_ttl` seconds."""
        now = time.monotonic() if now is None else now
        cached = self._replicas_cache
        if cached is not None and now - cached[0] < self._replicas_ttl:
            return cached[1]
        data = await self._call("GET", "/replicas")
        # The admin API wraps lists as `{"data": [...]}`; a bare list is accepted too.
        replicas = list(data) if isinstance(data, list) else list(data.get("data") or [])
        self._replicas_cache = (now, replicas)
        return replicas

    def invalidate_replicas(self) -> None:
        self._replicas_cache = None

    async def _call(self, method: str, path: str, *,
                    json: Mapping[str, Any] | None = None) -> Any:
        try:
            response = await self._client.request(method, _PREFIX + path, json=json)
        except httpx.HTTPError as exc:  # connection refused, timeouts, protocol errors
            raise ServingUnavailable(f"serving admin API unreachable: {exc!r}") from exc
        if response.status_code < 300:
            return response.json() if response.content else None
        raise _error_for(response)


def _error_for(response: httpx.Response) -> ServingError:
    status = response.status_code
    try:
        error = response.json().get("error") or {}
        message = str(error.get("message") or response.text)
    except (ValueError, AttributeError):
        message = response.text
    if status in (400, 413, 422):
        return AdapterRejected(message, status=status)
    if status == 404:
        return AdapterNotFound(message, status=status)
    if status == 429 or status >= 500:
        return ServingUnavailable(f"serving answered {status}: {message}", status=status)
    # 401/403 (wrong admin key) and anything else: worth retrying after an operator fixes it.
    return ServingUnavailable(f"serving answered {status}: {message}", status=status)
