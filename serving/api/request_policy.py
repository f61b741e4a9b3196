"""What a tenant may ask of the engine beyond a plain generation, decided at the edge.

Boundary: pure rules over the parsed body and the tenant's name; no I/O. The routes apply
them after authentication and before anything is tokenized or queued.

- ``ignore_eos`` makes a sequence run to its output limit whatever the model says: a
  benchmarking tool that also lets one tenant hold engine time it would not otherwise get.
  It is allowed only to the tenants the operator names (``ignore_eos_tenants``; nobody
  unless configured, so a deployment that forgets the setting is the safe one).
- The prefix cache is salted per tenant (``tenant_cache_salt``): vLLM reuses KV blocks only
  between requests with the same salt, so a tenant's time to first token never reveals
  whether another tenant sent the same prefix. The salt comes from the tenant's identity,
  never from the request, so no client can choose another tenant's salt.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import PermissionDenied

__all__ = ["RequestPolicy", "check_ignore_eos", "tenant_cache_salt"]

_SALT_DOMAIN = b"lorafleet/prefix-cache-salt/v1\0"


class RequestPolicy(BaseModel):
    """Per-deployment limits on what requests may ask for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ignore_eos_tenants: frozenset[str] | Literal["*"] = Field(
        default=frozenset(),
        description="Tenants allowed to send ignore_eos, or '*' for every tenant (a benchmark "
        "server whose only tenants are load generators). Default: nobody, since ignore_eos "
        "lets a tenant hold engine time to its output limit.",
    )
    tool_call_parser: str | None = Field(
        default=None,
        description="vLLM tool parser (its ToolParserManager name, e.g. 'hermes') that reads "
        "tool calls in the base model's own format for tool_choice 'auto'; None refuses 'auto' "
        "as vllm serve does without --tool-call-parser. Named and required tool choices need "
        "no parser: they are decoded under the tools' JSON schema.",
    )


def check_ignore_eos(policy: RequestPolicy, tenant: str, ignore_eos: bool) -> None:
    """Refuse ``ignore_eos`` for a tenant the policy does not name (403, ``param`` set)."""
    if not ignore_eos or policy.ignore_eos_tenants == "*":
        return
    if tenant not in policy.ignore_eos_tenants:
        raise PermissionDenied(
            "ignore_eos is not enabled for this tenant; ask the operator to enable it.",
            param="ignore_eos",
        )


def tenant_cache_salt(tenant: str) -> str:
    """The prefix-cache salt of ``tenant``: the same on every replica (a tenant's own
    prefixes hit on any of them), different for every tenant."""
    return hashlib.sha256(_SALT_DOMAIN + tenant.encode()).hexdigest()[:32]
