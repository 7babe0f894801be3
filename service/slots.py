"""Counted slots whose waiters are served in arrival order.

One mechanism for the two places that bound concurrency in a process: the gateway's admission
limit (``MAX_CONCURRENT_REQUESTS``, :mod:`service.guard.admission`) and each upstream connection
pool (:mod:`service.providers.http.client`). A free slot is taken synchronously (no coroutine, no
future: every call while the limit is not reached); a released slot goes straight to the oldest
live waiter, so a newcomer never overtakes a caller that has been waiting.

Invariant: waiters are queued only while no slot is free (``release`` hands its slot to the first
live waiter and frees it only when there is none). Dependency-free, so any layer may use it.
"""

from __future__ import annotations

import asyncio
from collections import deque


class FifoSlots:
    """At most ``limit`` holders; ``in_use`` is the count right now."""

    __slots__ = ("_waiters", "in_use", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        """Takes a slot if one is free at once."""
        if self.in_use < self.limit:
            self.in_use += 1
            return True
        return False

    async def wait(self) -> None:
        """Waits for a slot (bound it with a timeout); holds it on return. A wait that ends in
        an exception (a timeout, the caller going away) holds nothing: a slot handed over in the
        same instant is passed on to the next waiter."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as the wait ended: pass it on
            else:
                waiter.cancel()  # release() skips it; no O(n) removal from the queue
            raise

    def release(self) -> None:
        """Gives a slot back: to the oldest live waiter, else to the free ones."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # in_use is unchanged: the slot changes hands
                return
        self.in_use -= 1
