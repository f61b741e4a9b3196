"""Registry identity against real stores: born with the first write, kept by a durable Redis,
lost by an emptied one; the ingress's tenancy refuses an emptied or rolled-back registry (503
"reset or rolled back", what it knew keeps answering) instead of answering 401, until an
operator accepts the restore.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from localserve import Redis

from lorafleet.adapters.errors import RegistryUnavailable
from lorafleet.adapters.keys import generate_key, hash_key
from lorafleet.adapters.model import AdapterRecord, ApiKey, Quota, Tenant
from lorafleet.adapters.registry import RedisRegistry, Registry, RegistryIdentity
from lorafleet.adapters.registry.identity import NO_ID
from lorafleet.serving.api.errors import AuthenticationFailed, ServiceUnavailable
from lorafleet.serving.api.tenancy import Tenancy
from lorafleet.serving.metrics import ServingMetrics

BASE = "base-model"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def adapter(name: str) -> AdapterRecord:
    return AdapterRecord(
        tenant="alice", name=name, source=f"file:///adapters/{name}", base_model=BASE,
        digest="ab" * 32, rank=8, alpha=16.0, target_modules=("q_proj",), size_bytes=4096,
        created_at=2.0)


async def seed(reg: Registry) -> dict[str, tuple[str, str]]:
    """alice with three keys; returns name -> (plaintext, key id)."""
    await reg.put_tenant(Tenant("alice", "Alice", Quota(), 1.0))
    keys = {}
    for name in ("used", "unused", "doomed"):
        plain, key_id = generate_key()
        await reg.add_key(ApiKey(key_id, "alice", hash_key(plain), 3.0))
        keys[name] = (plain, key_id)
    return keys


def bearer(plain: str) -> str:
    return f"Bearer {plain}"


async def reconnect(reg: Registry) -> RegistryIdentity:
    """The first command on a pooled connection to a restarted server fails once (redis-py
    finds the socket closed); the ingress counts that as an outage. Get past it here."""
    for _ in range(10):
        try:
            return await reg.identity()
        except RegistryUnavailable:
            continue
    return await reg.identity()


async def test_identity_is_born_with_the_first_write_and_grows(registry: Registry) -> None:
    empty = await registry.identity()
    assert empty == RegistryIdentity(None, 0)
    await registry.put_tenant(Tenant("alice", "Alice", Quota(), 1.0))
    first = await registry.identity()
    assert first.registry_id is not None and first.generation == 1
    await registry.put_tenant(Tenant("bob", "Bob", Quota(), 1.0))
    second = await registry.identity()
    assert second.registry_id == first.registry_id and second.generation == 2
    assert await registry.generation() == 2


async def test_accept_restore_gives_a_new_id_that_supersedes_the_old(registry: Registry) -> None:
    await registry.put_tenant(Tenant("alice", "Alice", Quota(), 1.0))
    before = await registry.identity()
    after = await registry.accept_restore(frozenset({"reg-remembered"}))
    assert after.registry_id not in (None, before.registry_id)
    assert after.generation == before.generation + 1
    assert after.supersedes == {before.registry_id, "reg-remembered", NO_ID}
    again = await registry.accept_restore()
    assert again.supersedes == after.supersedes | {after.registry_id}
    assert (await registry.get_tenant("alice")) is not None  # data untouched


# --- Redis restarts --------------------------------------------------------------------


@pytest.mark.redis
async def test_aof_restart_right_after_a_revoke_and_a_register_loses_nothing(tmp_path: Path) -> None:
    server = Redis(tmp_path, persist=True).start()
    reg = RedisRegistry(server.url, namespace=f"t-{uuid.uuid4().hex[:8]}")
    try:
        keys = await seed(reg)
        await reg.put_adapter(adapter("pirate"))
        clock = Clock()
        tenancy = Tenancy(reg, BASE, clock=clock)
        alice = await tenancy.authenticate(bearer(keys["doomed"][0]))
        await reg.revoke_key("alice", keys["doomed"][1])
        await reg.put_adapter(adapter("french"))
        before = await reg.identity()
        server.stop()
        server.start()
        assert await reconnect(reg) == before
        assert await reg.find_key(hash_key(keys["doomed"][0])) is None
        assert {a.name for a in await reg.list_adapters("alice")} == {"pirate", "french"}
        clock.now += 2
        with pytest.raises(AuthenticationFailed):  # revoked stays revoked
            await tenancy.authenticate(bearer(keys["doomed"][0]))
        assert (await tenancy.authenticate(bearer(keys["unused"][0]))).name == "alice"
        assert (await tenancy.resolve(alice, "french")).adapter is not None
    finally:
        server.stop()
        await reg.close()


@pytest.mark.redis
async def test_redis_restarted_empty_is_a_reset_not_an_empty_registry(tmp_path: Path) -> None:
    server = Redis(tmp_path, persist=False).start()  # no AOF: a restart loses everything
    reg = RedisRegistry(server.url, namespace="lorafleet")
    metrics = ServingMetrics()
    try:
        keys = await seed(reg)
        await reg.put_adapter(adapter("pirate"))
        clock = Clock()
        tenancy = Tenancy(reg, BASE, clock=clock, metrics=metrics)
        alice = await tenancy.authenticate(bearer(keys["used"][0]))
        await tenancy.resolve(alice, "pirate")
        server.stop()
        server.start()
        clock.now += 2
        # The first command on the pooled connection fails (the server restarted), the next
        # one reads an empty store: neither may turn into a 401.
        # A key it never checked: a valid tenant's key gets 503 with the reason, never 401.
        with pytest.raises(ServiceUnavailable, match="reset or rolled back"):
            await tenancy.authenticate(bearer(keys["unused"][0]))
        # What it knew keeps answering.
        assert (await tenancy.authenticate(bearer(keys["used"][0]))).name == "alice"
        assert (await tenancy.resolve(alice, "pirate")).adapter is not None
        with pytest.raises(ServiceUnavailable, match="reset or rolled back"):
            await tenancy.resolve(alice, "french")
        assert metrics.registry.get_sample_value("lorafleet_registry_refused") == 1
        assert (await reconnect(reg)).registry_id is None
        # A writer re-populating the empty store does not make it the truth.
        await reg.put_tenant(Tenant("mallory", "M", Quota(), 1.0))
        clock.now += 2
        with pytest.raises(ServiceUnavailable, match="reset or rolled back"):
            await tenancy.authenticate(bearer(keys["unused"][0]))
        with pytest.raises(ServiceUnavailable, match="reset or rolled back"):
            await tenancy.check_writable()
        # The operator accepts the store as it is: tenancy trusts it again, and a second
        # ingress that knew the old id adopts the new one without being told.
        other = Tenancy(RedisRegistry(server.url), BASE, clock=clock)
        other._trust = tenancy.trust  # it had seen the same registry before the loss
        accepted = await tenancy.accept_restore()
        assert accepted.registry_id is not None and tenancy.trust.trusted
        assert metrics.registry.get_sample_value("lorafleet_registry_refused") == 0
        clock.now += 2
        with pytest.raises(AuthenticationFailed):  # the key is really gone now: 401
            await tenancy.authenticate(bearer(keys["unused"][0]))
        assert (await other.refresh_trust()).trusted
        await other.registry.close()
    finally:
        server.stop()
        await reg.close()


@pytest.mark.redis
async def test_restored_old_snapshot_is_refused_and_the_revoked_key_stays_revoked(
    tmp_path: Path,
) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    server = Redis(data, persist=True).start()
    reg = RedisRegistry(server.url, namespace="lorafleet")
    try:
        keys = await seed(reg)
        server.stop()
        snapshot = tmp_path / "snapshot"
        shutil.copytree(data, snapshot)  # yesterday's backup: "doomed" still valid in it
        server.start()
        clock = Clock()
        ingress_a = Tenancy(reg, BASE, clock=clock)
        ingress_b = Tenancy(RedisRegistry(server.url), BASE, clock=clock)
        await ingress_a.authenticate(bearer(keys["used"][0]))
        await ingress_b.authenticate(bearer(keys["used"][0]))
        await reg.revoke_key("alice", keys["doomed"][1])
        clock.now += 2
        for ingress in (ingress_a, ingress_b):
            with pytest.raises(AuthenticationFailed):
                await ingress.authenticate(bearer(keys["doomed"][0]))
        server.stop()
        shutil.rmtree(data)
        shutil.copytree(snapshot, data)
        server.start()
        await reconnect(reg)
        await reconnect(ingress_b.registry)
        assert await reg.find_key(hash_key(keys["doomed"][0])) is not None  # live in the backup
        clock.now += 2
        for ingress in (ingress_a, ingress_b):
            with pytest.raises(AuthenticationFailed):  # remembered as revoked
                await ingress.authenticate(bearer(keys["doomed"][0]))
            with pytest.raises(ServiceUnavailable, match="reset or rolled back"):
                await ingress.authenticate(bearer(keys["unused"][0]))
            assert ingress.trust.refused == "rolled_back"
        # Writes push the old store's generation past the remembered one: still refused.
        for i in range(5):
            await reg.put_tenant(Tenant(f"t{i}", "T", Quota(), 1.0))
        clock.now += 2
        with pytest.raises(ServiceUnavailable, match="reset or rolled back"):
            await ingress_a.authenticate(bearer(keys["unused"][0]))
        # Accepted through one ingress: both trust it again.
        await reg.revoke_key("alice", keys["doomed"][1])  # the operator re-applies the revoke
        await ingress_a.accept_restore()
        clock.now += 2
        for ingress in (ingress_a, ingress_b):
            assert (await ingress.authenticate(bearer(keys["unused"][0]))).name == "alice"
            assert ingress.trust.trusted
        await ingress_b.registry.close()
    finally:
        server.stop()
        await reg.close()


async def test_sqlite_file_replaced_by_an_older_copy_is_refused(tmp_path: Path) -> None:
    from lorafleet.adapters.registry import SQLiteRegistry

    path = tmp_path / "r.db"
    reg = SQLiteRegistry(path)
    keys = await seed(reg)
    await reg.close()
    shutil.copy(path, tmp_path / "backup.db")
    reg = SQLiteRegistry(path)
    clock = Clock()
    tenancy = Tenancy(reg, BASE, clock=clock)
    await tenancy.authenticate(bearer(keys["used"][0]))
    await reg.revoke_key("alice", keys["doomed"][1])
    clock.now += 2
    with pytest.raises(AuthenticationFailed):
        await tenancy.authenticate(bearer(keys["doomed"][0]))
    await reg.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"r.db{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.db", path)
    tenancy.registry = SQLiteRegistry(path)  # the process reopens the file it is configured with
    clock.now += 2
    with pytest.raises(AuthenticationFailed):  # remembered as revoked
        await tenancy.authenticate(bearer(keys["doomed"][0]))
    with pytest.raises(ServiceUnavailable, match="reset or rolled back"):
        await tenancy.authenticate(bearer(keys["unused"][0]))
    assert tenancy.trust.refused == "rolled_back"
    await tenancy.registry.close()
