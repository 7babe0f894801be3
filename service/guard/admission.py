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

from service.errors import ResourceExhaustedError
from service.slots import FifoSlots

CONCURRENCY_RETRY_S = 1.0  # the hint when no slot frees in time; slots turn over in about a call's length


class ConcurrencyLimiter:
    """At most ``limit`` calls in flight; ``in_flight`` is the count right now."""

    __slots__ = ("_slots", "wait_s")

    def __init__(self, limit: int, wait_s: float) -> None:
        self._slots = FifoSlots(limit)
        self.wait_s = wait_s

    @property
    def limit(self) -> int:
        """MAX_CONCURRENT_REQUESTS."""
        return self._slots.limit

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self._slots.in_use

    def try_acquire(self) -> bool:
        """Takes a slot if one is free (no waiter can be pending then: slots go to waiters first)."""
        return self._slots.try_take()

    async def acquire(self, time_remaining_s: float | None) -> None:
        """Waits up to ADMISSION_WAIT_S (and no longer than the caller's deadline) for a slot.

        Raises:
            ResourceExhaustedError: no slot freed in time (reason ``CONCURRENCY_LIMIT``).
        """
        if self._slots.try_take():
            return
        wait_s = self.wait_s if time_remaining_s is None else min(self.wait_s, time_remaining_s)
        if wait_s <= 0:
            raise self._refusal()
        try:
            async with asyncio.timeout(wait_s):
                await self._slots.wait()
        except TimeoutError:
            raise self._refusal() from None

    def release(self) -> None:
        """Frees a slot, or hands it to the oldest live waiter."""
        self._slots.release()

    def _refusal(self) -> ResourceExhaustedError:
        waited = f"; no slot freed within ADMISSION_WAIT_S={self.wait_s:g} s" if self.wait_s > 0 else ""
        return ResourceExhaustedError(
            f"the gateway is at MAX_CONCURRENT_REQUESTS={self.limit} calls in flight{waited}; retry shortly",
            CONCURRENCY_RETRY_S,
            reason="CONCURRENCY_LIMIT",
        )
