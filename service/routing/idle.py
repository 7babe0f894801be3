"""The mid-answer idle timeout (STREAM_IDLE_TIMEOUT_S) at a fixed cost per streamed message.

``asyncio.timeout``'s ``reschedule`` cancels one loop timer and creates another on every call,
and a stream rescheduled twice per message (arm before awaiting the upstream, disarm while the
caller reads). Here a message only stores a number: one timer checks it when it fires, re-arms
itself for the current deadline while the stream is alive, and cancels the task only when the
upstream really was silent for the whole idle time while the router was waiting on it. Time the
caller spends reading never counts.

The cancellation becomes ``TimeoutError`` at the await it interrupted (:meth:`IdleTimeout.expired`),
exactly as ``asyncio.timeout`` does it: a cancellation from anywhere else (the caller went away)
stays a ``CancelledError``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class IdleTimeout:
    """Use as ``with IdleTimeout(idle_s) as idle:``, calling :meth:`waiting` before each await
    of the upstream, :meth:`idle` after it, and :meth:`expired` on a ``CancelledError``."""

    __slots__ = ("_cancelling", "_deadline", "_expired", "_handle", "_idle_s", "_loop", "_task", "_waiting")

    def __init__(self, idle_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(self._loop)
        if task is None:
            raise RuntimeError("IdleTimeout must be used inside a task")
        self._task = task
        self._idle_s = idle_s
        self._deadline = 0.0
        self._waiting = False
        self._expired = False
        self._handle: asyncio.TimerHandle | None = None
        self._cancelling = 0

    def __enter__(self) -> IdleTimeout:
        self._cancelling = self._task.cancelling()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._waiting = False

    def waiting(self) -> None:
        """The router is about to await the upstream: it has ``idle_s`` from now."""
        self._deadline = self._loop.time() + self._idle_s
        self._waiting = True
        if self._handle is None:
            self._handle = self._loop.call_at(self._deadline, self._fire)

    def idle(self) -> None:
        """The upstream answered (or the router stopped waiting on it)."""
        self._waiting = False

    def expired(self, exc: asyncio.CancelledError) -> None:
        """Raises ``TimeoutError`` if ``exc`` is this timeout's own cancellation (call it in an
        ``except asyncio.CancelledError`` around the await, then re-raise ``exc``)."""
        if self._expired:
            self._expired = False
            if self._task.uncancel() <= self._cancelling:
                raise TimeoutError(f"nothing for {self._idle_s} s") from exc

    def _fire(self) -> None:
        self._handle = None
        if not self._waiting:
            return  # the caller is reading: the next waiting() arms a new timer
        if self._loop.time() < self._deadline:
            self._handle = self._loop.call_at(self._deadline, self._fire)
            return
        self._expired = True
        self._task.cancel()
