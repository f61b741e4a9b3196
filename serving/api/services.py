"""The objects the HTTP layer works with, gathered in one place and injected into the app.

Boundary: a plain container, built by ``lorafleet.serving.deploy`` (Ray) or by tests.
Nothing here starts threads, engines or servers.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.adapters.basemodel import BaseModelInfo
from lorafleet.adapters.keys import hash_key
from lorafleet.adapters.registry import Registry
from lorafleet.adapters.secrets import SecretResolver
from lorafleet.adapters.store import SharedStore

from ..engine.client import EngineClient
from ..metrics import ServingMetrics
from .errors import AuthenticationFailed
from .prompts import PromptRenderer
from .quotas import QuotaBook, Quotas
from .request_policy import RequestPolicy
from .tenancy import Tenancy, TenancySettings, bearer_token


@dataclass(frozen=True)
class AdapterIntake:
    """What the admin API needs to fetch, validate and cache adapters."""

    base: BaseModelInfo
    cache_dir: Path
    work_dir: Path
    max_rank: int
    max_bytes: int
    cache_bytes: int
    store: SharedStore | None = None  # imports copy adapters here, for every node to fetch
    secrets: SecretResolver | None = None  # secretRef name -> source credentials


@dataclass
class ApiServices:
    served_model_name: str
    registry: Registry
    engines: EngineClient
    renderer: PromptRenderer
    admin_key_hash: str
    intake: AdapterIntake | None = None
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    # In-process by default (SQLite, one process); make_services gives a Redis registry the
    # cluster-wide RedisQuotaBook.
    quotas: Quotas = field(default_factory=QuotaBook)
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    max_body_bytes: int = 1_000_000
    # what requests may ask for (ignore_eos tenants, tool parser): ServeSettings.request_policy()
    request_policy: RequestPolicy = field(default_factory=RequestPolicy)
    # /metrics carries tenant and adapter names: it needs the admin key or this metrics key
    # (sha256), unless public_metrics is set (a single-user development box).
    metrics_key_hash: str | None = None
    public_metrics: bool = False
    # The HTTP proxy stamps each request's arrival (``arrival.py``); only then is it read.
    trust_arrival_stamp: bool = False
    # /docs, /redoc and /openapi.json: off unless asked for (they map every route).
    api_docs: bool = False
    # The admin API has a listener of its own (``ServeSettings.admin_port``): the public app
    # leaves its routes out.
    admin_listener: bool = False
    # Key and name caches, the stale window and the registry deadline and breaker.
    tenancy_settings: TenancySettings = field(default_factory=TenancySettings)
    tenancy: Tenancy = field(init=False)

    def __post_init__(self) -> None:
        self.tenancy = Tenancy(self.registry, self.served_model_name, clock=self.clock,
                               metrics=self.metrics, settings=self.tenancy_settings)

    def check_admin(self, authorization: str | None) -> None:
        token = bearer_token(authorization)
        if not hmac.compare_digest(hash_key(token), self.admin_key_hash):
            # Same answer for a tenant key and a wrong key: admin routes reveal nothing.
            raise AuthenticationFailed("Incorrect admin credential provided.")

    def check_metrics(self, authorization: str | None) -> None:
        if self.public_metrics:
            return
        token = bearer_token(authorization)
        digest = hash_key(token)
        ok = hmac.compare_digest(digest, self.admin_key_hash)
        if self.metrics_key_hash is not None:
            ok = hmac.compare_digest(digest, self.metrics_key_hash) or ok
        if not ok:
            raise AuthenticationFailed("Incorrect metrics credential provided.")
