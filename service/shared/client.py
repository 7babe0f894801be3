"""One Redis connection for the shared state, and what happens when Redis cannot be reached.

Every shared operation goes through :meth:`SharedRedis.call`. When Redis fails (refused, reset,
timed out), the caller falls back to its own in-process state and Redis is left alone for
:data:`RETRY_AFTER_S`, so an outage costs one short timeout per second rather than one per call;
the next call after that tries again, and shared state resumes as soon as Redis answers (redis-py's
pool reconnects on its own). Fallbacks are logged and counted once per minute, never per call.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_AFTER_S = 1.0  # after a failure, Redis is tried again this much later
REPORT_EVERY_S = 60.0  # fallbacks are summed up in one log line this often
# Tight timeouts: Redis answers in well under a millisecond on a LAN; a call must not wait
# seconds on a dead one before it falls back.
SOCKET_TIMEOUT_S = 0.25


def instance_id() -> str:
    """This process's name among the replicas: host, pid (the wake-up lease holder, logs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class SharedRedis:
    """The Redis client, the key prefix, and the fail-open bookkeeping."""

    def __init__(self, url: str, prefix: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=10,
        )
        self.prefix = prefix
        self.instance = instance_id()
        self._clock = clock
        self._down_until = 0.0
        self._down = False
        self._fallbacks = 0
        self._last_error = ""
        self._reported_at = clock()

    def key(self, *parts: str) -> str:
        """``prefix`` + parts joined by ``:``."""
        return self.prefix + ":".join(parts)

    @property
    def down(self) -> bool:
        """Redis failed recently and is being left alone for now."""
        return self._down and self._clock() < self._down_until

    async def call(self, what: str, op: Callable[[], Awaitable[T]]) -> T | None:
        """Runs ``op`` against Redis; None when Redis is down or fails now (the caller falls back)."""
        if self.down:
            self.fell_back(what)
            return None
        try:
            result = await op()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(what, exc)
            return None
        if self._down:
            self._down = False
            log.warning("redis is back: shared state resumes (%d operations used local state)", self._fallbacks)
            self._fallbacks = 0
            self._reported_at = self._clock()
        return result

    def _failed(self, what: str, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        if not self._down:
            log.error("redis unreachable (%s during %s): using this process's own state", self._last_error, what)
        self._down = True
        self._down_until = self._clock() + RETRY_AFTER_S
        self.fell_back(what)

    def fell_back(self, what: str) -> None:
        """Counts one operation served from local state; logs the count once per minute."""
        self._fallbacks += 1
        now = self._clock()
        if now - self._reported_at >= REPORT_EVERY_S:
            log.error(
                "redis still unreachable (%s): %d operations used local state in the last %.0f s",
                self._last_error,
                self._fallbacks,
                now - self._reported_at,
            )
            self._fallbacks = 0
            self._reported_at = now

    def script(self, source: str) -> Any:
        """A Lua script run by EVALSHA (loaded again by redis-py after a Redis restart)."""
        return self.client.register_script(source)

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self.client.aclose()
