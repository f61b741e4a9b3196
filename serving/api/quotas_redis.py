"""Cluster-wide quotas: the same admission rule as ``quotas.py``, its state kept in Redis.

Boundary: I/O only. The rule (concurrency, then requests/minute, then tokens/minute, token
buckets, unused output tokens refunded at the end) is ``decide_admission``'s; the Lua scripts
below are that function transcribed, run atomically by Redis, so N ingress replicas admit
exactly what one would: every decision reads and writes the tenant's state in one step, with
no window between check and charge. The shared suite (``tests/component/serving/
test_quota_books.py``) runs the same cases against ``QuotaBook`` and this class.

Why Lua scripts and not the ``limits`` library: ``limits`` gives fixed- or moving-window
counters with a ``hit`` of cost N, but none of what the rule needs beyond that. It cannot give
tokens back (our TPM charge is the prompt plus the output *limit*, refunded at the end), it
has no concurrency slots, and charging RPM and TPM in two calls would let a request pass one
and fail the other after being charged (not atomic). Three small scripts (about 60 lines) keep
one semantics for both books.

Keys (one Redis Cluster hash slot per tenant, thanks to the ``{tenant}`` tag)::

    {ns}:quota:{tenant}:leases    sorted set: lease id -> expiry (seconds, Redis clock)
    {ns}:quota:{tenant}:rpm       hash level, updated (a token bucket; expires when full)
    {ns}:quota:{tenant}:tpm       hash level, updated

Concurrency slots are leases, so an ingress that dies mid-request cannot leak them: a lease
expires ``lease_ttl_s`` (30 s) after its last renewal, and each admission first drops expired
leases. A live ingress renews the leases it holds every ``renew_every_s`` (10 s) while their
requests run (streaming or not). **Bound:** a dead ingress's slots are free again at most
``lease_ttl_s`` after it died. The price: an ingress cut off from Redis for longer than that
loses its leases, and others may admit up to its in-flight count more until it finishes.

Clock: Redis's own ``TIME``, one clock for every ingress (process clocks are not comparable
across hosts; ``monotonic()`` is not even comparable across processes). The ``now`` argument
of ``admit`` is therefore ignored; tests inject ``clock`` instead.

When Redis is unreachable (refused, timed out, loading, read-only), admission **fails open
per process**: this process's own ``QuotaBook`` decides, so each ingress enforces the full
quota on its own (N replicas admit up to N times the quota) until Redis answers again. Serving
must continue through a registry outage (the registry already serves from its cache), and
refusing every request because the counter store is down would turn a Redis blip into a full
outage. Each fallback decision is counted (``lorafleet_quota_fail_open_total``); the change
of mode is logged once each way. After a failure Redis is not tried again for
``retry_after_s`` (2 s), so an outage does not add a connect timeout to every request; then
one admission probes it (``breaker.py``) while the others keep deciding locally, so a Redis
whose packets are dropped costs one admission per ``retry_after_s`` a ``timeout_s`` wait, not
every admission that arrives while the probe waits.

Consistency: ``release`` never waits (it is called from ``finally`` blocks); its script
runs in the background. A request that ends normally waits for it (``settled(tenant)``)
before its last bytes (``generation.py``), so a client's next request after one finished
sees the slot free on every ingress; one whose client went away does not wait, and the next
``admit`` of the same tenant in this process waits for it first.
A release pops one of this process's leases of the tenant, not necessarily the request's
own: leases of one tenant are interchangeable for counting. One admitted while Redis was
down is released to the local book. An admission whose answer was lost (a read timeout)
may still have taken its lease in Redis: that lease is released as soon as Redis answers
again, instead of holding a slot for ``lease_ttl_s``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lorafleet.adapters.model import Quota

from .breaker import CircuitBreaker
from .quotas import Admit, QuotaBook, Refuse, TenantUsage, refusal

__all__ = ["RedisQuotaBook", "RedisQuotaSettings"]

log = logging.getLogger(__name__)

# Failures that mean "Redis cannot answer now" (fail open); anything else is a bug and raises.
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)

# Shared by the scripts: the caller's clock if given (tests), else Redis's; numbers stored
# with 17 significant digits so that a level survives the round trip exactly.
_PRELUDE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.17g', x) end
"""

# KEYS: leases, rpm, tpm. ARGV: now|'', max_concurrent|-1, rpm|-1, tpm|-1, cost, lease id,
# lease ttl (s), sequences. Returns {reason, retry_after}; reason 'admit' when admitted.
# A request of k sequences holds k lease members, '<lease id>.1' .. '<lease id>.k'.
_ADMIT = _PRELUDE + """
local maxc, rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cost, lease, ttl = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local k = tonumber(ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if maxc >= 0 then
  if k > maxc then return {'sequences', '60'} end
  if redis.call('ZCARD', KEYS[1]) + k > maxc then return {'concurrency', '1'} end
end
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'updated')
  local l, u = tonumber(v[1]), tonumber(v[2])
  if not l then return cap end
  return math.min(cap, l + math.max(0, now - u) * cap / 60)
end
local function wait(missing, cap)
  if cap > 0 then return fmt(missing / (cap / 60)) end
  return '60'
end
local r, t
if rpm >= 0 then
  r = level(KEYS[2], rpm)
  if r < 1 then return {'requests_per_minute', wait(1 - r, rpm)} end
end
if tpm >= 0 then
  if cost > tpm then return {'too_large', '60'} end
  t = level(KEYS[3], tpm)
  if t < cost then return {'tokens_per_minute', wait(cost - t, tpm)} end
end
-- A bucket left alone for 60 s is full again, the same as absent: let it expire.
if r then
  redis.call('HSET', KEYS[2], 'level', fmt(r - 1), 'updated', fmt(now))
  redis.call('EXPIRE', KEYS[2], 61)
end
if t then
  redis.call('HSET', KEYS[3], 'level', fmt(t - cost), 'updated', fmt(now))
  redis.call('EXPIRE', KEYS[3], 61)
end
for i = 1, k do
  redis.call('ZADD', KEYS[1], now + ttl, lease .. '.' .. i)
end
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
return {'admit', '0'}
"""

# KEYS: leases, tpm. ARGV: now|'' (unused), lease id, tpm|-1, refund, sequences. Frees the
# slots; gives back unused tokens to a bucket that still exists (an expired one is full).
_RELEASE = _PRELUDE + """
for i = 1, tonumber(ARGV[5]) do
  redis.call('ZREM', KEYS[1], ARGV[2] .. '.' .. i)
end
local tpm, refund = tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm >= 0 and refund > 0 then
  local l = tonumber(redis.call('HGET', KEYS[2], 'level'))
  if l then redis.call('HSET', KEYS[2], 'level', fmt(math.min(tpm, l + refund))) end
end
return 1
"""

# KEYS: leases. ARGV: now|'', ttl, lease ids... Pushes back the expiry of leases still
# present (XX: a lease released meanwhile is not brought back).
_RENEW = _PRELUDE + """
local ttl = tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 1)
return 1
"""


class RedisQuotaSettings(BaseModel):
    """Timing of the Redis quota book (defaults suit a cluster; tests shorten them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lease_ttl_s: float = Field(default=30.0, gt=0, description="A concurrency slot's lease lifetime "
                               "without renewal: the bound on slots held by a dead ingress.")
    renew_every_s: float = Field(default=10.0, gt=0, description="How often held leases are renewed "
                                 "(well under lease_ttl_s).")
    retry_after_s: float = Field(default=2.0, ge=0, description="After Redis failed, decide locally "
                                 "for this long before trying Redis again.")
    timeout_s: float = Field(default=1.0, gt=0, description="Socket connect and read timeout.")
    max_connections: int = Field(default=32, ge=1, description="Connections to Redis per process; "
                                 "admissions beyond that queue for one.")
    pool_wait_s: float = Field(default=10.0, gt=0, description="How long an admission queues for a "
                               "free connection. Every connection busy is load, not an outage: "
                               "only waiting longer than this falls back to the local book.")


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisQuotaBook:
    """Per-tenant quota state in Redis, shared by every ingress replica (see module doc)."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "lorafleet",
        settings: RedisQuotaSettings | None = None,
        clock: Callable[[], float] | None = None,
        on_fail_open: Callable[[], None] | None = None,
    ) -> None:
        self.ns = namespace
        self.settings = settings or RedisQuotaSettings()
        self._clock = clock  # None: Redis's TIME (production); tests inject one
        self._on_fail_open = on_fail_open
        # A blocking pool: a burst of admissions waits for a connection (scripts take
        # microseconds) instead of failing with "too many connections", which is load, not
        # an outage, and must not make this process fall back to its local book.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=self.settings.max_connections, timeout=self.settings.pool_wait_s,
            decode_responses=True, socket_connect_timeout=self.settings.timeout_s,
            socket_timeout=self.settings.timeout_s)
        self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self._admit = self._redis.register_script(_ADMIT)
        self._release = self._redis.register_script(_RELEASE)
        self._renew = self._redis.register_script(_RENEW)
        self.local = QuotaBook()
        # Leases this process holds per tenant with their sequence counts (lease None: admitted
        # by the local fallback). Guards nothing across threads: one event loop owns the book.
        self._held: dict[str, list[tuple[str | None, int]]] = {}
        self._pending: dict[str, set[asyncio.Task[None]]] = {}
        # Admissions whose answer never came (tenant, lease, quota, sequences); bounded: past
        # that, a lost lease just expires after lease_ttl_s.
        self._orphans: deque[tuple[str, str, Quota, int]] = deque(maxlen=10_000)
        # Open (decide locally) from a failure until a probe gets through; one probe at a time.
        self._breaker = CircuitBreaker(self.settings.retry_after_s, threshold=1)
        self._degraded = False
        self._renewer: asyncio.Task[None] | None = None

    # --- keys and time ---

    def _key(self, tenant: str, part: str) -> str:
        return f"{self.ns}:quota:{{{tenant}}}:{part}"

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    # --- the Quotas protocol ---

    async def admit(self, tenant: str, quota: Quota, cost_tokens: int, now: float,
                    sequences: int = 1) -> Admit | Refuse:
        """Charge and admit through Redis; fall back to the local book when it is unreachable.
        ``now`` is ignored: Redis's clock (or the injected one) is the only one used."""
        pending = self._pending.get(tenant)
        if pending:  # this process's own releases land first (read your writes)
            await asyncio.gather(*list(pending), return_exceptions=True)
        if self._breaker.allow(time.monotonic()):
            lease = secrets.token_hex(8)
            try:
                reason, retry = await self._admit(
                    keys=[self._key(tenant, "leases"), self._key(tenant, "rpm"),
                          self._key(tenant, "tpm")],
                    args=[self._now_arg(), _limit(quota.max_concurrent),
                          _limit(quota.requests_per_minute), _limit(quota.tokens_per_minute),
                          cost_tokens, lease, self.settings.lease_ttl_s, sequences])
            except _UNREACHABLE as e:
                self._went_down(e)
                # The script may have run and only its answer been lost (a read timeout):
                # then it holds a lease nobody renews or releases. Released once Redis answers.
                self._orphans.append((tenant, lease, quota, sequences))
            except BaseException:
                self._breaker.abandon()
                raise
            else:
                self._came_back()
                self._release_orphans()
                if reason != "admit":
                    return refusal(reason, quota, cost_tokens, float(retry), sequences)
                self._held.setdefault(tenant, []).append((lease, sequences))
                self._start_renewer()
                return Admit(TenantUsage(self.held(tenant)))
        if self._on_fail_open is not None:
            self._on_fail_open()
        decision = self.local.admit_now(tenant, quota, cost_tokens, now, sequences)
        if isinstance(decision, Admit):
            self._held.setdefault(tenant, []).append((None, sequences))
        return decision

    def release(self, tenant: str, quota: Quota, refund_tokens: int, sequences: int = 1) -> None:
        held = self._held.get(tenant)
        lease: str | None = None
        if held:
            # Any of this process's leases of the tenant with the same sequence count will do.
            at = next((i for i in range(len(held) - 1, -1, -1) if held[i][1] == sequences), -1)
            lease, sequences = held.pop(at)
        if held is not None and not held:
            del self._held[tenant]
        if lease is None:
            self.local.release(tenant, quota, refund_tokens, sequences)
            return
        self._release_in_background(tenant, lease, quota, refund_tokens, sequences)

    async def close(self) -> None:
        """Wait for pending releases, stop renewing, close the connection."""
        await self.settled()
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        await self._redis.aclose()

    # --- introspection (tests, /metrics) ---

    async def settled(self, tenant: str | None = None) -> None:
        """Wait until every release started so far (of ``tenant``, or all) has reached Redis
        or failed (a failed one's lease expires by itself)."""
        tasks = [t for name, ts in self._pending.items() if tenant in (None, name) for t in ts]
        await asyncio.gather(*tasks, return_exceptions=True)

    def held(self, tenant: str) -> int:
        """Slots this process holds for ``tenant`` (Redis leases and local fallbacks)."""
        return sum(k for _, k in self._held.get(tenant, ()))

    @property
    def degraded(self) -> bool:
        """Whether admissions are being decided by the local book (Redis unreachable)."""
        return self._degraded

    async def leases(self, tenant: str) -> int:
        """Unexpired leases of ``tenant`` in Redis, from every ingress."""
        now = self._clock() if self._clock is not None else await self._server_time()
        return int(await self._redis.zcount(self._key(tenant, "leases"), f"({now}", "+inf"))

    # --- internals ---

    async def _server_time(self) -> float:
        seconds, micros = await self._redis.time()
        return seconds + micros / 1e6

    def _forget(self, tenant: str, task: asyncio.Task[None]) -> None:
        tasks = self._pending.get(tenant)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._pending[tenant]

    async def _release_remote(self, tenant: str, lease: str, quota: Quota, refund: int,
                              sequences: int) -> None:
        try:
            await self._release(
                keys=[self._key(tenant, "leases"), self._key(tenant, "tpm")],
                args=[self._now_arg(), lease, _limit(quota.tokens_per_minute), max(0, refund),
                      sequences])
        except _UNREACHABLE as e:
            # The lease expires by itself within lease_ttl_s; the refund is lost (the tenant
            # was charged its output limit, never more).
            log.debug("quota release for %s did not reach Redis: %s", tenant, e)

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.settings.renew_every_s)
            await self.renew()

    async def renew(self) -> None:
        """Push back the expiry of every lease this process holds (one round trip)."""
        owned = {t: [f"{lease}.{i}" for lease, k in held if lease is not None
                     for i in range(1, k + 1)] for t, held in self._held.items()}
        owned = {t: ids for t, ids in owned.items() if ids}
        if not owned:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant, ids in owned.items():
                    await self._renew(keys=[self._key(tenant, "leases")],
                                      args=[self._now_arg(), self.settings.lease_ttl_s, *ids],
                                      client=pipe)
                await pipe.execute()
        except _UNREACHABLE as e:
            log.debug("quota lease renewal did not reach Redis: %s", e)

    def _went_down(self, error: Exception) -> None:
        self._breaker.failure(time.monotonic())
        if not self._degraded:
            self._degraded = True
            log.warning("quota store unreachable (%s): each ingress enforces tenant quotas on its "
                        "own until Redis answers again", error)

    def _release_orphans(self) -> None:
        """Release (in the background) the leases of admissions whose answer was lost."""
        while self._orphans:
            tenant, lease, quota, sequences = self._orphans.popleft()
            self._release_in_background(tenant, lease, quota, 0, sequences)

    def _release_in_background(self, tenant: str, lease: str, quota: Quota, refund: int,
                               sequences: int) -> None:
        """Start the release script; ``settled`` and the tenant's next ``admit`` wait for it."""
        task = asyncio.get_running_loop().create_task(
            self._release_remote(tenant, lease, quota, refund, sequences))
        self._pending.setdefault(tenant, set()).add(task)
        task.add_done_callback(lambda t: self._forget(tenant, t))

    def _came_back(self) -> None:
        self._breaker.success()
        if self._degraded:
            self._degraded = False
            log.warning("quota store reachable again: tenant quotas are cluster-wide again")
