"""`lorafleet.adapters`: what an adapter is, where it comes from, how it is checked, cached and
registered. Serving and the operator both build on it; it imports nothing from them.

Modules: `model` (records), `keys` (API keys), `errors`, `basemodel` (served model shapes),
`validation`, `digest`, `sources` (fetching), `cache` (on-disk LRU), `ingest` (the import
pipeline), `registry` (SQLite and Redis backends), `store` (the shared, content-addressed adapter
store), `secrets` (secretRef -> credentials), `materialize` (a node fetches what it lacks, by
digest).

Exports load on first use (PEP 562): the intake worker process (`sandbox`) imports only
`sources` and `validation`, and must not pay for the registry backends (Redis client, SQLite)
at every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .basemodel import BaseModelInfo, base_model_info_from_config, load_base_model_info
    from .cache import AdapterCache
    from .digest import digest_files, digest_of
    from .errors import (
        AdapterError,
        AdapterFetchError,
        AdapterValidationError,
        AlreadyExists,
        CacheError,
        CacheFull,
        InvalidName,
        NotFound,
        RegistryError,
        RegistryUnavailable,
    )
    from .ingest import import_adapter
    from .keys import generate_key, hash_key, key_id_of, keys_match
    from .materialize import Materializer
    from .model import AdapterContent, AdapterRecord, ApiKey, Quota, Tenant, adapter_id_of, validate_name
    from .registry import RedisRegistry, Registry, SQLiteRegistry, open_registry
    from .secrets import SecretResolver
    from .sources import FetchCredentials, fetch_adapter
    from .store import FileStore, S3Store, SharedStore, open_store
    from .validation import AdapterManifest, ValidationLimits, validate_adapter_dir

_EXPORTS = {
    "AdapterCache": ".cache",
    "AdapterContent": ".model",
    "AdapterError": ".errors",
    "AdapterFetchError": ".errors",
    "AdapterManifest": ".validation",
    "AdapterRecord": ".model",
    "AdapterValidationError": ".errors",
    "AlreadyExists": ".errors",
    "ApiKey": ".model",
    "BaseModelInfo": ".basemodel",
    "CacheError": ".errors",
    "CacheFull": ".errors",
    "FetchCredentials": ".sources",
    "FileStore": ".store",
    "InvalidName": ".errors",
    "Materializer": ".materialize",
    "NotFound": ".errors",
    "Quota": ".model",
    "RedisRegistry": ".registry",
    "Registry": ".registry",
    "RegistryError": ".errors",
    "RegistryUnavailable": ".errors",
    "S3Store": ".store",
    "SQLiteRegistry": ".registry",
    "SecretResolver": ".secrets",
    "SharedStore": ".store",
    "Tenant": ".model",
    "ValidationLimits": ".validation",
    "adapter_id_of": ".model",
    "base_model_info_from_config": ".basemodel",
    "digest_files": ".digest",
    "digest_of": ".digest",
    "fetch_adapter": ".sources",
    "generate_key": ".keys",
    "hash_key": ".keys",
    "import_adapter": ".ingest",
    "key_id_of": ".keys",
    "keys_match": ".keys",
    "load_base_model_info": ".basemodel",
    "open_registry": ".registry",
    "open_store": ".store",
    "validate_adapter_dir": ".validation",
    "validate_name": ".model",
}

__all__ = [
    "AdapterCache",
    "AdapterContent",
    "AdapterError",
    "AdapterFetchError",
    "AdapterManifest",
    "AdapterRecord",
    "AdapterValidationError",
    "AlreadyExists",
    "ApiKey",
    "BaseModelInfo",
    "CacheError",
    "CacheFull",
    "FetchCredentials",
    "FileStore",
    "InvalidName",
    "Materializer",
    "NotFound",
    "Quota",
    "RedisRegistry",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "S3Store",
    "SQLiteRegistry",
    "SecretResolver",
    "SharedStore",
    "Tenant",
    "ValidationLimits",
    "adapter_id_of",
    "base_model_info_from_config",
    "digest_files",
    "digest_of",
    "fetch_adapter",
    "generate_key",
    "hash_key",
    "import_adapter",
    "key_id_of",
    "keys_match",
    "load_base_model_info",
    "open_registry",
    "open_store",
    "validate_adapter_dir",
    "validate_name",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
