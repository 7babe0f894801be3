"""Per-tenant limits behind one small interface: requests per minute, tokens per minute, open calls.

:class:`LimitStore` is what the security interceptor talks to. It has three operations, each of
which must be atomic in a shared implementation (a Redis Lua script each, when the buckets move
to Redis so that every replica sees the same counts):

* ``acquire``: take one request, a token reservation and an open-call slot, all or nothing;
  refused, nothing is taken and the refusal says which limit and when to retry;
* ``settle``: the call ended; give back the slot and replace the reservation by the charge
  (which may leave the token bucket in debt: the next calls wait it out);
* ``cancel``: the call never ran (refused later, by the process-wide concurrency limit); give
  everything back.

:class:`InProcessLimits` keeps the state in this process; :class:`service.shared.limits.RedisLimits`
keeps it in Redis (``REDIS_URL``), shared by every worker and replica, with the same arithmetic.
Buckets refill continuously: ``rpm`` at ``rpm / 60`` per second up to ``burst`` requests (so a
minute's allowance never arrives in one burst), ``tpm`` at ``tpm / 60`` per second up to a
minute's tokens (one call may need most of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from service.guard.policy import TenantPolicy

CONCURRENCY_RETRY_S = 1.0  # the hint when a tenant is at max_concurrent: calls turn over in about that


@dataclass(slots=True)
class Grant:
    """What one admitted call holds: a request, ``tokens`` reserved, maybe an open-call slot."""

    tenant: str
    tokens: int
    request: bool
    slot: bool
    # Set by a shared store (service.shared.limits): the grant's open-call lease and the tenant's
    # tpm when granted; empty/zero for a grant of this process's own buckets.
    ident: str = ""
    tpm: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Which limit refused a call (``rpm``, ``tpm`` or ``max_concurrent``) and when to retry."""

    limit: str
    retry_after_s: float


class LimitStore(Protocol):
    """The per-tenant counters; see the module docstring for the contract."""

    async def acquire(self, policy: TenantPolicy, tokens: int) -> Grant | Refusal:
        """Takes a request, ``tokens`` and a slot under ``policy``'s limits, or nothing."""
        ...

    async def settle(self, grant: Grant, used_tokens: int) -> None:
        """The call ended having consumed ``used_tokens``."""
        ...

    async def cancel(self, grant: Grant) -> None:
        """The call never ran: everything it took goes back."""
        ...


class TokenBucket:
    """``capacity`` units, refilled at ``rate_per_s``; the level may go negative (debt)."""

    __slots__ = ("capacity", "level", "rate_per_s", "stamp")

    def __init__(self, capacity: float, rate_per_s: float, now: float) -> None:
        self.capacity = capacity
        self.rate_per_s = rate_per_s
        self.level = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        """Adds what accrued since the last refill, up to ``capacity``."""
        level = self.level + (now - self.stamp) * self.rate_per_s
        self.level = level if level < self.capacity else self.capacity
        self.stamp = now

    def resize(self, capacity: float, rate_per_s: float) -> None:
        """New limits (a policy reload) keep what was used: the level never rises because of it."""
        self.capacity = capacity
        self.rate_per_s = rate_per_s
        self.level = min(self.level, capacity)

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` units are available (0 when they are now); call after refill."""
        short = cost - self.level
        return short / self.rate_per_s if short > 0 else 0.0

    def give_back(self, units: float) -> None:
        """Returns units taken for work that did not happen."""
        level = self.level + units
        self.level = level if level < self.capacity else self.capacity


class _Tenant:
    __slots__ = ("open", "requests", "tokens")

    def __init__(self) -> None:
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.open = 0


def _fit(bucket: TokenBucket | None, capacity: int, per_minute: int, now: float) -> TokenBucket | None:
    """The bucket for a limit as configured now (created, resized or dropped), refilled to ``now``."""
    if not per_minute:
        return None
    rate = per_minute / 60.0
    if bucket is None:
        return TokenBucket(capacity, rate, now)
    bucket.refill(now)
    if bucket.capacity != capacity or bucket.rate_per_s != rate:
        bucket.resize(capacity, rate)
    return bucket


class InProcessLimits:
    """:class:`LimitStore` in this process's memory (one replica's view)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Keyed by tenant name: configured key names and "anonymous", so it stays small.
        self._tenants: dict[str, _Tenant] = {}

    async def acquire(self, policy: TenantPolicy, tokens: int) -> Grant | Refusal:
        """See :class:`LimitStore`; ``tokens`` is capped by the caller to the bucket's capacity."""
        return self.acquire_now(policy, tokens)

    def acquire_now(self, policy: TenantPolicy, tokens: int) -> Grant | Refusal:
        """The synchronous body of :meth:`acquire` (for tests with a fake clock)."""
        now = self._clock()
        state = self._tenants.get(policy.tenant)
        if state is None:
            state = self._tenants[policy.tenant] = _Tenant()
        state.requests = requests = _fit(state.requests, policy.burst, policy.rpm, now)
        state.tokens = bucket = _fit(state.tokens, policy.tpm, policy.tpm, now)
        if policy.max_concurrent and state.open >= policy.max_concurrent:
            return Refusal("max_concurrent", CONCURRENCY_RETRY_S)
        wait_rpm = requests.wait_s(1) if requests is not None else 0.0
        wait_tpm = bucket.wait_s(tokens) if bucket is not None else 0.0
        if wait_rpm or wait_tpm:
            # The most restrictive limit decides, and its wait is the one reported.
            return Refusal("rpm", wait_rpm) if wait_rpm >= wait_tpm else Refusal("tpm", wait_tpm)
        if requests is not None:
            requests.level -= 1
        if bucket is not None:
            bucket.level -= tokens
        slot = bool(policy.max_concurrent)
        if slot:
            state.open += 1
        return Grant(policy.tenant, tokens if bucket is not None else 0, requests is not None, slot)

    async def settle(self, grant: Grant, used_tokens: int) -> None:
        """See :class:`LimitStore`."""
        self.settle_now(grant, used_tokens)

    def settle_now(self, grant: Grant, used_tokens: int) -> None:
        """The synchronous body of :meth:`settle`."""
        state = self._tenants[grant.tenant]
        if grant.slot:
            state.open -= 1
        bucket = state.tokens
        if bucket is not None and (grant.tokens or used_tokens):
            bucket.refill(self._clock())
            if used_tokens <= grant.tokens:
                bucket.give_back(grant.tokens - used_tokens)
            else:
                bucket.level -= used_tokens - grant.tokens

    async def cancel(self, grant: Grant) -> None:
        """See :class:`LimitStore`."""
        state = self._tenants[grant.tenant]
        if grant.slot:
            state.open -= 1
        if grant.request and state.requests is not None:
            state.requests.give_back(1)
        if grant.tokens and state.tokens is not None:
            state.tokens.give_back(grant.tokens)

    def tokens_left(self, tenant: str) -> float | None:
        """The tenant's token bucket level now (None without a tpm limit); negative is debt."""
        state = self._tenants.get(tenant)
        if state is None or state.tokens is None:
            return None
        state.tokens.refill(self._clock())
        return state.tokens.level

    def open_calls(self, tenant: str) -> int:
        """The tenant's calls holding a slot now (0 when it has no max_concurrent)."""
        state = self._tenants.get(tenant)
        return state.open if state is not None else 0
