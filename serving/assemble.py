"""Building the API's services from settings: registry, tokenizer, adapter intake, keys.

Boundary: the one place that turns configuration into live objects for the ingress; used by
the Ray ingress deployment and by tests (which pass a ``LocalEngineClient``).
"""

from __future__ import annotations

from pathlib import Path

from lorafleet.adapters.basemodel import load_base_model_info
from lorafleet.adapters.cache import AdapterCache
from lorafleet.adapters.keys import hash_key
from lorafleet.adapters.materialize import Materializer
from lorafleet.adapters.registry import RedisRegistry, Registry, open_registry
from lorafleet.adapters.secrets import SecretResolver
from lorafleet.adapters.store import open_store
from lorafleet.adapters.validation import ValidationLimits

from .api.prompts import PromptRenderer
from .api.quotas import QuotaBook, Quotas
from .api.quotas_redis import RedisQuotaBook
from .api.services import AdapterIntake, ApiServices
from .api.tenancy import TenancySettings
from .config import AdapterFilesConfig, EngineConfig
from .engine.client import EngineClient
from .metrics import ServingMetrics


def make_intake(
    engine_config: EngineConfig, data_dir: Path, *, max_bytes: int = 512 * 2**20,
    cache_bytes: int = 10 * 2**30, store_url: str | None = None, secrets_dir: Path | None = None,
) -> AdapterIntake:
    """Adapter intake rooted in ``data_dir``, validating against the engine's base model; it
    copies imports to the shared store at ``store_url`` when one is given."""
    intake = AdapterIntake(
        base=load_base_model_info(engine_config.model_dir, engine_config.served_model_name),
        cache_dir=data_dir / "adapter-cache",
        work_dir=data_dir / "tmp",
        max_rank=engine_config.max_lora_rank,
        max_bytes=max_bytes,
        cache_bytes=cache_bytes,
        store=open_store(store_url) if store_url else None,
        secrets=SecretResolver(secrets_dir or data_dir / "secrets"),
    )
    intake.cache_dir.mkdir(parents=True, exist_ok=True)
    intake.work_dir.mkdir(parents=True, exist_ok=True)
    return intake


def make_materializer(engine_config: EngineConfig, files: AdapterFilesConfig) -> Materializer:
    """What an engine replica fetches adapters with, rooted in ITS node's data directory.

    Same cache layout as the intake (``<data_dir>/adapter-cache``), so on the node that
    imported an adapter the first load finds it without a fetch.
    """
    data_dir = Path(files.data_dir)
    return Materializer(
        AdapterCache(data_dir / "adapter-cache", files.cache_bytes),
        base=load_base_model_info(engine_config.model_dir, engine_config.served_model_name),
        limits=ValidationLimits(max_rank=engine_config.max_lora_rank, max_bytes=files.max_bytes),
        work_dir=data_dir / "tmp",
        store=open_store(files.store) if files.store else None,
        secrets=SecretResolver(files.secrets_dir),
    )


def make_quotas(registry: Registry, metrics: ServingMetrics) -> Quotas:
    """Quotas live where the registry lives: in Redis (cluster-wide, every ingress replica
    draws on one budget) when the registry is Redis, else in this process."""
    if isinstance(registry, RedisRegistry):
        return RedisQuotaBook(registry.url, namespace=registry.ns,
                              on_fail_open=metrics.quota_fail_open.inc)
    return QuotaBook()


def make_services(
    *,
    engine_config: EngineConfig,
    engines: EngineClient,
    registry_url: str,
    data_dir: Path,
    admin_key: str,
    max_body_bytes: int = 1_000_000,
    top_k_adapters: int = 20,
    adapter_max_bytes: int = 512 * 2**20,
    adapter_cache_bytes: int = 10 * 2**30,
    metrics_key: str | None = None,
    public_metrics: bool = False,
    adapter_store: str | None = None,
    adapter_secrets_dir: Path | None = None,
    tenancy: TenancySettings | None = None,
    api_docs: bool = False,
    admin_listener: bool = False,
) -> ApiServices:
    intake = make_intake(
        engine_config, data_dir, max_bytes=adapter_max_bytes, cache_bytes=adapter_cache_bytes,
        store_url=adapter_store, secrets_dir=adapter_secrets_dir,
    )
    registry = open_registry(registry_url)
    metrics = ServingMetrics(top_k_adapters)
    return ApiServices(
        served_model_name=engine_config.served_model_name,
        registry=registry,
        engines=engines,
        renderer=PromptRenderer.from_model_dir(engine_config.model_dir, engine_config.max_model_len),
        admin_key_hash=hash_key(admin_key),
        intake=intake,
        metrics=metrics,
        quotas=make_quotas(registry, metrics),
        max_body_bytes=max_body_bytes,
        metrics_key_hash=hash_key(metrics_key) if metrics_key else None,
        public_metrics=public_metrics,
        tenancy_settings=tenancy or TenancySettings(),
        api_docs=api_docs,
        admin_listener=admin_listener,
    )
