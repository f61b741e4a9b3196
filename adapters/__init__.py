"""`lorafleet.adapters`: what an adapter is, where it comes from, how it is checked, cached and
registered. Serving and the operator both build on it; it imports nothing from them.

Modules: `model` (records), `keys` (API keys), `errors`, `basemodel` (served model shapes),
`validation`, `digest`, `sources` (fetching), `cache` (on-disk LRU), `ingest` (the import
pipeline), `registry` (SQLite and Redis backends), `store` (the shared, content-addressed adapter
store), `secrets` (secretRef -> credentials), `materialize` (a node fetches what it lacks, by
digest).
"""

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
