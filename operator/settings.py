"""Operator configuration: read once from the environment (`LORAFLEET_OPERATOR_*`) or flags.

Boundary: data only; nothing here opens a connection.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["OperatorConfig"]


class OperatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_OPERATOR_", extra="forbid")

    serving_url: str = Field(default="http://127.0.0.1:8000",
                             description="Base URL of the serving ingress (admin API).")
    admin_key: SecretStr = Field(default=SecretStr(""),
                                 description="Admin credential for the serving admin API.")
    registry_url: str | None = Field(
        default=None, description="Registry URL (redis://host:port/db or sqlite:///path) for tenant keys.")
    namespaces: tuple[str, ...] = Field(
        default=(), description="Namespaces to watch; empty means the whole cluster.")
    tenant_namespaces: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="Which tenants the LoRAAdapter and Tenant objects of a "
        "namespace may act for, by namespace ('*': any tenant), e.g. "
        "'{\"team-a\": [\"acme\", \"acme-dev\"]}'. A namespace not listed acts only for the "
        "tenant named like itself.")
    resync_seconds: float = Field(
        default=15.0, gt=0, description="How often each adapter re-checks its placement on serving.")
    tenant_resync_seconds: float = Field(
        default=60.0, gt=0, description="How often each tenant re-checks its key Secrets.")
    request_timeout_seconds: float = Field(
        default=120.0, gt=0, description="Timeout of one admin API call (registration fetches).")
    metrics_port: int | None = Field(
        default=None, description="Serve Prometheus /metrics on this port (None: off).")
    health_port: int | None = Field(
        default=None, description="Serve kopf's liveness probe /healthz on this port (None: off).")
    max_backoff_seconds: float = Field(
        default=60.0, gt=0, description="Longest wait between retries after transient failures.")
