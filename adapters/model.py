"""What a tenant, an API key and a registered adapter are: frozen records and their JSON forms.

Boundary: plain data only. No I/O here; the registry stores these, the API renders them. Names are
checked when a record is built, so an invalid name never reaches storage or a file path.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InvalidName

__all__ = [
    "NAME_PATTERN",
    "AdapterContent",
    "AdapterRecord",
    "ApiKey",
    "Quota",
    "Tenant",
    "adapter_id_of",
    "validate_name",
]

# Names end up in file paths, Redis keys, metric labels and adapter ids (`tenant/name@digest`):
# lowercase, no '/', no '@', cannot start with '.' or '-'.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_KEY_ID_PATTERN = re.compile(r"^[0-9a-f]{8}$")


def validate_name(name: str, kind: str = "name") -> str:
    """Return `name` if it matches `NAME_PATTERN`, else raise `InvalidName`."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise InvalidName(
            f"invalid {kind} {name!r}: use 1-63 characters from a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def adapter_id_of(tenant: str, name: str, digest: str) -> str:
    """The stable id vLLM and the router see: `tenant/name@<first 12 hex of the digest>`."""
    return f"{tenant}/{name}@{digest[:12]}"


@dataclass(frozen=True, slots=True)
class Quota:
    """Per-tenant limits; `None` means unlimited."""

    max_concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"quota {key} must be a non-negative integer or None: {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Quota:
        """Every limit `data` names; a missing one is unlimited, an unknown key is ignored."""
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    display_name: str
    quota: Quota = field(default_factory=Quota)
    created_at: float = 0.0

    def __post_init__(self) -> None:
        validate_name(self.name, "tenant name")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "quota": self.quota.to_dict(),
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tenant:
        return cls(
            name=data["name"],
            display_name=data.get("display_name") or data["name"],
            quota=Quota.from_dict(data.get("quota") or {}),
            created_at=float(data.get("created_at", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored API key: only its sha256 (`key_hash`) is kept, never the plaintext."""

    key_id: str
    tenant: str
    key_hash: str
    created_at: float
    revoked: bool = False
    # Who manages the key: None for the admin API and CLI, "operator" for keys the Kubernetes
    # operator registers from a Tenant's Secrets. The operator revokes only its own.
    owner: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.tenant, "tenant name")
        if _KEY_ID_PATTERN.fullmatch(self.key_id) is None:
            raise InvalidName(f"invalid key id {self.key_id!r}: expected 8 hex digits")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApiKey:
        return cls(
            key_id=data["key_id"],
            tenant=data["tenant"],
            key_hash=data["key_hash"],
            created_at=float(data["created_at"]),
            revoked=bool(data.get("revoked", False)),
            owner=data.get("owner"),
        )


@dataclass(frozen=True, slots=True)
class AdapterContent:
    """Where an adapter's bytes can be had on any node: what a replica needs to fetch them.

    `digest` names the content (and is checked after every fetch); `stored_at` is the copy in the
    shared store when one is configured; `source` (with the credentials `secret_ref` names) is
    where it was imported from. Never a node-local path: a path means nothing on another node.
    """

    digest: str
    source: str
    secret_ref: str | None = None
    stored_at: str | None = None
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """A validated adapter as registered: where it came from, what it is, where a copy is kept.

    Content addressed: `digest` + `source` (+ `secret_ref`) + `stored_at` let any node fetch it
    (see `content`). Records written before that carried `local_path`; it is ignored on read.
    """

    tenant: str
    name: str
    source: str
    base_model: str
    digest: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    shared: bool = False
    created_at: float = 0.0
    secret_ref: str | None = None
    stored_at: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.tenant, "tenant name")
        validate_name(self.name, "adapter name")
        # Accept lists from JSON but store a tuple, so the record stays hashable and immutable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def adapter_id(self) -> str:
        return adapter_id_of(self.tenant, self.name, self.digest)

    @property
    def content(self) -> AdapterContent:
        """What a replica on any node needs to bring this adapter's files to itself."""
        return AdapterContent(self.digest, self.source, self.secret_ref, self.stored_at,
                              self.size_bytes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterRecord:
        # `local_path` (records of earlier versions) is deliberately not read: it named a
        # directory on the importing node only.
        return cls(
            tenant=data["tenant"],
            name=data["name"],
            source=data["source"],
            base_model=data["base_model"],
            digest=data["digest"],
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            target_modules=tuple(data["target_modules"]),
            size_bytes=int(data["size_bytes"]),
            shared=bool(data.get("shared", False)),
            created_at=float(data.get("created_at", 0.0)),
            secret_ref=data.get("secret_ref") or None,
            stored_at=data.get("stored_at") or None,
        )
