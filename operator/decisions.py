"""Pure reconcile decisions for `LoRAAdapter` and `Tenant` resources.

Boundary: no I/O, no clock reads, no kopf. Inputs are frozen dataclasses built from the custom
resource (`AdapterSpec`, `AdapterStatus`) and from what serving reports (`Observed`); outputs are
frozen `Decision`s with a reason, and status patches. Handlers execute the decisions.

The one invariant everything here protects: **a LoRAAdapter is Ready only when serving confirms
that the adapter, from the source the spec names, is registered and held by as many replicas as
the placement wants** (at least one). A Ready adapter that no replica holds would send its
users' requests to failures while the cluster says all is well.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "Action",
    "AdapterSpec",
    "AdapterStatus",
    "Decision",
    "KeyPlan",
    "Observed",
    "Phase",
    "PlacementMode",
    "ServingAdapter",
    "TenantPhase",
    "adapter_status_patch",
    "decide_adapter_action",
    "decide_tenant_binding",
    "decide_cleanup",
    "decide_key_changes",
    "parse_adapter_spec",
    "retry_delay",
    "set_condition",
    "source_key",
    "source_ref",
    "wanted_replicas",
]

# Same rule as `lorafleet.adapters.model.NAME_PATTERN` (names end up in paths and adapter ids).
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class Phase(StrEnum):
    PENDING = "Pending"
    FETCHING = "Fetching"
    VALIDATING = "Validating"
    LOADING = "Loading"
    READY = "Ready"
    FAILED = "Failed"
    DELETING = "Deleting"


class TenantPhase(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class PlacementMode(StrEnum):
    ALL = "all"
    REPLICAS = "replicas"
    DEMAND = "demand"


class Action(StrEnum):
    REGISTER = "register"  # POST the adapter: serving fetches, validates, registers and loads it
    LOAD = "load"  # registered, but on too few replicas: ask serving to load it on more
    WAIT = "wait"  # nothing to do now, look again later (no serving replica, load in flight)
    READY = "ready"  # serving confirms the placement: nothing to do
    FAIL = "fail"  # permanent failure for this generation: nothing to do until the spec changes
    REJECT = "reject"  # registered, but not what the spec says (base model): unregister, fail
    UNREGISTER = "unregister"  # delete: unload everywhere and unregister
    DONE = "done"  # delete: serving forgot it, the finalizer may go


@dataclass(frozen=True)
class AdapterSpec:
    """What a LoRAAdapter asks for, parsed and checked."""

    tenant: str
    name: str
    base_model: str
    uri: str
    revision: str | None = None
    secret_ref: str | None = None
    mode: PlacementMode = PlacementMode.ALL
    replicas: int | None = None
    pinned: bool = False
    generation: int = 1


@dataclass(frozen=True)
class AdapterStatus:
    """What the operator last wrote into the resource's status."""

    phase: Phase | None = None
    observed_generation: int | None = None
    failed_generation: int | None = None
    adapter_id: str | None = None
    registered_source: str | None = None  # the `source_key` this operator registered last
    conditions: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, status: Mapping[str, Any] | None) -> AdapterStatus:
        status = status or {}
        phase = status.get("phase")
        return cls(
            phase=Phase(phase) if isinstance(phase, str) and phase in Phase._value2member_map_
            else None,
            observed_generation=status.get("observedGeneration"),
            failed_generation=status.get("failedGeneration"),
            adapter_id=status.get("adapterId"),
            registered_source=status.get("source"),
            conditions=tuple(status.get("conditions") or ()),
        )


@dataclass(frozen=True)
class ServingAdapter:
    """An adapter as serving reports it (`GET /admin/v1/tenants/{t}/adapters/{name}`)."""

    adapter_id: str
    source: str
    base_model: str
    digest: str
    size_bytes: int = 0
    replicas: tuple[str, ...] = ()

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> ServingAdapter:
        digest = str(data.get("digest", ""))
        adapter_id = data.get("adapter_id") or data.get("id")
        if not adapter_id:
            adapter_id = f"{data.get('tenant')}/{data.get('name')}@{digest[:12]}"
        return cls(
            adapter_id=str(adapter_id),
            source=str(data.get("source", "")),
            base_model=str(data.get("base_model", "")),
            digest=digest,
            size_bytes=int(data.get("size_bytes") or 0),
            replicas=tuple(sorted(str(r) for r in data.get("replicas") or ())),
        )


@dataclass(frozen=True)
class Observed:
    """What serving says now: the adapter (None when unknown) and how many replicas run."""

    adapter: ServingAdapter | None
    replica_count: int


@dataclass(frozen=True)
class Decision:
    action: Action
    phase: Phase
    reason: str
    message: str
    wanted: int = 0
    delay: float | None = None  # for WAIT: when to look again, seconds


@dataclass(frozen=True)
class KeyPlan:
    """Which API keys to add and which to revoke so the registry matches the Secrets."""

    add: Mapping[str, str] = field(default_factory=dict)  # key_id -> key_hash
    revoke: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.add and not self.revoke


def parse_adapter_spec(name: str, spec: Mapping[str, Any], generation: int = 1) -> AdapterSpec:
    """Build an `AdapterSpec` from a LoRAAdapter's `metadata.name` and `spec`.

    Raises `ValueError` with a user-facing message when the spec cannot be acted on (the CRD
    schema rejects most of these on a real API server; the emulator in tests does not).
    """
    source = spec.get("source") or {}
    placement = spec.get("placement") or {}
    adapter_name = spec.get("adapterName") or name
    tenant = spec.get("tenant") or ""
    for kind, value in (("tenant", tenant), ("adapter name", adapter_name)):
        if not _NAME_PATTERN.fullmatch(value):
            raise ValueError(
                f"invalid {kind} {value!r}: use 1-63 characters from a-z 0-9 . _ -, "
                "starting with a letter or digit (set spec.adapterName for long resource names)"
            )
    if not spec.get("baseModel"):
        raise ValueError("spec.baseModel is required")
    if not source.get("uri"):
        raise ValueError("spec.source.uri is required")
    mode = PlacementMode(placement.get("mode", "all"))
    replicas = placement.get("replicas")
    if mode is PlacementMode.REPLICAS and (not isinstance(replicas, int) or replicas < 1):
        raise ValueError("spec.placement.replicas must be a positive integer when mode is replicas")
    return AdapterSpec(
        tenant=tenant,
        name=adapter_name,
        base_model=spec["baseModel"],
        uri=source["uri"],
        revision=source.get("revision"),
        secret_ref=(source.get("secretRef") or {}).get("name"),
        mode=mode,
        replicas=replicas,
        pinned=bool(spec.get("pinned", False)),
        generation=generation,
    )


def source_ref(spec: AdapterSpec) -> str:
    """The `source` string sent to serving: `hf://org/name@revision` carries its revision."""
    if spec.revision and spec.uri.startswith("hf://") and "@" not in spec.uri:
        return f"{spec.uri}@{spec.revision}"
    return spec.uri


def source_key(spec: AdapterSpec) -> str:
    """What identifies the wanted version: the source ref, plus a revision serving cannot see.

    For other schemes `revision` is the user's way to say "fetch it again" (a new object in the
    same place): a changed key re-registers the adapter.
    """
    ref = source_ref(spec)
    if spec.revision and not ref.endswith(f"@{spec.revision}"):
        return f"{ref}#{spec.revision}"
    return ref


def wanted_replicas(spec: AdapterSpec, replica_count: int) -> int:
    """How many serving replicas must hold the adapter for it to be Ready.

    `demand` still loads it on one replica: that is how serving proves the adapter loads at all.
    """
    if replica_count <= 0:
        return 0
    if spec.mode is PlacementMode.ALL:
        return replica_count
    if spec.mode is PlacementMode.REPLICAS:
        return min(spec.replicas or 1, replica_count)
    return 1


def retry_delay(attempt: int, *, base: float = 0.5, cap: float = 60.0) -> float:
    """Exponential backoff for transient failures: 0.5 s, 1 s, 2 s ... capped at `cap`."""
    return min(cap, base * (2 ** max(0, min(attempt, 30))))


def decide_adapter_action(
    spec: AdapterSpec, status: AdapterStatus, observed: Observed
) -> Decision:
    """The next step that brings serving in line with `spec`.

    Idempotent: for the same inputs it returns the same decision, and once serving matches the
    spec the decision is READY (no action).
    """
    if status.failed_generation is not None and status.failed_generation == spec.generation:
        # An invalid adapter is not retried until someone changes the spec (aibrix #1860).
        return Decision(Action.FAIL, Phase.FAILED, "PermanentFailure",
                        "failed permanently for this generation; change the spec to retry")
    adapter = observed.adapter
    wanted = wanted_replicas(spec, observed.replica_count)
    if (spec.mode is PlacementMode.DEMAND and status.phase is Phase.READY
            and status.observed_generation == spec.generation):
        # Proven loadable once; from then on serving loads and evicts it as requests come.
        wanted = 0
    if adapter is None:
        return Decision(Action.REGISTER, Phase.FETCHING, "NotRegistered",
                        "fetching, validating and registering the adapter", wanted=wanted)
    if adapter.base_model != spec.base_model:
        return Decision(Action.REJECT, Phase.FAILED, "BaseModelMismatch",
                        f"the adapter was trained for base model {adapter.base_model!r}, "
                        f"but spec.baseModel is {spec.base_model!r}")
    if status.registered_source is not None:
        changed = status.registered_source != source_key(spec)
    else:  # e.g. the status was lost: trust what serving says it registered
        changed = adapter.source != source_ref(spec)
    if changed:
        # Registering the new version first keeps the old one served until the new one is loaded.
        return Decision(Action.REGISTER, Phase.FETCHING, "SourceChanged",
                        f"rolling from {adapter.source} to {source_key(spec)}", wanted=wanted)
    if observed.replica_count <= 0:
        return Decision(Action.WAIT, Phase.LOADING, "NoServingReplicas",
                        "registered; no serving replica is running", wanted=0, delay=5.0)
    held = len(adapter.replicas)
    if held >= wanted and (held > 0 or spec.mode is PlacementMode.DEMAND):
        return Decision(Action.READY, Phase.READY, "Loaded",
                        f"loaded on {held} of {observed.replica_count} serving replicas",
                        wanted=wanted)
    return Decision(Action.LOAD, Phase.LOADING, "LoadingOnReplicas",
                    f"loaded on {held} of {wanted} wanted replicas", wanted=wanted)


def decide_cleanup(observed: Observed) -> Decision:
    """On delete: unregister while serving still knows the adapter, then let the finalizer go."""
    if observed.adapter is not None:
        return Decision(Action.UNREGISTER, Phase.DELETING, "Deleting",
                        "unloading everywhere and unregistering")
    return Decision(Action.DONE, Phase.DELETING, "Unregistered", "serving forgot the adapter")


def decide_tenant_binding(tenant: str, namespace: str | None,
                          bindings: Mapping[str, Sequence[str]]) -> str | None:
    """Why the objects of `namespace` may not act for `tenant`; None when they may.

    Rule: a namespace listed in `bindings` acts for the tenants listed there (`*`: any), any
    other namespace only for the tenant named like itself. Why: tenant names are cluster-wide
    (one registry) while Kubernetes grants rights per namespace; without a binding, whoever may
    create a LoRAAdapter or a Tenant in any namespace could replace another tenant's adapters
    or add keys to it.
    """
    if not namespace:
        return "a LoRAFleet object outside any namespace acts for no tenant"
    allowed = bindings.get(namespace)
    if allowed is None:
        if tenant == namespace:
            return None
        return (f"objects in namespace {namespace!r} act only for tenant {namespace!r}, not "
                f"{tenant!r} (the operator's tenant_namespaces setting can bind others)")
    if "*" in allowed or tenant in allowed:
        return None
    return (f"objects in namespace {namespace!r} act only for tenants "
            f"{', '.join(sorted(allowed)) or '(none)'}, not {tenant!r}")


def decide_key_changes(desired: Mapping[str, str], registered: Mapping[str, str]) -> KeyPlan:
    """Keys to add (missing or rehashed) and to revoke (no longer in any referenced Secret)."""
    add = {kid: h for kid, h in desired.items() if registered.get(kid) != h}
    # A rehashed key id is revoked first, then added again with its new hash.
    revoke = tuple(sorted(kid for kid in registered if kid not in desired or kid in add))
    return KeyPlan(add=add, revoke=revoke)


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    *,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """Conditions with `type_` set; `lastTransitionTime` moves only when the status flips."""
    value = "True" if status else "False"
    result: list[dict[str, Any]] = []
    found = False
    for condition in conditions:
        if condition.get("type") != type_:
            result.append(dict(condition))
            continue
        found = True
        changed = condition.get("status") != value
        result.append({
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": (_iso(now) if changed
                                   else condition.get("lastTransitionTime", _iso(now))),
        })
    if not found:
        result.append({"type": type_, "status": value, "reason": reason, "message": message,
                       "observedGeneration": generation, "lastTransitionTime": _iso(now)})
    return result


def adapter_status_patch(
    spec: AdapterSpec,
    status: AdapterStatus,
    decision: Decision,
    observed: Observed | None,
    now: datetime,
) -> dict[str, Any]:
    """The `status` a LoRAAdapter gets after `decision` (never a key or a credential)."""
    ready = decision.phase is Phase.READY
    patch: dict[str, Any] = {
        "phase": decision.phase.value,
        "message": decision.message,
        "observedGeneration": spec.generation,
        "wantedReplicas": decision.wanted,
        "conditions": set_condition(
            status.conditions, type_="Ready", status=ready, reason=decision.reason,
            message=decision.message, generation=spec.generation, now=now),
    }
    if status.registered_source is not None:
        patch["source"] = status.registered_source
    if decision.phase is Phase.FAILED:
        patch["failedGeneration"] = spec.generation
        patch["readyReplicas"] = 0
        patch["replicas"] = []
    adapter = observed.adapter if observed is not None else None
    if adapter is not None and decision.phase is not Phase.FAILED:
        patch.update({
            "adapterId": adapter.adapter_id,
            "digest": adapter.digest,
            "sizeBytes": adapter.size_bytes,
            "replicas": list(adapter.replicas),
            "readyReplicas": len(adapter.replicas),
        })
    elif decision.phase is not Phase.FAILED:
        patch.update({"replicas": [], "readyReplicas": 0})
    return patch


def _iso(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")
