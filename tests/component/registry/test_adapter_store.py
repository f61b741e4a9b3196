"""Adapters are content: registered on one node, fetched by digest on any other.

Against a real S3-compatible server (moto's threaded HTTP server on loopback) used both as the
shared adapter store and as a tenant's `s3://` source with credentials from a secretRef, and
each registry backend. Every "node" is a data directory of its own; the importing node's is
deleted before another node asks, as when its pod is gone.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from adapterfiles import TINY_LLAMA_CONFIG
from adapterfiles import write_tiny_adapter as write_adapter
from s3server import S3Server

from lorafleet.adapters.basemodel import base_model_info_from_config
from lorafleet.adapters.cache import AdapterCache
from lorafleet.adapters.errors import AdapterFetchError
from lorafleet.adapters.ingest import import_adapter
from lorafleet.adapters.materialize import Materializer
from lorafleet.adapters.model import AdapterRecord, Quota, Tenant
from lorafleet.adapters.registry import Registry, SQLiteRegistry
from lorafleet.adapters.registry.sqlite import MIGRATIONS
from lorafleet.adapters.secrets import SecretResolver
from lorafleet.adapters.sources import FetchCredentials
from lorafleet.adapters.store import S3Store
from lorafleet.adapters.validation import ValidationLimits, validate_adapter_dir

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

BASE = base_model_info_from_config(TINY_LLAMA_CONFIG, "tiny-llama")
LIMITS = ValidationLimits(max_rank=16, max_bytes=4 << 20)
STORE_KEY, TENANT_KEY, AMBIENT_KEY = "AKIDSTORE", "AKIDTEAMA", "AKIDAMBIENT"


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def env(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Buckets for this test, the pod's ambient identity, and a tenant's mounted secret."""
    endpoint = s3.url
    # The pod's own identity: what a source WITHOUT secretRef would use; never a tenant's.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AMBIENT_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ambient-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    suffix = uuid.uuid4().hex[:8]
    store_bucket, src_bucket = f"store-{suffix}", f"tenant-{suffix}"
    admin = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="admin",
                         aws_secret_access_key="admin", region_name="us-east-1")
    admin.create_bucket(Bucket=store_bucket)
    admin.create_bucket(Bucket=src_bucket)
    secrets_dir = tmp_path / "secrets"
    (secrets_dir / "team-a").mkdir(parents=True)
    for key, value in {"AWS_ACCESS_KEY_ID": TENANT_KEY, "AWS_SECRET_ACCESS_KEY": "team-secret",
                       "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"}.items():
        (secrets_dir / "team-a" / key).write_text(value)

    def store() -> S3Store:  # the deployment's credentials for its own bucket
        return S3Store(f"s3://{store_bucket}/adapters", FetchCredentials(
            aws_access_key_id=STORE_KEY, aws_secret_access_key="store-secret",
            endpoint_url=endpoint, region="us-east-1"))

    return {"admin": admin, "store": store, "store_bucket": store_bucket,
            "src_bucket": src_bucket, "secrets": SecretResolver(secrets_dir),
            "recorder": s3}


Node = Callable[..., Materializer]


@pytest.fixture
def node(tmp_path: Path, env: dict[str, Any]) -> Node:
    """A serving node: its own data directory, the shared store (unless told otherwise)."""
    count = iter(range(100))

    def build(*, cache_bytes: int = 1 << 30, store: bool = True) -> Materializer:
        data = tmp_path / f"node-{next(count)}"
        return Materializer(AdapterCache(data / "adapter-cache", cache_bytes), base=BASE,
                            limits=LIMITS, work_dir=data / "tmp",
                            store=env["store"]() if store else None, secrets=env["secrets"])

    return build


async def _import(registry: Registry, env: dict[str, Any], data_dir: Path, name: str,
                  source: str, *, secret_ref: str | None = None,
                  store: bool = True) -> AdapterRecord:
    if await registry.get_tenant("alice") is None:
        await registry.put_tenant(Tenant("alice", "Alice", Quota(), 1.0))
    return await import_adapter(
        tenant="alice", name=name, source=source, shared=False, registry=registry,
        cache=AdapterCache(data_dir / "adapter-cache", 1 << 30), base=BASE, limits=LIMITS,
        work_dir=data_dir / "tmp", secret_ref=secret_ref, secrets=env["secrets"],
        store=env["store"]() if store else None)


async def test_registered_on_node_a_served_from_node_b_after_a_is_gone(
        registry: Registry, env: dict[str, Any], node: Node, tmp_path: Path) -> None:
    node_a = tmp_path / "node-a"
    src = write_adapter(tmp_path / "upload" / "sql")
    record = await _import(registry, env, node_a, "sql", str(src))
    assert record.stored_at == f"s3://{env['store_bucket']}/adapters/{record.digest}"
    shutil.rmtree(node_a)  # the importing pod is gone, with its cache
    shutil.rmtree(src)  # and the upload it imported from

    stored = await registry.get_adapter("alice", "sql")
    assert stored is not None and "local_path" not in stored.to_dict()
    started = time.perf_counter()
    path = await node().acquire(stored.content)
    took = time.perf_counter() - started
    assert validate_adapter_dir(path, BASE, LIMITS).digest == record.digest
    assert env["recorder"].gets(f"/{env['store_bucket']}/adapters/{record.digest}/")
    print(f"fetch-on-miss from the S3 store: {took * 1000:.0f} ms "
          f"({record.size_bytes} bytes)")


async def test_s3_source_uses_the_secret_refs_credentials_on_every_node(
        registry: Registry, env: dict[str, Any], node: Node, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "src")
    for f in src.iterdir():
        env["admin"].upload_file(str(f), env["src_bucket"], f"team-a/sql/{f.name}")
    source = f"s3://{env['src_bucket']}/team-a/sql"
    record = await _import(registry, env, tmp_path / "node-a", "sql", source,
                           secret_ref="team-a", store=False)
    assert (record.secret_ref, record.stored_at) == ("team-a", None)
    stored = await registry.get_adapter("alice", "sql")
    assert stored is not None
    path = await node(store=False).materialize(stored.content)  # no store: from the source
    assert validate_adapter_dir(path, BASE, LIMITS).digest == record.digest
    reads = env["recorder"].gets(f"/{env['src_bucket']}/")
    assert len(reads) >= 4  # import + materialize, two files each
    assert {key for _, _, key in reads} == {TENANT_KEY}  # never the pod's ambient identity

    # A node where that secret is not mounted refuses, briefly, instead of trying ambient.
    bare = Materializer(AdapterCache(tmp_path / "node-x" / "cache", 1 << 30), base=BASE,
                        limits=LIMITS, work_dir=tmp_path / "node-x" / "tmp",
                        secrets=SecretResolver(tmp_path / "empty"))
    with pytest.raises(AdapterFetchError, match="team-a") as info:
        await bare.materialize(stored.content)
    assert not info.value.transient and "Traceback" not in str(info.value)


async def test_more_adapters_than_the_cache_holds_each_still_materializes(
        registry: Registry, env: dict[str, Any], node: Node, tmp_path: Path) -> None:
    records = []
    for rank in (2, 4, 6, 8):
        src = write_adapter(tmp_path / "upload" / f"a{rank}", rank=rank)
        records.append(await _import(registry, env, tmp_path / "node-a", f"a{rank}", str(src)))
    shutil.rmtree(tmp_path / "upload")
    smallest = min(r.size_bytes for r in records)
    b = node(cache_bytes=smallest)  # holds at most one adapter
    for _ in range(2):  # twice round: every one is evicted and fetched again
        for r in records:
            stored = await registry.get_adapter("alice", r.name)
            assert stored is not None
            path = await b.materialize(stored.content)
            assert validate_adapter_dir(path, BASE, LIMITS).digest == r.digest
    assert len(b.cache.entries()) == 1


async def test_concurrent_requests_on_one_node_download_once(
        registry: Registry, env: dict[str, Any], node: Node, tmp_path: Path) -> None:
    src = write_adapter(tmp_path / "upload" / "sql")
    record = await _import(registry, env, tmp_path / "node-a", "sql", str(src))
    b = node()
    before = len(env["recorder"].gets(f"{record.digest}/adapter_model.safetensors"))
    paths = await asyncio.gather(*(b.acquire(record.content) for _ in range(16)))
    assert len(set(paths)) == 1
    after = len(env["recorder"].gets(f"{record.digest}/adapter_model.safetensors"))
    assert after - before == 1  # one download of the weights for 16 requests


async def test_old_sqlite_rows_with_local_path_migrate(tmp_path: Path) -> None:
    """A registry file written before adapters were content: its rows still read, the path
    is dropped, new records carry their content."""
    db = tmp_path / "registry.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
    for statement in MIGRATIONS[0][1].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO schema_migrations VALUES (1, 0)")
    conn.execute("INSERT INTO tenants VALUES ('alice', 'Alice', NULL, NULL, NULL, 1.0)")
    conn.execute("INSERT INTO adapters VALUES ('alice', 'sql', 's3://b/sql', 'tiny-llama', ?, 4, "
                 "8.0, '[\"q_proj\"]', 10, '/data/adapter-cache/x', 0, 2.0)", ("ab" * 32,))
    conn.commit()
    conn.close()
    registry = SQLiteRegistry(db)
    try:
        old = await registry.get_adapter("alice", "sql")
        assert old is not None and old.content.source == "s3://b/sql"
        assert (old.secret_ref, old.stored_at) == (None, None)
        new = AdapterRecord(**{**old.to_dict(), "name": "new", "secret_ref": "team-a",
                               "stored_at": "s3://store/x"})
        await registry.put_adapter(new)
        assert await registry.get_adapter("alice", "new") == new
    finally:
        await registry.close()


@pytest.mark.redis
async def test_old_redis_records_with_local_path_read(redis_server: Any) -> None:
    from lorafleet.adapters.registry import RedisRegistry

    registry = RedisRegistry(redis_server.url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    try:
        await registry.put_tenant(Tenant("alice", "Alice", Quota(), 1.0))
        legacy = {"tenant": "alice", "name": "sql", "source": "s3://b/sql",
                  "base_model": "tiny-llama", "digest": "ab" * 32, "rank": 4, "alpha": 8.0,
                  "target_modules": ["q_proj"], "size_bytes": 10,
                  "local_path": "/data/adapter-cache/x", "shared": False, "created_at": 2.0}
        await registry._redis.hset(registry._k("tenant", "alice", "adapters"), "sql",
                                   json.dumps(legacy))
        record = await registry.get_adapter("alice", "sql")
        assert record is not None and record.source == "s3://b/sql"
        assert "local_path" not in record.to_dict()
    finally:
        await registry.close()
