"""Admission control: the concurrency limit and per-tenant rate limits (token buckets).

Both refuse with :class:`ResourceExhaustedError`, whose ``retry_after_s`` becomes the
google.rpc.RetryInfo of the status and whose ``reason`` (``CONCURRENCY_LIMIT``,
``RATE_LIMIT_RPM``, ``RATE_LIMIT_TPM``) becomes the ErrorInfo reason.

Concurrency: a counter, because it is on every call's path. A call over the limit either fails at
once or, with ``ADMISSION_WAIT_S``, queues for a slot; a freed slot is handed straight to the
oldest waiter, so a newcomer never overtakes a caller that has been waiting.

Rate limits: per tenant, one bucket of requests (``RATE_LIMIT_RPM``) and one of tokens
(``RATE_LIMIT_TPM``); each holds a minute's allowance and refills continuously. A call reserves
one request and ``max_tokens`` tokens up front, so a tenant without budget for the answer it asks
for is refused before any upstream work; when the call ends the reservation is replaced by the
usage the provider reported (prompt + completion), which may leave the bucket in debt. A call is
admitted only if *every* bucket has room: the most restrictive limit decides, and its wait is the
one reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from service.errors import ResourceExhaustedError

CONCURRENCY_RETRY_S = 1.0  # the hint when no slot frees in time; slots turn over in about a call's length


class ConcurrencyLimiter:
    """At most ``limit`` calls in flight; ``in_flight`` is the count right now."""

    __slots__ = ("_waiters", "in_flight", "limit", "wait_s")

    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        """Takes a slot if one is free (no waiter can be pending then: slots go to waiters first)."""
        if self.in_flight < self.limit:
            self.in_flight += 1
            return True
        return False

    async def acquire(self, time_remaining_s: float | None) -> None:
        """Waits up to ADMISSION_WAIT_S (and no longer than the caller's deadline) for a slot.

        Raises:
            ResourceExhaustedError: no slot freed in time (reason ``CONCURRENCY_LIMIT``).
        """
        if self.try_acquire():
            return
        wait_s = self.wait_s if time_remaining_s is None else min(self.wait_s, time_remaining_s)
        if wait_s <= 0:
            raise self._refusal()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait_s):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived as the timer fired: it is ours, use it
            waiter.cancel()  # release() skips it; no O(n) removal from the queue
            raise self._refusal() from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled before using it: pass it on
            else:
                waiter.cancel()
            raise

    def release(self) -> None:
        """Frees a slot, or hands it to the oldest live waiter."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # in_flight is unchanged: the slot changes hands
                return
        self.in_flight -= 1

    def _refusal(self) -> ResourceExhaustedError:
        waited = f"; no slot freed within ADMISSION_WAIT_S={self.wait_s:g} s" if self.wait_s > 0 else ""
        return ResourceExhaustedError(
            f"the gateway is at MAX_CONCURRENT_REQUESTS={self.limit} calls in flight{waited}; retry shortly",
            CONCURRENCY_RETRY_S,
            reason="CONCURRENCY_LIMIT",
        )


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

    def wait_s(self, cost: float) -> float:
        """Seconds until ``cost`` units are available (0 when they are now); call after refill."""
        short = cost - self.level
        return short / self.rate_per_s if short > 0 else 0.0

    def give_back(self, units: float) -> None:
        """Returns units taken for work that did not happen."""
        level = self.level + units
        self.level = level if level < self.capacity else self.capacity


class RateLimiter:
    """Per-tenant requests-per-minute and tokens-per-minute limits; 0 turns a limit off."""

    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        # Tenants are the configured key names (or "anonymous"), so this never grows unbounded.
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def reservation(self, max_tokens: int) -> int:
        """Tokens a call reserves up front: its max_tokens, but never more than a bucket holds,
        so that a large max_tokens is admitted when the tenant's whole minute is unused."""
        return min(max_tokens, self.tpm) if self.tpm else 0

    def _bucket(self, table: dict[str, TokenBucket], tenant: str, per_minute: int, now: float) -> TokenBucket:
        bucket = table.get(tenant)
        if bucket is None:
            bucket = table[tenant] = TokenBucket(per_minute, per_minute / 60.0, now)
        else:
            bucket.refill(now)
        return bucket

    def admit(self, tenant: str, reserve_tokens: int) -> ResourceExhaustedError | None:
        """Takes one request and ``reserve_tokens`` from the tenant's buckets, or returns the refusal.

        Nothing is taken when the call is refused, so a refused call costs the tenant nothing.
        """
        now = self._clock()
        requests = tokens = None
        wait_rpm = wait_tpm = 0.0
        if self.rpm:
            requests = self._bucket(self._requests, tenant, self.rpm, now)
            wait_rpm = requests.wait_s(1)
        if self.tpm:
            tokens = self._bucket(self._tokens, tenant, self.tpm, now)
            wait_tpm = tokens.wait_s(reserve_tokens)
        if wait_rpm or wait_tpm:
            if wait_rpm >= wait_tpm:
                return ResourceExhaustedError(
                    f"tenant {tenant!r} is over RATE_LIMIT_RPM ({self.rpm} requests per minute); "
                    f"retry in {wait_rpm:.2f} s",
                    wait_rpm,
                    reason="RATE_LIMIT_RPM",
                )
            return ResourceExhaustedError(
                f"tenant {tenant!r} is over RATE_LIMIT_TPM ({self.tpm} tokens per minute; this call reserves "
                f"{reserve_tokens} tokens, its max_tokens); retry in {wait_tpm:.2f} s",
                wait_tpm,
                reason="RATE_LIMIT_TPM",
            )
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= reserve_tokens
        return None

    def refund(self, tenant: str, reserved_tokens: int) -> None:
        """Undoes :meth:`admit` for a call that was then not served (no slot was free)."""
        if self.rpm:
            self._requests[tenant].give_back(1)
        if self.tpm:
            self._tokens[tenant].give_back(reserved_tokens)

    def settle(self, tenant: str, reserved_tokens: int, used_tokens: int) -> None:
        """Replaces the call's reservation by the tokens it actually used."""
        if self.tpm:
            bucket = self._tokens[tenant]
            if used_tokens <= reserved_tokens:
                bucket.give_back(reserved_tokens - used_tokens)
            else:
                bucket.level -= used_tokens - reserved_tokens
