"""Embedded registry on SQLite (stdlib `sqlite3`): no server, one file, safe across processes.

Boundary: storage only. Concurrency choice: every call runs on ONE dedicated worker thread that
owns the connection. Statements take microseconds, but a write may wait up to `busy_timeout` for
another process (the operator and the ingress share the file) holding the write lock; that wait
must never stall the event loop. One thread also serialises use of the connection without a
lock. WAL mode lets readers in other processes proceed while one writes.

Schema changes are numbered migrations recorded in `schema_migrations`; add, never edit.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..errors import AlreadyExists, NotFound, RegistryUnavailable
from ..model import AdapterRecord, ApiKey, Quota, Tenant
from .base import Registry
from .identity import NO_ID, RegistryIdentity

__all__ = ["MIGRATIONS", "SQLiteRegistry"]

T = TypeVar("T")

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('generation', 0);
    CREATE TABLE tenants (
        name TEXT PRIMARY KEY, display_name TEXT NOT NULL, max_concurrent INTEGER,
        requests_per_minute INTEGER, tokens_per_minute INTEGER, created_at REAL NOT NULL);
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
        key_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, revoked INTEGER NOT NULL);
    CREATE INDEX api_keys_tenant ON api_keys(tenant);
    CREATE TABLE adapters (
        tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
        name TEXT NOT NULL, source TEXT NOT NULL, base_model TEXT NOT NULL,
        digest TEXT NOT NULL, rank INTEGER NOT NULL, alpha REAL NOT NULL,
        target_modules TEXT NOT NULL, size_bytes INTEGER NOT NULL, local_path TEXT NOT NULL,
        shared INTEGER NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (tenant, name));
    CREATE INDEX adapters_shared ON adapters(shared);
    CREATE TABLE replicas (replica_id TEXT PRIMARY KEY, adapter_ids TEXT NOT NULL);
    """),
    # Adapters are content: where to get them anywhere (secretRef, the shared store's copy).
    # `local_path` stays as a legacy column (written '', never read) so that a pod of the
    # previous version sharing this file can still insert during a rolling upgrade.
    (2, """
    ALTER TABLE adapters ADD COLUMN secret_ref TEXT;
    ALTER TABLE adapters ADD COLUMN stored_at TEXT;
    """),
    # Who manages a key (ApiKey.owner), in a table of its own: a pod of the previous version
    # sharing this file still inserts five values into api_keys during a rolling upgrade.
    (3, """
    CREATE TABLE api_key_owners (
        key_id TEXT PRIMARY KEY REFERENCES api_keys(key_id) ON DELETE CASCADE,
        owner TEXT NOT NULL);
    """),
)
_KEYS = "SELECT k.*, o.owner FROM api_keys k LEFT JOIN api_key_owners o USING (key_id)"

_ADAPTER_COLUMNS = ("tenant, name, source, base_model, digest, rank, alpha, target_modules, "
                    "size_bytes, local_path, shared, created_at, secret_ref, stored_at")


def _tenant(row: sqlite3.Row) -> Tenant:
    return Tenant(row["name"], row["display_name"],
                  Quota(row["max_concurrent"], row["requests_per_minute"],
                        row["tokens_per_minute"]),
                  row["created_at"])


def _key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(row["key_id"], row["tenant"], row["key_hash"], row["created_at"],
                  bool(row["revoked"]), row["owner"])


def _adapter(row: sqlite3.Row) -> AdapterRecord:
    return AdapterRecord(
        tenant=row["tenant"], name=row["name"], source=row["source"],
        base_model=row["base_model"], digest=row["digest"], rank=row["rank"],
        alpha=row["alpha"], target_modules=tuple(json.loads(row["target_modules"])),
        size_bytes=row["size_bytes"], shared=bool(row["shared"]), created_at=row["created_at"],
        secret_ref=row["secret_ref"], stored_at=row["stored_at"])


def _bump(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
    # The store's identity is born with its first write (see identity.py); the 'reg-' prefix
    # keeps the INTEGER-affinity column from turning an all-digit id into a number.
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('registry_id', ?)",
                 (_new_registry_id(),))


def _new_registry_id() -> str:
    return "reg-" + secrets.token_hex(16)


def _identity(conn: sqlite3.Connection) -> RegistryIdentity:
    rows = dict(conn.execute(
        "SELECT key, value FROM meta WHERE key IN ('generation', 'registry_id') "
        "OR key LIKE 'supersedes:%'").fetchall())
    return RegistryIdentity(
        rows.get("registry_id"), int(rows["generation"]),
        frozenset(k[len("supersedes:"):] for k in rows if k.startswith("supersedes:")))


def _require_tenant(conn: sqlite3.Connection, tenant: str) -> None:
    if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone() is None:
        raise NotFound(f"tenant {tenant!r} does not exist")


class SQLiteRegistry(Registry):
    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorafleet-sqlite")
        self._conn: sqlite3.Connection | None = None  # created and used on the worker only
        self._closed = False

    # --- plumbing ---

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s,
                                   isolation_level=None)  # explicit BEGIN/COMMIT below
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(conn)
            self._conn = conn
        return self._conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # one process migrates at a time
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                         "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in MIGRATIONS:
                if version in done:
                    continue
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)",
                             (version, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        def call() -> T:
            conn = self._connect()
            if not write:
                return fn(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                _bump(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return result

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk gone, ...
            raise RegistryUnavailable(f"SQLite registry {self.path}: {exc}") from exc

    async def _change_one(self, sql: str, args: tuple[Any, ...], missing: str) -> None:
        """A write that must touch a row: NotFound(`missing`) when none matched, nothing changed."""
        def op(conn: sqlite3.Connection) -> None:
            if conn.execute(sql, args).rowcount == 0:
                raise NotFound(missing)

        await self._run(op, write=True)

    # --- tenants ---

    async def put_tenant(self, tenant: Tenant) -> None:
        q = tenant.quota

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "display_name=excluded.display_name, max_concurrent=excluded.max_concurrent, "
                "requests_per_minute=excluded.requests_per_minute, "
                "tokens_per_minute=excluded.tokens_per_minute, created_at=excluded.created_at",
                (tenant.name, tenant.display_name, q.max_concurrent, q.requests_per_minute,
                 q.tokens_per_minute, tenant.created_at))

        await self._run(op, write=True)

    async def get_tenant(self, name: str) -> Tenant | None:
        row = await self._run(lambda c: c.execute(
            "SELECT * FROM tenants WHERE name = ?", (name,)).fetchone())
        return _tenant(row) if row else None

    async def list_tenants(self) -> list[Tenant]:
        rows = await self._run(lambda c: c.execute(
            "SELECT * FROM tenants ORDER BY name").fetchall())
        return [_tenant(r) for r in rows]

    async def delete_tenant(self, name: str) -> None:
        await self._change_one("DELETE FROM tenants WHERE name = ?", (name,),
                               f"tenant {name!r} does not exist")

    # --- keys ---

    async def add_key(self, key: ApiKey) -> None:
        def op(conn: sqlite3.Connection) -> None:
            _require_tenant(conn, key.tenant)
            try:
                conn.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?)",
                             (key.key_id, key.tenant, key.key_hash, key.created_at,
                              int(key.revoked)))
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"key {key.key_id} (or its hash) already exists") from exc
            if key.owner is not None:
                conn.execute("INSERT INTO api_key_owners VALUES (?, ?)", (key.key_id, key.owner))

        await self._run(op, write=True)

    async def find_key(self, key_hash: str) -> ApiKey | None:
        row = await self._run(lambda c: c.execute(
            f"{_KEYS} WHERE k.key_hash = ? AND k.revoked = 0", (key_hash,)).fetchone())
        return _key(row) if row else None

    async def revoke_key(self, tenant: str, key_id: str) -> None:
        await self._change_one("UPDATE api_keys SET revoked = 1 WHERE tenant = ? AND key_id = ?",
                               (tenant, key_id), f"key {key_id!r} of tenant {tenant!r} does not exist")

    async def set_key_owner(self, tenant: str, key_id: str, owner: str | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM api_keys WHERE tenant = ? AND key_id = ?",
                            (tenant, key_id)).fetchone() is None:
                raise NotFound(f"key {key_id!r} of tenant {tenant!r} does not exist")
            conn.execute("DELETE FROM api_key_owners WHERE key_id = ?", (key_id,))
            if owner is not None:
                conn.execute("INSERT INTO api_key_owners VALUES (?, ?)", (key_id, owner))

        await self._run(op, write=True)

    async def list_keys(self, tenant: str) -> list[ApiKey]:
        rows = await self._run(lambda c: c.execute(
            f"{_KEYS} WHERE k.tenant = ? ORDER BY k.created_at, k.key_id",
            (tenant,)).fetchall())
        return [_key(r) for r in rows]

    # --- adapters ---

    async def put_adapter(self, record: AdapterRecord) -> None:
        r = record

        def op(conn: sqlite3.Connection) -> None:
            _require_tenant(conn, r.tenant)
            conn.execute(
                f"INSERT OR REPLACE INTO adapters ({_ADAPTER_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.tenant, r.name, r.source, r.base_model, r.digest, r.rank, r.alpha,
                 json.dumps(list(r.target_modules)), r.size_bytes, "", int(r.shared),
                 r.created_at, r.secret_ref, r.stored_at))

        await self._run(op, write=True)

    async def get_adapter(self, tenant: str, name: str) -> AdapterRecord | None:
        row = await self._run(lambda c: c.execute(
            "SELECT * FROM adapters WHERE tenant = ? AND name = ?", (tenant, name)).fetchone())
        return _adapter(row) if row else None

    async def list_adapters(self, tenant: str | None = None) -> list[AdapterRecord]:
        def op(conn: sqlite3.Connection) -> list[Any]:
            if tenant is None:
                return conn.execute("SELECT * FROM adapters ORDER BY tenant, name").fetchall()
            return conn.execute("SELECT * FROM adapters WHERE tenant = ? ORDER BY name",
                                (tenant,)).fetchall()

        return [_adapter(r) for r in await self._run(op)]

    async def list_shared_adapters(self) -> list[AdapterRecord]:
        rows = await self._run(lambda c: c.execute(
            "SELECT * FROM adapters WHERE shared = 1 ORDER BY tenant, name").fetchall())
        return [_adapter(r) for r in rows]

    async def delete_adapter(self, tenant: str, name: str) -> None:
        await self._change_one("DELETE FROM adapters WHERE tenant = ? AND name = ?", (tenant, name),
                               f"adapter {name!r} of tenant {tenant!r} does not exist")

    # --- placement ---

    async def set_replica_adapters(self, replica_id: str, adapter_ids: list[str]) -> None:
        payload = json.dumps(list(adapter_ids))
        await self._run(lambda c: c.execute(
            "INSERT OR REPLACE INTO replicas VALUES (?, ?)", (replica_id, payload)), write=True)

    async def get_replica_adapters(self) -> dict[str, list[str]]:
        rows = await self._run(lambda c: c.execute(
            "SELECT * FROM replicas ORDER BY replica_id").fetchall())
        return {r["replica_id"]: json.loads(r["adapter_ids"]) for r in rows}

    async def remove_replica(self, replica_id: str) -> None:
        await self._run(lambda c: c.execute(
            "DELETE FROM replicas WHERE replica_id = ?", (replica_id,)), write=True)

    # --- housekeeping ---

    async def generation(self) -> int:
        row = await self._run(lambda c: c.execute(
            "SELECT value FROM meta WHERE key = 'generation'").fetchone())
        return int(row[0])

    async def identity(self) -> RegistryIdentity:
        return await self._run(_identity)

    async def accept_restore(self, supersede: frozenset[str] = frozenset()) -> RegistryIdentity:
        def op(conn: sqlite3.Connection) -> None:
            now = _identity(conn)
            old = {*now.supersedes, *supersede, NO_ID}
            if now.registry_id is not None:
                old.add(now.registry_id)
            conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 1)",
                             [(f"supersedes:{i}",) for i in sorted(old)])
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('registry_id', ?)",
                         (_new_registry_id(),))

        await self._run(op, write=True)
        return await self.identity()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
