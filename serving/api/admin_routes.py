"""Admin API: tenants, keys and adapters (``/admin/v1``), behind the admin credential.

Boundary: the only HTTP surface that writes the registry. Adapter intake (fetch, validate,
cache, register) is ``lorafleet.adapters.ingest``; this module only maps its outcomes to
HTTP. Plaintext API keys leave the server exactly once, in the answer that creates them.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from lorafleet.adapters.cache import AdapterCache
from lorafleet.adapters.errors import (
    AdapterFetchError,
    AdapterValidationError,
    CacheFull,
    InvalidName,
)
from lorafleet.adapters.ingest import import_adapter
from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import AdapterRecord, ApiKey, Quota, Tenant
from lorafleet.adapters.registry.identity import RegistryIdentity, RegistryTrust
from lorafleet.adapters.validation import ValidationLimits

from ..engine.errors import EngineError, public_message
from ..engine.protocol import AdapterRef
from .body import parse_model, read_json
from .errors import (
    Conflict,
    InsufficientStorage,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    UnprocessableAdapter,
)
from .services import ApiServices


class QuotaBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_concurrent: int | None = Field(default=None, ge=0, description="Concurrent requests.")
    requests_per_minute: int | None = Field(default=None, ge=0, description="Requests/minute.")
    tokens_per_minute: int | None = Field(default=None, ge=0, description="Tokens/minute.")


class TenantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Tenant name: a-z 0-9 . _ -")
    display_name: str | None = Field(default=None, max_length=200, description="Human name.")
    quota: QuotaBody | None = Field(default=None, description="Limits; unset means unlimited.")


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Adapter name inside the tenant (the API's `model`).")
    source: str = Field(description="Path, file://, hf://, http(s):// or s3:// URI.")
    secret_ref: str | None = Field(
        default=None, description="Secret holding the source's credentials, mounted on every "
        "serving pod under the adapter secrets dir (lorafleet.adapters.secrets).")
    shared: bool = Field(default=False, description="Visible to every tenant.")
    load: bool = Field(default=True, description="Load it on the engine replicas now.")


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int | None = Field(default=None, ge=1, description="How many replicas; all if unset.")


def _tenant_json(t: Tenant) -> dict[str, Any]:
    return t.to_dict()


def build_admin_router(services: ApiServices) -> APIRouter:
    async def admin_only(request: Request) -> None:
        services.check_admin(request.headers.get("authorization"))

    # Authentication is the router's: a route added here cannot forget it.
    router = APIRouter(prefix="/admin/v1", dependencies=[Depends(admin_only)])
    reg = services.registry

    async def guard(request: Request) -> None:
        if request.method != "GET":  # no writes into a registry that was reset or rolled back
            await services.tenancy.check_writable()
        # Every admin route may write the registry: drop this process's cached lookups.
        services.tenancy.invalidate()

    async def body(request: Request, model: type[BaseModel]) -> Any:
        return parse_model(model, await read_json(request, services.max_body_bytes))

    async def tenant_or_404(name: str) -> Tenant:
        t = await reg.get_tenant(name)
        if t is None:
            raise NotFound(f"No tenant named `{name}`.")
        return t

    async def holders() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for s in await services.engines.replica_stats():
            for a in s.resident_adapters:
                out.setdefault(a, []).append(s.replica_id)
        return out

    def adapter_json(a: AdapterRecord, where: dict[str, list[str]]) -> dict[str, Any]:
        return {
            "id": a.adapter_id,
            "tenant": a.tenant,
            "name": a.name,
            "source": a.source,
            "base_model": a.base_model,
            "digest": a.digest,
            "rank": a.rank,
            "alpha": a.alpha,
            "target_modules": list(a.target_modules),
            "size_bytes": a.size_bytes,
            "shared": a.shared,
            "created_at": a.created_at,
            "replicas": sorted(where.get(a.adapter_id, [])),
        }

    async def load(a: AdapterRecord, replicas: int | None) -> None:
        started = services.clock()
        try:
            await services.engines.load_adapter(AdapterRef.of(a), replicas)
        except EngineError as e:
            raise ServiceUnavailable(
                f"Adapter `{a.name}` could not be loaded: {public_message(e)}") from e
        services.metrics.adapter_load.observe(services.clock() - started)

    @router.post("/tenants", status_code=201)
    async def create_tenant(request: Request) -> Any:
        await guard(request)
        b: TenantBody = await body(request, TenantBody)
        q = b.quota or QuotaBody()
        try:
            tenant = Tenant(
                name=b.name,
                display_name=b.display_name or b.name,
                quota=Quota(q.max_concurrent, q.requests_per_minute, q.tokens_per_minute),
                created_at=services.wall_clock(),
            )
        except (InvalidName, ValueError) as e:
            raise InvalidRequest(str(e), param="name") from e
        existing = await reg.get_tenant(b.name)
        if existing is not None:
            tenant = Tenant(tenant.name, tenant.display_name, tenant.quota, existing.created_at)
        await reg.put_tenant(tenant)
        return _tenant_json(tenant)

    @router.get("/tenants")
    async def list_tenants(request: Request) -> Any:
        await guard(request)
        return {"data": [_tenant_json(t) for t in await reg.list_tenants()]}

    @router.get("/tenants/{tenant}")
    async def get_tenant(tenant: str, request: Request) -> Any:
        await guard(request)
        t = await tenant_or_404(tenant)
        keys = await reg.list_keys(tenant)
        return {**_tenant_json(t), "keys": [
            {"key_id": k.key_id, "created_at": k.created_at, "revoked": k.revoked} for k in keys
        ]}

    @router.delete("/tenants/{tenant}", status_code=204)
    async def delete_tenant(tenant: str, request: Request) -> Response:
        await guard(request)
        await tenant_or_404(tenant)
        for a in await reg.list_adapters(tenant):
            await services.engines.unload_adapter(a.adapter_id)
        await reg.delete_tenant(tenant)
        return Response(status_code=204)

    @router.post("/tenants/{tenant}/keys", status_code=201)
    async def create_key(tenant: str, request: Request) -> Any:
        await guard(request)
        await tenant_or_404(tenant)
        plaintext, key_id = generate_key()
        await reg.add_key(ApiKey(key_id, tenant, hash_key(plaintext), services.wall_clock()))
        return {"key": plaintext, "key_id": key_id, "tenant": tenant}

    @router.delete("/tenants/{tenant}/keys/{key_id}", status_code=204)
    async def revoke_key(tenant: str, key_id: str, request: Request) -> Response:
        await guard(request)
        await tenant_or_404(tenant)
        if not any(k.key_id == key_id for k in await reg.list_keys(tenant)):
            raise NotFound(f"No key `{key_id}` for tenant `{tenant}`.")
        await reg.revoke_key(tenant, key_id)
        return Response(status_code=204)

    @router.post("/tenants/{tenant}/adapters", status_code=201)
    async def create_adapter(tenant: str, request: Request) -> Any:
        await guard(request)
        await tenant_or_404(tenant)
        b: AdapterBody = await body(request, AdapterBody)
        intake = services.intake
        if intake is None:
            raise ServiceUnavailable("Adapter intake is not configured on this server.")
        if b.name == services.served_model_name:
            raise Conflict(f"`{b.name}` is the base model's name.", param="name")
        previous = await reg.get_adapter(tenant, b.name)
        try:
            record = await import_adapter(
                tenant=tenant,
                name=b.name,
                source=b.source,
                shared=b.shared,
                registry=reg,
                cache=AdapterCache(intake.cache_dir, intake.cache_bytes),
                base=intake.base,
                limits=ValidationLimits(max_rank=intake.max_rank, max_bytes=intake.max_bytes),
                work_dir=intake.work_dir,
                secret_ref=b.secret_ref,
                secrets=intake.secrets,
                store=intake.store,
            )
        except InvalidName as e:
            raise InvalidRequest(str(e), param="name") from e
        except CacheFull as e:
            raise InsufficientStorage(f"Adapter not added: {e}. Free space and retry.") from e
        except AdapterValidationError as e:
            raise UnprocessableAdapter(f"Adapter refused: {e.reason}", code=e.code) from e
        except AdapterFetchError as e:
            if e.transient:
                raise ServiceUnavailable(f"Could not fetch the adapter: {e.reason}") from e
            raise UnprocessableAdapter(f"Could not fetch the adapter: {e.reason}", code="fetch_failed") from e
        if b.load:
            await load(record, None)
        if previous is not None and previous.adapter_id != record.adapter_id:
            # A new revision under the same name: requests now resolve to the new id (loaded
            # above when asked), so the old one can go; if it is still busy the replicas' LRU
            # drops it once idle.
            with contextlib.suppress(EngineError):
                await services.engines.unload_adapter(previous.adapter_id)
        return adapter_json(record, await holders())

    @router.get("/tenants/{tenant}/adapters")
    async def list_adapters(tenant: str, request: Request) -> Any:
        await guard(request)
        await tenant_or_404(tenant)
        where = await holders()
        return {"data": [adapter_json(a, where) for a in await reg.list_adapters(tenant)]}

    async def adapter_or_404(tenant: str, name: str) -> AdapterRecord:
        a = await reg.get_adapter(tenant, name)
        if a is None:
            raise NotFound(f"No adapter `{name}` in tenant `{tenant}`.")
        return a

    @router.get("/tenants/{tenant}/adapters/{name}")
    async def get_adapter(tenant: str, name: str, request: Request) -> Any:
        await guard(request)
        return adapter_json(await adapter_or_404(tenant, name), await holders())

    @router.post("/tenants/{tenant}/adapters/{name}/load")
    async def load_adapter(tenant: str, name: str, request: Request) -> Any:
        await guard(request)
        a = await adapter_or_404(tenant, name)
        b: LoadBody = await body(request, LoadBody)
        await load(a, b.replicas)
        return adapter_json(a, await holders())

    @router.delete("/tenants/{tenant}/adapters/{name}", status_code=204)
    async def delete_adapter(tenant: str, name: str, request: Request) -> Response:
        await guard(request)
        a = await adapter_or_404(tenant, name)
        # Unregister first so no new request can resolve it, then unload everywhere.
        await reg.delete_adapter(tenant, name)
        try:
            await services.engines.unload_adapter(a.adapter_id)
        except EngineError as e:
            raise ServiceUnavailable(f"Adapter unregistered but not yet unloaded: {e}") from e
        return Response(status_code=204)

    def identity_json(i: RegistryIdentity | None) -> dict[str, Any] | None:
        return None if i is None else {"registry_id": i.registry_id, "generation": i.generation,
                                       "supersedes": sorted(i.supersedes)}

    def trust_json(t: RegistryTrust) -> dict[str, Any]:
        return {"trusted": t.trusted, "refused": t.refused, "known": identity_json(t.known),
                "seen": identity_json(t.seen)}

    @router.get("/registry")
    async def registry_status() -> Any:
        """What this ingress believes about the registry: the identity it trusts, the one it
        last read, and whether it refuses the registry as reset or rolled back."""
        return trust_json(await services.tenancy.refresh_trust())

    @router.post("/registry/accept-restore")
    async def accept_restore() -> Any:
        """Accept the registry as it is now (after a restore from backup, or knowingly starting
        over): it gets a new id that every ingress adopts on its next read."""
        await services.tenancy.accept_restore()
        return trust_json(services.tenancy.trust)

    @router.get("/replicas")
    async def replicas(request: Request) -> Any:
        await guard(request)
        return {"data": [
            {"replica_id": s.replica_id, "adapters": list(s.resident_adapters),
             "in_flight": s.in_flight, "max_loras": s.max_loras, "max_cpu_loras": s.max_cpu_loras,
             "healthy": s.healthy, "engine_pids": list(s.engine_pids)}
            for s in await services.engines.replica_stats()
        ]}

    return router
