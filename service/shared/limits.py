"""Tenant limits in Redis: the :class:`~service.guard.limits.LimitStore` every replica shares.

The same buckets as :class:`~service.guard.limits.InProcessLimits` (``rpm`` refilled at rpm/60 per
second up to ``burst``, ``tpm`` at tpm/60 per second up to a minute's tokens, debt allowed), each
operation one Lua script, so acquire's check-and-take is atomic across replicas: no read-then-write
race can grant more than the limit. Time is Redis's own (``TIME``), so replicas' clocks never
disagree about a refill. A bucket key expires once it would be full again (a missing key *is* a
full bucket), so idle tenants cost no memory.

Round trips: an acquire is one script (requests, tokens and the open-call slot at once), and a
settle is one more only when it has something to give back (a slot, or tokens other than reserved).
Neither is deferred or folded into a later call's script: a settle that waited for the next acquire
would leave every other replica a stale bucket meanwhile (debt not yet charged lets a tenant past
its tpm; tokens not yet returned refuse a caller who is within it) and a slot held after its call
answered. What is shared instead is the trip itself: scripts issued while one round trip is out go
together in the next (:class:`~service.shared.client.ScriptBatcher`), so under load a call costs
Redis far less than two round trips, and one call alone is never delayed.

Open calls (``max_concurrent``) are a sorted set of grant ids scored by a lease expiry, not a
counter: a replica that dies holding slots cannot leak them for longer than :data:`SLOT_LEASE_S`.

Redis down: :meth:`RedisLimits.acquire` grants from this process's own buckets (fail open to the
local limits: the tenant gets up to its limit per replica until Redis returns); a shared grant
whose settle cannot reach Redis is dropped (its slot lease expires, its token difference is lost).
"""

from __future__ import annotations

import uuid

from service.guard.limits import CONCURRENCY_RETRY_S, Grant, InProcessLimits, Refusal
from service.guard.policy import TenantPolicy
from service.shared.client import ScriptBatcher, SharedRedis

# A slot held longer than this is taken to belong to a replica that died mid-call. Calls end well
# before it: REQUEST_TIMEOUT_S bounds each attempt (120 s by default) and a call makes a few.
SLOT_LEASE_S = 900

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- The level of a bucket now (refilled since its stamp, up to cap); a missing key is a full bucket.
local function level(key, cap, rate)
  local v = redis.call('HMGET', key, 'level', 'stamp')
  local lvl, stamp = tonumber(v[1]), tonumber(v[2])
  if lvl == nil then return cap end
  lvl = lvl + (now - stamp) * rate
  if lvl > cap then lvl = cap end
  return lvl
end
-- Stores a level; the key lives until the bucket would be full again (plus a minute).
local function store(key, lvl, cap, rate)
  if lvl >= cap then redis.call('DEL', key) return end
  redis.call('HSET', key, 'level', tostring(lvl), 'stamp', tostring(now))
  redis.call('EXPIRE', key, math.ceil((cap - lvl) / rate) + 60)
end
"""

# KEYS: requests bucket, tokens bucket, open-call set.
# ARGV: burst, rpm, tpm, max_concurrent, tokens, grant id, slot lease seconds, concurrency retry hint.
# Returns {1} granted, or {0, limit, retry_after_s as a string} (Lua numbers would be truncated).
ACQUIRE = (
    _COMMON
    + """
local burst, rpm, tpm, maxc, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]), tonumber(ARGV[5])
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= maxc then return {0, 'max_concurrent', ARGV[8]} end
end
local rl, tl, wr, wt = 0, 0, 0, 0
if rpm > 0 then
  rl = level(KEYS[1], burst, rpm / 60)
  if rl < 1 then wr = (1 - rl) / (rpm / 60) end
end
if tpm > 0 then
  tl = level(KEYS[2], tpm, tpm / 60)
  if tl < tokens then wt = (tokens - tl) / (tpm / 60) end
end
if wr > 0 or wt > 0 then
  if wr >= wt then return {0, 'rpm', tostring(wr)} end
  return {0, 'tpm', tostring(wt)}
end
if rpm > 0 then store(KEYS[1], rl - 1, burst, rpm / 60) end
if tpm > 0 then store(KEYS[2], tl - tokens, tpm, tpm / 60) end
if maxc > 0 then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[7]), ARGV[6])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
end
return {1}
"""
)

# KEYS: requests bucket, tokens bucket, open-call set.
# ARGV: grant id, tokens to give back (negative: debt to add), tpm, request to give back (0/1), burst, rpm.
RETURN = (
    _COMMON
    + """
redis.call('ZREM', KEYS[3], ARGV[1])
local back, tpm, req, burst, rpm = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), tonumber(ARGV[6])
if back ~= 0 and tpm > 0 then
  local lvl = level(KEYS[2], tpm, tpm / 60) + back
  if lvl > tpm then lvl = tpm end
  store(KEYS[2], lvl, tpm, tpm / 60)
end
if req > 0 and rpm > 0 then
  local lvl = level(KEYS[1], burst, rpm / 60) + 1
  if lvl > burst then lvl = burst end
  store(KEYS[1], lvl, burst, rpm / 60)
end
return 1
"""
)


class RedisLimits:
    """:class:`~service.guard.limits.LimitStore` in Redis, with this process's buckets as the
    fallback while Redis cannot be reached."""

    def __init__(self, shared: SharedRedis, local: InProcessLimits | None = None) -> None:
        self._redis = shared
        self._local = local or InProcessLimits()
        self._acquire = shared.script(ACQUIRE)
        self._return = shared.script(RETURN)
        # Concurrent calls' acquires and settles share round trips; one call alone is not delayed.
        self._batch = ScriptBatcher(shared.client, lambda: shared.down)
        # rpm and burst of shared grants, for cancel's give-back: the policy may have been reloaded.
        self._rates: dict[str, tuple[int, int]] = {}

    def _keys(self, tenant: str) -> list[str]:
        # {tenant} is a Redis Cluster hash tag: a script's keys must live in one slot.
        tag = "{" + tenant + "}"
        return [
            self._redis.key("lim", tag, "rpm"),
            self._redis.key("lim", tag, "tpm"),
            self._redis.key("lim", tag, "open"),
        ]

    async def acquire(self, policy: TenantPolicy, tokens: int) -> Grant | Refusal:
        """See :class:`~service.guard.limits.LimitStore`; atomic across every replica."""
        ident = uuid.uuid4().hex
        args = [
            policy.burst,
            policy.rpm,
            policy.tpm,
            policy.max_concurrent,
            tokens,
            ident,
            SLOT_LEASE_S,
            CONCURRENCY_RETRY_S,
        ]
        keys = self._keys(policy.tenant)
        result = await self._redis.call("acquire", lambda: self._batch.run(self._acquire, keys, args))
        if result is None:
            return self._local.acquire_now(policy, tokens)
        if int(result[0]) == 0:
            limit = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
            return Refusal(limit, float(result[2]))
        self._rates[policy.tenant] = (policy.rpm, policy.burst)
        return Grant(
            policy.tenant,
            tokens if policy.tpm else 0,
            bool(policy.rpm),
            bool(policy.max_concurrent),
            ident=ident,
            tpm=policy.tpm,
        )

    async def _give_back(self, grant: Grant, tokens: int, request: bool) -> None:
        rpm, burst = self._rates.get(grant.tenant, (0, 0))
        args = [grant.ident, tokens, grant.tpm, int(request), burst, rpm]
        keys = self._keys(grant.tenant)
        await self._redis.call("settle", lambda: self._batch.run(self._return, keys, args))

    async def settle(self, grant: Grant, used_tokens: int) -> None:
        """See :class:`~service.guard.limits.LimitStore`."""
        if not grant.ident:
            self._local.settle_now(grant, used_tokens)
        elif grant.slot or (grant.tpm and used_tokens != grant.tokens):
            await self._give_back(grant, grant.tokens - used_tokens if grant.tpm else 0, False)

    async def cancel(self, grant: Grant) -> None:
        """See :class:`~service.guard.limits.LimitStore`."""
        if not grant.ident:
            await self._local.cancel(grant)
        else:
            await self._give_back(grant, grant.tokens, grant.request)
