"""One Redis connection for the shared state, and what happens when Redis cannot be reached.

Every shared operation goes through :meth:`SharedRedis.call`. When Redis fails (refused, reset,
timed out), the caller falls back to its own in-process state and Redis is left alone for
:data:`RETRY_AFTER_S`, so an outage costs one short timeout per second rather than one per call;
the next call after that tries again, and shared state resumes as soon as Redis answers (redis-py's
pool reconnects on its own). Fallbacks are logged and counted once per minute, never per call.

:class:`ScriptBatcher` puts the scripts of many concurrent calls into one round trip (the tenant
limits run one before and one after every limited call).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

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


# A script waiting for the next round trip: (script, keys, args, its caller's future).
_Queued = tuple[Any, Sequence[Any], Sequence[Any], asyncio.Future[Any]]


class ScriptBatcher:
    """Runs Lua scripts with at most one round trip to Redis in flight: a script that comes while
    one is out waits for it and goes with every other that came meanwhile, in one pipeline.

    With one call at a time nothing waits and nothing changes: each script is one EVALSHA. Under
    load the scripts of concurrent calls share round trips (group commit), so Redis costs this
    process fewer writes, reads and wake-ups per call. Each script stays atomic on its own and
    they run in the order they came; a script is held back by at most the one round trip in flight
    and its caller still waits for its result, so an acquire never sees state older than the
    settle that came before it, and a released slot is free before its call's answer leaves.
    Errors reach each caller as they would from its own EVALSHA (for :meth:`SharedRedis.call`).
    """

    def __init__(self, client: aioredis.Redis, down: Callable[[], bool] = lambda: False) -> None:
        self._client = client
        self._down = down  # Redis failed just now: what queued behind the failure falls back at once
        self._queue: list[_Queued] = []
        self._busy = False
        self._task: asyncio.Task[None] | None = None  # the pipeline in flight (kept from the GC)

    async def run(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``script(keys, args)`` (a :meth:`SharedRedis.script`), alone or in the next pipeline."""
        if not self._busy:
            self._busy = True
            try:
                return await script(keys=keys, args=args)
            finally:
                self._next()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, future))
        return await future

    def _next(self) -> None:
        """Sends what queued during the last round trip, or goes idle."""
        if not self._queue:
            self._busy = False
            self._task = None
            return
        batch, self._queue = self._queue, []
        # A task of its own: a caller cancelled while waiting must not strand the others.
        self._task = asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[_Queued]) -> None:
        try:
            results = await self._execute(batch)
            for (*_, future), result in zip(batch, results, strict=True):
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        except Exception as exc:  # the round trip failed: every caller falls back on its own
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            for *_, future in batch:  # cancelled (the loop is closing): nobody is left waiting
                if not future.done():
                    future.cancel()
            self._next()

    async def _execute(self, batch: list[_Queued]) -> list[Any]:
        """Each script's result, or the error it met, in order."""
        if self._down():
            raise RedisConnectionError("redis failed just now; not tried again yet")
        if len(batch) == 1:
            script, keys, args, _ = batch[0]
            try:
                return [await script(keys=keys, args=args)]
            except RedisError as exc:
                return [exc]
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for i, (script, keys, args, _) in enumerate(batch):
            if isinstance(results[i], NoScriptError):  # Redis restarted empty: load it, run it again
                try:
                    results[i] = await script(keys=keys, args=args)
                except RedisError as exc:
                    results[i] = exc
        return results
