"""Circuits, Modal warmth and the wake-up lease in Redis: :class:`~service.routing.health.SharedHealth`.

Keys (under ``REDIS_KEY_PREFIX``), each expiring on its own so nothing needs cleaning up and no two
replicas' clocks are compared:

* ``circuit:<provider>``: present while a replica's circuit is open; expires with its cooldown.
* ``warm:<provider>``: present while the provider answered within its scale-down window; the value
  is the window in ms, so the time since that answer is ``value - PTTL``.
* ``wake:<provider>``: the wake-up lease, ``SET NX PX`` by the replica that talks to the cold
  provider, only while ``warm:<provider>`` is absent (one script: the holder sets warmth and frees
  the lease in one step too, so no replica can take a freed lease without seeing the warmth);
  renewed while it polls, so a replica that dies mid-wake-up frees it within a lease.

Writes come from the routing code's synchronous paths, so they run as background tasks; reads are a
refresh every :data:`REFRESH_S` applied to each slot (the router never waits on Redis to plan).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from service.routing.health import ProviderSlot, WakeLease
from service.shared.client import SharedRedis

log = logging.getLogger(__name__)

REFRESH_S = 0.5  # how stale another replica's circuit or warmth may be here
PUBLISH_WARM_EVERY_S = 1.0  # a busy provider's warmth is written at most this often per replica

# KEYS: lease, warm. ARGV: holder, lease ms. 2 when warm (nothing to wake); else takes a free lease or
# renews our own, 1 when held, 0 when another replica holds it. Warmth and lease in one step, as RELEASE.
HOLD = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_LEASE = {0: WakeLease.TAKEN, 1: WakeLease.HELD, 2: WakeLease.WARM}

# KEYS: lease, warm. ARGV: holder, warm ms (0: not warm). Warmth first, then the lease goes, in one step.
RELEASE = """
if tonumber(ARGV[2]) > 0 then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[2]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisHealth:
    """:class:`~service.routing.health.SharedHealth` over Redis, for the slots of one router."""

    def __init__(self, shared: SharedRedis) -> None:
        self._redis = shared
        self._hold = shared.script(HOLD)
        self._release = shared.script(RELEASE)
        self._slots: list[ProviderSlot] = []
        self._warm_published: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None

    def attach(self, slots: Sequence[ProviderSlot]) -> None:
        """Makes ``slots`` publish to and follow the other replicas."""
        self._slots = list(slots)
        for slot in self._slots:
            slot.shared = self
            slot.breaker.shared = self
            slot.breaker.name = slot.name

    def _key(self, kind: str, provider: str) -> str:
        return self._redis.key(kind, provider)

    def _background(self, what: str, op: Callable[[], Awaitable[Any]]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self._redis.call(what, op))
        except RuntimeError:  # no loop: state-only unit tests
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def circuit_opened(self, provider: str, cooldown_s: float) -> None:
        """See :class:`~service.routing.health.SharedHealth`."""
        ms = max(1, int(cooldown_s * 1000))
        key = self._key("circuit", provider)
        self._background("circuit", lambda: self._redis.client.set(key, "1", px=ms))

    def circuit_closed(self, provider: str) -> None:
        """See :class:`~service.routing.health.SharedHealth`."""
        key = self._key("circuit", provider)
        self._background("circuit", lambda: self._redis.client.delete(key))

    def served(self, provider: str, window_s: float) -> None:
        """See :class:`~service.routing.health.SharedHealth`; at most once a second per provider."""
        now = time.monotonic()
        if now - self._warm_published.get(provider, -1e18) < PUBLISH_WARM_EVERY_S:
            return
        self._warm_published[provider] = now
        ms = max(1, int(window_s * 1000))
        key = self._key("warm", provider)
        self._background("warmth", lambda: self._redis.client.set(key, str(ms), px=ms))

    async def hold_wake(self, provider: str, lease_s: float) -> WakeLease:
        """See :class:`~service.routing.health.SharedHealth`."""
        keys = [self._key("wake", provider), self._key("warm", provider)]
        args = [self._redis.instance, max(1, int(lease_s * 1000))]
        found = await self._redis.call("wake lease", lambda: self._hold(keys=keys, args=args))
        return WakeLease.HELD if found is None else _LEASE[int(found)]

    async def release_wake(self, provider: str, warm_for_s: float = 0.0) -> None:
        """See :class:`~service.routing.health.SharedHealth`."""
        keys = [self._key("wake", provider), self._key("warm", provider)]
        args = [self._redis.instance, int(warm_for_s * 1000)]
        await self._redis.call("wake lease", lambda: self._release(keys=keys, args=args))

    async def refresh(self) -> bool:
        """Reads every provider's circuit and warmth once and applies them; False when Redis failed."""
        if not self._slots:
            return True

        async def read() -> list[Any]:
            pipe = self._redis.client.pipeline(transaction=False)
            for slot in self._slots:
                pipe.pttl(self._key("circuit", slot.name))
                pipe.get(self._key("warm", slot.name))
                pipe.pttl(self._key("warm", slot.name))
            return list(await pipe.execute())

        values = await self._redis.call("refresh", read)
        if values is None:
            return False  # each replica keeps its own view until Redis answers again
        for i, slot in enumerate(self._slots):
            circuit_ms, window, warm_ms = values[3 * i : 3 * i + 3]
            slot.breaker.adopt(circuit_ms / 1000 if circuit_ms > 0 else None)
            if slot.provider.scale_to_zero:
                age = int(window) - warm_ms if window is not None and warm_ms > 0 else None
                slot.adopt_remote_warmth(None if age is None else max(0, age) / 1000)
        return True

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_S)

    def start(self) -> None:
        """Starts the periodic refresh."""
        self._refresher = asyncio.create_task(self._run(), name="shared-health-refresh")

    async def stop(self) -> None:
        """Stops the refresh and waits for pending writes (briefly: Redis may be down)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
