"""kopf handlers for LoRAAdapter and Tenant, registered on an explicit `kopf.OperatorRegistry`.

Boundary: thin. Each handler reads the resource, asks `serving`/`tenants` what is true now, lets
`decisions` choose, performs that one step, and writes the status. Retry policy is carried by
exception types: transient trouble -> `kopf.TemporaryError(delay=)`, an invalid adapter or spec
-> status Failed and `kopf.PermanentError` (never retried until the spec changes).

`make_registry(deps)` returns a registry with no global state, so tests run the real operator
in-process against the Kubernetes API emulator with their own serving and registry.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from . import GROUP, VERSION
from .decisions import (
    Action,
    AdapterSpec,
    AdapterStatus,
    Decision,
    Observed,
    Phase,
    TenantPhase,
    adapter_status_patch,
    decide_adapter_action,
    decide_cleanup,
    decide_key_changes,
    decide_tenant_binding,
    parse_adapter_spec,
    retry_delay,
    set_condition,
    source_key,
    source_ref,
)
from .errors import AdapterRejected, ServingError, ServingUnavailable, SpecError, TenantMissing
from .metrics import AdapterPhases
from .serving_client import ServingClient
from .settings import OperatorConfig
from .tenant_store import TenantStore

__all__ = ["Dependencies", "make_registry", "make_settings"]

ADAPTERS = "loraadapters"
TENANTS = "tenants"
DEFAULT_SECRET_KEY = "apiKey"
# One call may take serving from "unknown" to "registered" to "loaded" to "confirmed".
_MAX_STEPS = 4


@dataclass
class Dependencies:
    """Everything the handlers touch, injected (no module-level clients)."""

    serving: ServingClient
    tenants: TenantStore
    config: OperatorConfig = field(default_factory=lambda: OperatorConfig())
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    phases: AdapterPhases = field(default_factory=AdapterPhases)


def make_settings(settings: kopf.OperatorSettings | None = None) -> kopf.OperatorSettings:
    """kopf settings the CRDs rely on: progress in annotations (the status schema is strict)."""
    settings = settings or kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    return settings


# --- adapters ---------------------------------------------------------------------------------


async def _observe(deps: Dependencies, spec: AdapterSpec) -> Observed:
    adapter = await deps.serving.get_adapter(spec.tenant, spec.name)
    replicas = await deps.serving.list_replicas()
    return Observed(adapter=adapter, replica_count=len(replicas))


def _write(patch: kopf.Patch, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        patch.status[key] = value


def _bound_spec(deps: Dependencies, name: str, namespace: str | None,
                spec: Mapping[str, Any], generation: int = 1) -> AdapterSpec:
    """The adapter spec, if its namespace may act for its tenant; else `ValueError`."""
    aspec = parse_adapter_spec(name, spec, generation)
    refusal = decide_tenant_binding(aspec.tenant, namespace, deps.config.tenant_namespaces)
    if refusal is not None:
        raise _NotBound(refusal)
    return aspec


class _NotBound(ValueError):
    """The object's namespace may not act for the tenant it names."""


async def reconcile_adapter(
    deps: Dependencies,
    *,
    name: str,
    namespace: str | None,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    meta: Mapping[str, Any],
    patch: kopf.Patch,
    retry: int,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> str:
    """Bring serving in line with one LoRAAdapter; returns the phase it reached."""
    generation = int(meta.get("generation") or 1)
    current = AdapterStatus.from_dict(status)
    now = deps.clock()
    try:
        aspec = _bound_spec(deps, name, namespace, spec, generation)
    except ValueError as exc:
        reason = "TenantNotBound" if isinstance(exc, _NotBound) else "InvalidSpec"
        _write(patch, {"phase": Phase.FAILED.value, "message": str(exc),
                       "observedGeneration": generation, "failedGeneration": generation,
                       "conditions": set_condition(current.conditions, type_="Ready",
                                                   status=False, reason=reason,
                                                   message=str(exc), generation=generation,
                                                   now=now)})
        raise kopf.PermanentError(str(exc)) from exc

    observed: Observed | None = None
    answer: Observed | None = None  # what serving answered to our last register/load call
    try:
        for _ in range(_MAX_STEPS):
            # Serving's answer to a load lists the replicas that hold the adapter: that is its
            # confirmation (under churn a later GET may already show it evicted elsewhere).
            observed = answer or await _observe(deps, aspec)
            answer = None
            decision = decide_adapter_action(aspec, current, observed)
            logger.debug("adapter %s/%s: %s (%s)", aspec.tenant, aspec.name,
                         decision.action, decision.reason)
            if decision.action is Action.REGISTER:
                # A first registration is checked (base model) before anything loads; a new
                # version loads at once, so the name never points at an unloaded adapter long.
                rolling = decision.reason == "SourceChanged"
                try:
                    registered = await deps.serving.register_adapter(
                        aspec.tenant, aspec.name, source_ref(aspec), load=rolling,
                        secret_ref=aspec.secret_ref)
                except AdapterRejected as exc:
                    decision = Decision(Action.FAIL, Phase.FAILED, "ValidationFailed",
                                        exc.message)
                    _write(patch, adapter_status_patch(aspec, current, decision, None, now))
                    raise kopf.PermanentError(exc.message) from exc
                current = dataclasses.replace(current, registered_source=source_key(aspec))
                answer = dataclasses.replace(observed, adapter=registered)
            elif decision.action is Action.LOAD:
                try:
                    loaded = await deps.serving.load_adapter(aspec.tenant, aspec.name,
                                                             decision.wanted)
                except AdapterRejected as exc:  # e.g. the engine refused to load it
                    decision = Decision(Action.FAIL, Phase.FAILED, "LoadFailed", exc.message)
                    _write(patch, adapter_status_patch(aspec, current, decision, None, now))
                    raise kopf.PermanentError(exc.message) from exc
                answer = dataclasses.replace(observed, adapter=loaded)
            elif decision.action is Action.REJECT:
                # Registered but not what the spec says: nothing of it may stay loaded.
                await deps.serving.delete_adapter(aspec.tenant, aspec.name)
                _write(patch, adapter_status_patch(aspec, current, decision, None, now))
                raise kopf.PermanentError(decision.message)
            elif decision.action is Action.FAIL:
                return decision.phase.value  # already Failed for this generation: no retry
            elif decision.action is Action.READY:
                _write(patch, adapter_status_patch(aspec, current, decision, observed, now))
                return decision.phase.value
            else:  # WAIT
                _write(patch, adapter_status_patch(aspec, current, decision, observed, now))
                raise kopf.TemporaryError(decision.message, delay=decision.delay or 1.0)
        # Serving accepted the requests but does not confirm yet (a load in flight): look again.
        decision = decide_adapter_action(aspec, current, observed) if observed else decision
        _write(patch, adapter_status_patch(aspec, current, decision, observed, now))
        raise kopf.TemporaryError(f"waiting for serving to confirm: {decision.message}",
                                  delay=retry_delay(retry, cap=deps.config.max_backoff_seconds))
    except (ServingUnavailable, TenantMissing) as exc:
        phase = Phase.PENDING if isinstance(exc, TenantMissing) else (
            current.phase or Phase.PENDING)
        if phase is Phase.READY:
            phase = Phase.LOADING  # we cannot confirm it right now
        reason = "TenantMissing" if isinstance(exc, TenantMissing) else "ServingUnavailable"
        decision = Decision(Action.WAIT, phase, reason, exc.message)
        _write(patch, adapter_status_patch(aspec, current, decision, observed, now))
        raise kopf.TemporaryError(exc.message, delay=retry_delay(
            retry, cap=deps.config.max_backoff_seconds)) from exc
    except ServingError as exc:
        raise kopf.TemporaryError(exc.message, delay=retry_delay(
            retry, cap=deps.config.max_backoff_seconds)) from exc


async def cleanup_adapter(deps: Dependencies, *, name: str, namespace: str | None,
                          spec: Mapping[str, Any], patch: kopf.Patch) -> None:
    """Unload everywhere and unregister; the finalizer goes once serving forgot the adapter."""
    try:
        aspec = _bound_spec(deps, name, namespace, spec)
    except ValueError:
        # Never acted on; and an object naming a tenant its namespace is not bound to must
        # not delete that tenant's adapter of the same name on its way out.
        return
    try:
        for _ in range(2):
            adapter = await deps.serving.get_adapter(aspec.tenant, aspec.name)
            decision = decide_cleanup(Observed(adapter=adapter, replica_count=0))
            if decision.action is Action.DONE:
                return
            patch.status["phase"] = Phase.DELETING.value
            await deps.serving.delete_adapter(aspec.tenant, aspec.name)
        raise kopf.TemporaryError("serving still lists the adapter", delay=1.0)
    except ServingError as exc:
        raise kopf.TemporaryError(exc.message, delay=2.0) from exc


# --- tenants ----------------------------------------------------------------------------------


def _secret_key_entries(body: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """For each data item of a Secret that holds a LoRAFleet key: `(key_id, key_hash)`.

    The plaintext lives only in this function's frame; nothing else is kept or logged.
    """
    from lorafleet.adapters.keys import hash_key, key_id_of

    entries: dict[str, tuple[str, str]] = {}
    for data_key, encoded in (body.get("data") or {}).items():
        try:
            plaintext = base64.b64decode(encoded, validate=True).decode("utf-8").strip()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        key_id = key_id_of(plaintext)
        if key_id is not None:
            entries[data_key] = (key_id, hash_key(plaintext))
    return entries


def _quota_of(spec: Mapping[str, Any]) -> dict[str, int | None]:
    quota = spec.get("quota") or {}
    return {
        "requests_per_minute": quota.get("requestsPerMinute"),
        "tokens_per_minute": quota.get("tokensPerMinute"),
        "max_concurrent": quota.get("maxConcurrent"),
    }


def _first(store: Any) -> Any:
    for item in store or ():
        return item
    return None


async def sync_tenant(
    deps: Dependencies,
    *,
    name: str,
    namespace: str | None,
    spec: Mapping[str, Any],
    secret_keys: Mapping[Any, Any],
) -> tuple[int, list[str]]:
    """Make the registry's tenant and keys match the Tenant and its Secrets.

    Returns `(key_count, problems)`; problems name Secrets, never their contents.
    """
    desired: dict[str, str] = {}
    problems: list[str] = []
    for ref in spec.get("apiKeySecrets") or ():
        data_key = ref.get("key") or DEFAULT_SECRET_KEY
        entries = _first(secret_keys.get((namespace, ref["name"])))
        if entries is None:
            problems.append(f"Secret {ref['name']!r} not found")
            continue
        entry = entries.get(data_key)
        if entry is None:
            problems.append(f"Secret {ref['name']!r} has no LoRAFleet key (lf_<id>_<secret>) "
                            f"under {data_key!r}")
            continue
        desired[entry[0]] = entry[1]
    await deps.tenants.upsert_tenant(name, spec.get("displayName") or name, _quota_of(spec))
    registered = await deps.tenants.list_keys(name)
    plan = decide_key_changes(desired, registered)
    for key_id in plan.revoke:
        await deps.tenants.revoke_key(name, key_id)
    for key_id, key_hash in plan.add.items():
        try:
            await deps.tenants.add_key(name, key_id, key_hash)
        except SpecError as exc:
            problems.append(str(exc))
            desired.pop(key_id)
    return len(desired), problems


# --- the registry -----------------------------------------------------------------------------


def make_registry(
    deps: Dependencies,
    *,
    login: Callable[..., Any] | None = None,
) -> kopf.OperatorRegistry:
    """All handlers, bound to `deps`, on a fresh registry.

    `login` replaces kopf's credential discovery (tests point it at the API emulator); by
    default the operator logs in with its service account or a kubeconfig.
    """
    registry = kopf.OperatorRegistry()
    config = deps.config

    if login is not None:
        kopf.on.login(registry=registry)(login)
    else:
        kopf.on.login(registry=registry, id="service-account")(kopf.login_with_service_account)
        kopf.on.login(registry=registry, id="kubeconfig")(kopf.login_with_kubeconfig)

    # LoRAAdapter ------------------------------------------------------------------------------

    def record_phase(namespace: str | None, name: str, status: Any, patch: kopf.Patch) -> None:
        # The phase this handler wrote (or the one it found): feeds lorafleet_operator_adapters.
        phase = patch.status.get("phase") or (status or {}).get("phase")
        deps.phases.observe(namespace, name, phase, deleted=False)

    async def adapter_changed(name: str, namespace: str | None, spec: Any, status: Any, meta: Any,
                              patch: kopf.Patch, retry: int, logger: Any, **_: Any) -> None:
        try:
            await reconcile_adapter(deps, name=name, namespace=namespace, spec=spec,
                                    status=status, meta=meta, patch=patch, retry=retry,
                                    logger=logger)
        finally:
            record_phase(namespace, name, status, patch)

    for decorator in (kopf.on.create, kopf.on.update, kopf.on.resume):
        decorator(GROUP, VERSION, ADAPTERS, registry=registry, id="reconcile",
                  field="spec" if decorator is kopf.on.update else None)(adapter_changed)

    @kopf.on.delete(GROUP, VERSION, ADAPTERS, registry=registry, id="cleanup")
    async def adapter_deleted(name: str, namespace: str | None, spec: Any, patch: kopf.Patch,
                              **_: Any) -> None:
        await cleanup_adapter(deps, name=name, namespace=namespace, spec=spec, patch=patch)
        deps.phases.observe(namespace, name, None, deleted=True)

    @kopf.timer(GROUP, VERSION, ADAPTERS, registry=registry, id="placement",
                interval=config.resync_seconds, initial_delay=config.resync_seconds)
    async def adapter_resync(name: str, spec: Any, status: Any, meta: Any, patch: kopf.Patch,
                             logger: Any, **kwargs: Any) -> None:
        # A new or restarted serving replica starts empty: load it where placement says.
        if (status or {}).get("phase") not in (Phase.READY.value, Phase.LOADING.value):
            return
        try:
            await reconcile_adapter(deps, name=name, namespace=kwargs.get("namespace"),
                                    spec=spec, status=status, meta=meta, patch=patch,
                                    retry=int(kwargs.get("retry") or 0), logger=logger)
        finally:
            record_phase(kwargs.get("namespace"), name, status, patch)

    # Tenant ----------------------------------------------------------------------------------

    @kopf.index("", "v1", "secrets", registry=registry, id="lorafleet_secret_keys")
    def secret_keys(namespace: str | None, name: str, body: Any, **_: Any) -> Any:
        entries = _secret_key_entries(body)
        return {(namespace, name): entries} if entries else None

    def tenant_refusal(name: str, namespace: str | None) -> str | None:
        return decide_tenant_binding(name, namespace, config.tenant_namespaces)

    @kopf.index(GROUP, VERSION, TENANTS, registry=registry, id="lorafleet_tenant_secrets")
    def tenant_secrets(namespace: str | None, name: str, spec: Any, **_: Any) -> Any:
        if tenant_refusal(name, namespace) is not None:
            return None  # its Secrets' events must not sync a tenant it may not act for
        return {(namespace, ref["name"]): (name, dict(spec))
                for ref in (spec.get("apiKeySecrets") or ())}

    async def tenant_changed(name: str, namespace: str | None, spec: Any, status: Any,
                             meta: Any, patch: kopf.Patch, **kwargs: Any) -> None:
        generation = int(meta.get("generation") or 1)
        refusal = tenant_refusal(name, namespace)
        if refusal is not None:
            patch.status["phase"] = TenantPhase.FAILED.value
            patch.status["keyCount"] = 0
            patch.status["message"] = refusal
            patch.status["observedGeneration"] = generation
            patch.status["conditions"] = set_condition(
                (status or {}).get("conditions") or (), type_="Ready", status=False,
                reason="TenantNotBound", message=refusal, generation=generation,
                now=deps.clock())
            raise kopf.PermanentError(refusal)
        try:  # kopf passes each index as a keyword named after its id
            count, problems = await sync_tenant(deps, name=name, namespace=namespace, spec=spec,
                                                secret_keys=kwargs["lorafleet_secret_keys"])
        except ServingError as exc:
            raise kopf.TemporaryError(exc.message, delay=5.0) from exc
        phase = TenantPhase.DEGRADED if problems else TenantPhase.READY
        message = "; ".join(problems) or f"{count} API key(s) registered"
        patch.status["phase"] = phase.value
        patch.status["keyCount"] = count
        patch.status["message"] = message
        patch.status["observedGeneration"] = generation
        patch.status["conditions"] = set_condition(
            (status or {}).get("conditions") or (), type_="Ready", status=not problems,
            reason="KeysMissing" if problems else "Synced", message=message,
            generation=generation, now=deps.clock())

    for decorator in (kopf.on.create, kopf.on.update, kopf.on.resume):
        decorator(GROUP, VERSION, TENANTS, registry=registry, id="sync",
                  field="spec" if decorator is kopf.on.update else None)(tenant_changed)

    @kopf.timer(GROUP, VERSION, TENANTS, registry=registry, id="keys",
                interval=config.tenant_resync_seconds, initial_delay=config.tenant_resync_seconds)
    async def tenant_resync(**kwargs: Any) -> None:
        if tenant_refusal(kwargs["name"], kwargs.get("namespace")) is None:
            await tenant_changed(**kwargs)  # a refused one stays Failed until its spec changes

    @kopf.on.delete(GROUP, VERSION, TENANTS, registry=registry, id="cleanup")
    async def tenant_deleted(name: str, namespace: str | None, **_: Any) -> None:
        if tenant_refusal(name, namespace) is not None:
            return  # it never acted for that tenant; its deletion must not either
        # Revoke every key first: a deleted Tenant must not keep working for a moment longer.
        for key_id in await deps.tenants.list_keys(name):
            await deps.tenants.revoke_key(name, key_id)
        await deps.tenants.delete_tenant(name)

    @kopf.on.event("", "v1", "secrets", registry=registry, id="secret-keys")
    async def secret_event(namespace: str | None, name: str, logger: Any,
                           **kwargs: Any) -> None:
        # A Secret added, rotated or deleted: re-sync the tenants that reference it right away
        # (deleting the Secret revokes its key). The tenants' timers are the safety net.
        tenants_by_secret = kwargs["lorafleet_tenant_secrets"]
        for tenant_name, tenant_spec in tenants_by_secret.get((namespace, name), ()):
            try:
                await sync_tenant(deps, name=tenant_name, namespace=namespace, spec=tenant_spec,
                                  secret_keys=kwargs["lorafleet_secret_keys"])
            except ServingError as exc:
                logger.warning("tenant %s: key sync failed: %s", tenant_name, exc.message)

    return registry
