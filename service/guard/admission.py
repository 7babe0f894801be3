"""The process-wide concurrency limit (``MAX_CONCURRENT_REQUESTS``, ``ADMISSION_WAIT_S``).

It refuses with :class:`ResourceExhaustedError` (reason ``CONCURRENCY_LIMIT``), whose
``retry_after_s`` becomes the google.rpc.RetryInfo of the status. It is the last guard of this
process's resources, after each tenant's own limits (:mod:`service.guard.limits`).

A counter, because it is on every call's path. A call over the limit either fails at once or,
with ``ADMISSION_WAIT_S``, queues for a slot; a freed slot is handed straight to the oldest
waiter, so a newcomer never overtakes a caller that has been waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque

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
