"""The embedded demo: tenants ``alice`` and ``bob``, their adapters, their API keys.

Boundary: writes the registry directly (before the server starts) through the same intake
as the admin API (``lorafleet.adapters.ingest``). Idempotent: a second run keeps the
tenants, adapters and keys of the first. The demo keys' plaintext is kept in
``<data_dir>/demo-keys.json`` (mode 0600) so ``lorafleet keys`` can show them again; real
tenants' keys are never stored in plaintext.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lorafleet.adapters.cache import AdapterCache
from lorafleet.adapters.ingest import import_adapter
from lorafleet.adapters.keyfiles import write_private_file
from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import ApiKey, Quota, Tenant
from lorafleet.adapters.registry import Registry
from lorafleet.adapters.validation import ValidationLimits

from .api.services import AdapterIntake

# tenant -> (display name, adapters it owns)
DEMO_TENANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "alice": ("Alice's team", ("french", "pirate")),
    "bob": ("Bob's team", ("json",)),
}
DEMO_QUOTA = Quota(max_concurrent=32, requests_per_minute=600, tokens_per_minute=200_000)


def demo_adapter_dir(name: str) -> Path:
    import lorafleet.adapters

    return Path(lorafleet.adapters.__file__).parent / "demo" / name


def keys_file(data_dir: Path) -> Path:
    return data_dir / "demo-keys.json"


def read_demo_keys(data_dir: Path) -> dict[str, str]:
    path = keys_file(data_dir)
    return json.loads(path.read_text()) if path.exists() else {}


async def seed_demo(registry: Registry, intake: AdapterIntake, data_dir: Path) -> dict[str, str]:
    """Create the demo tenants, adapters and keys that are missing; return tenant -> key."""
    keys = read_demo_keys(data_dir)
    cache = AdapterCache(intake.cache_dir, intake.cache_bytes)
    limits = ValidationLimits(max_rank=intake.max_rank, max_bytes=intake.max_bytes)
    for tenant, (display, adapters) in DEMO_TENANTS.items():
        if await registry.get_tenant(tenant) is None:
            await registry.put_tenant(Tenant(tenant, display, DEMO_QUOTA, time.time()))
        live = {k.key_id for k in await registry.list_keys(tenant) if not k.revoked}
        key = keys.get(tenant)
        if key is None or key.split("_")[1] not in live:
            key, key_id = generate_key()
            await registry.add_key(ApiKey(key_id, tenant, hash_key(key), time.time()))
            keys[tenant] = key
        for name in adapters:
            if await registry.get_adapter(tenant, name) is None:
                await import_adapter(
                    tenant=tenant, name=name, source=str(demo_adapter_dir(name)), shared=False,
                    registry=registry, cache=cache, base=intake.base, limits=limits,
                    work_dir=intake.work_dir, store=intake.store,
                )
    write_private_file(keys_file(data_dir), json.dumps(keys, indent=2) + "\n", replace=True)
    return keys
