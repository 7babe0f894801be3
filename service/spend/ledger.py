"""The ledger: every call's record, written in batches off the hot path, and read back as usage.

:meth:`SqlLedger.record` only appends to a bounded in-memory queue: it never blocks, never
raises, and never waits for a database. One writer task wakes every ``LEDGER_FLUSH_INTERVAL_MS``
(sooner when a batch's worth is waiting) and commits what is queued, up to ``batch_max`` records
per transaction, together with the budget counters those records and the settled reservations
move. A batch that fails (database down, disk full) stays at the head of the queue and is sent
again, unchanged, with a growing pause (up to ``MAX_RETRY_DELAY_S``); meanwhile new records keep
queueing up to ``queue_max`` and past that are dropped and counted (``state().dropped``).
:meth:`SqlLedger.close` (the SIGTERM path) commits everything before returning, or reports what
it could not. After ``kill -9`` what is lost is what was recorded in the last flush interval plus
the time a commit takes (measured in tests/test_spend_crash.py).

Provider budgets need a fast answer on every call, so the ledger keeps each provider's
month-to-date spend in memory: what the database said at the last refresh (every
``REFRESH_INTERVAL_S``, which also brings in other gateways' spend), plus what this process
committed since, plus what is still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from service.spend.engine import Batch, CounterDelta, Engine, Scope
from service.spend.records import (
    Dimension,
    LedgerState,
    UsageRecord,
    UsageRow,
    clean_text,
    month_key,
    month_start,
    next_month_start,
    to_row,
    utc,
)

log = logging.getLogger("service.spend")
T = TypeVar("T")

DEFAULT_QUEUE_MAX = 100_000
DEFAULT_BATCH_MAX = 1_000
MAX_RETRY_DELAY_S = 5.0  # a down database is retried at least this often
REFRESH_INTERVAL_S = 5.0  # how stale another gateway's provider spend may be here


class LedgerUnavailableError(RuntimeError):
    """A read (usage, spend) could not reach the database; the message says why."""


class Ledger(Protocol):
    """What the gateway needs from a ledger (:class:`SqlLedger` is the one implementation)."""

    async def open(self) -> None:
        """Applies schema migrations and starts the writer; never fails for an unreachable database."""
        ...

    def record(self, rec: UsageRecord) -> None:
        """Queues one record; never blocks, never raises."""
        ...

    async def flush(self) -> bool:
        """Commits everything queued now; False when the database refused (records stay queued)."""
        ...

    async def close(self, timeout_s: float = 10.0) -> None:
        """Commits everything queued (within ``timeout_s``), then closes the database."""
        ...

    def state(self) -> LedgerState:
        """Health's view: ok/degraded, queue depth, drops, last error."""
        ...

    async def usage(
        self,
        start: datetime | None = None,
        end: datetime | None = None,
        group_by: Sequence[Dimension] = (),
        tenant: str | None = None,
    ) -> list[UsageRow]:
        """Committed usage in ``[start, end)`` grouped by the dimensions (default: this month)."""
        ...

    async def month_spend(self, provider: str | None = None, tenant: str | None = None) -> float:
        """This month's committed cost, optionally of one provider and/or tenant."""
        ...


class SqlLedger:
    """The ledger over an :class:`~service.spend.engine.Engine` (SQLite or PostgreSQL).

    Args:
        engine: Where records go (``engine_for_url(LEDGER_URL)``).
        flush_interval_s: Pause between batches (``LEDGER_FLUSH_INTERVAL_MS``).
        queue_max: Records held while the database cannot take them (``LEDGER_QUEUE_MAX``).
        batch_max: Records per transaction; a fuller queue wakes the writer early.
        refresh_interval_s: How often provider spend is re-read (other gateways' records).
        clock: Wall clock (UTC), for the month.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        flush_interval_s: float = 0.2,
        queue_max: int = DEFAULT_QUEUE_MAX,
        batch_max: int = DEFAULT_BATCH_MAX,
        refresh_interval_s: float = REFRESH_INTERVAL_S,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.refresh_interval_s = refresh_interval_s
        self.flush_interval_s = flush_interval_s
        self.queue_max = queue_max
        self.batch_max = batch_max
        self._clock = clock
        self._queue: deque[UsageRecord] = deque()
        self._inflight: Batch | None = None
        self._inflight_pending: dict[tuple[str, str], float] = {}
        self._deltas: dict[tuple[Scope, str, str], list[float]] = {}
        self._pending_cost: dict[tuple[str, str], float] = {}  # (provider, month) -> queued cost
        self._provider_spent: dict[str, dict[str, float]] = {}  # month -> provider -> committed cost
        self._refreshed_at = -math.inf
        self._ticks: list[Callable[[], None]] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = False  # schema migrated
        self._closing = False
        self._closed = False  # after close(): nothing is written any more
        self._ok = True
        self._last_error = ""
        self._last_flush: datetime | None = None
        self._dropped = 0
        self._written = 0

    # -- writing -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Applies the schema migrations and starts the writer.

        An unreachable database does not fail startup: the error shows in :meth:`state`, records
        queue, and the writer keeps trying (migrations first).
        """
        async with self._lock:
            await self._ensure_ready()
            if self._ready:
                await self._refresh_provider_spend()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def add_tick(self, fn: Callable[[], None]) -> None:
        """Calls ``fn`` before each flush (the cost model books elapsed idle tails there)."""
        self._ticks.append(fn)

    def record(self, rec: UsageRecord) -> None:
        """Queues one record for the next batch. Never blocks, never raises; past ``queue_max``
        queued records it drops the new one and counts it in ``state().dropped``."""
        try:
            if len(self._queue) + self._inflight_size() >= self.queue_max or self._closed:
                self._dropped += 1
                return
            pending = _pending(rec)  # also refuses a record without a usable time, here
            self._queue.append(rec)
            if pending is not None:
                key, cost = pending
                self._pending_cost[key] = self._pending_cost.get(key, 0.0) + cost
            if len(self._queue) >= self.batch_max:
                self._wake.set()
        except Exception:  # a malformed record must not fail the call that made it
            self._dropped += 1
            log.exception("ledger: record dropped")

    def _inflight_size(self) -> int:
        return len(self._inflight.rows) if self._inflight else 0

    def add_delta(self, delta: CounterDelta) -> None:
        """Queues a budget counter change for the next batch (settled reservations). Deltas are
        summed per counter, so they take no queue space and are never dropped."""
        key = (delta.scope, clean_text(delta.name), delta.month)
        sums = self._deltas.setdefault(key, [0.0, 0.0])
        sums[0] += delta.spent_usd
        sums[1] += delta.reserved_usd

    async def flush(self) -> bool:
        """Commits everything queued now; False when the database refused (records stay queued)."""
        return await self._drain()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stops the writer, commits everything queued (trying for up to ``timeout_s``), closes.

        Records still queued when the time is up are counted as dropped and logged.
        """
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for tick in self._ticks:
            self._safe(tick)
        while self._has_work() and loop.time() < deadline:
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.01)):
                    if await self._drain():
                        break
                await asyncio.sleep(min(self.flush_interval_s, max(deadline - loop.time(), 0)))
            except TimeoutError:
                break
        if self._has_work():
            lost = len(self._queue) + self._inflight_size()
            self._dropped += lost
            log.error("ledger: %d records not written at shutdown: %s", lost, self._last_error or "timed out")
        self._closed = True
        with contextlib.suppress(Exception):
            await self.engine.close()

    def _has_work(self) -> bool:
        return bool(self._queue or self._inflight or self._deltas)

    async def _run(self) -> None:
        delay = self.flush_interval_s
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            for tick in self._ticks:
                self._safe(tick)
            ok = await self._drain()
            delay = self.flush_interval_s if ok else min(max(delay, self.flush_interval_s) * 2, MAX_RETRY_DELAY_S)

    @staticmethod
    def _safe(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("ledger: tick failed")

    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        try:
            await self.engine.open()
        except Exception as exc:
            self._fail(exc)
            return
        self._ready = True
        self._ok = True
        self._last_error = ""
        log.info("ledger: %s at %s ready", self.engine.name, self.engine.location)

    async def _drain(self) -> bool:
        """Commits batches until nothing is queued; False at the first failure."""
        async with self._lock:
            await self._ensure_ready()
            if not self._ready:
                return False
            while self._has_work():
                batch = self._inflight or self._next_batch()
                try:
                    await self.engine.write(batch)
                except Exception as exc:
                    self._fail(exc)
                    return False
                self._committed(batch)
            if self._clock_s() - self._refreshed_at >= self.refresh_interval_s:
                await self._refresh_provider_spend()
            return True

    def _next_batch(self) -> Batch:
        rows: list[dict[str, Any]] = []
        provider_costs: dict[tuple[str, str], float] = {}  # the counters, from the sanitised rows
        self._inflight_pending = {}  # what record() counted as queued, released at commit
        for _ in range(min(len(self._queue), self.batch_max)):
            rec = self._queue.popleft()
            pending = None
            try:
                pending = _pending(rec)
                row = to_row(rec)
            except Exception:  # one bad record is dropped here, never retried with its batch forever
                self._dropped += 1
                log.exception("ledger: record dropped")
                if pending is not None:
                    self._unpend(*pending)
                continue
            rows.append(row)
            if pending is not None:
                key, cost = pending
                self._inflight_pending[key] = self._inflight_pending.get(key, 0.0) + cost
            if row["provider"] and row["cost_usd"] > 0:
                key = (row["provider"], month_key(row["ts"]))
                provider_costs[key] = provider_costs.get(key, 0.0) + row["cost_usd"]
        deltas = [CounterDelta("provider", p, m, spent_usd=c) for (p, m), c in provider_costs.items()]
        deltas += [CounterDelta(s, n, m, spent, reserved) for (s, n, m), (spent, reserved) in self._deltas.items()]
        self._deltas = {}
        self._inflight = Batch(uuid.uuid4().hex, rows, deltas)
        return self._inflight

    def _committed(self, batch: Batch) -> None:
        self._inflight = None
        self._written += len(batch.rows)
        for key, cost in self._inflight_pending.items():
            self._unpend(key, cost)
        self._inflight_pending = {}
        for d in batch.deltas:
            if d.scope != "provider":
                continue
            month = self._provider_spent.setdefault(d.month, {})
            month[d.name] = month.get(d.name, 0.0) + d.spent_usd
        self._ok = True
        self._last_error = ""
        self._last_flush = self._clock()

    def _unpend(self, key: tuple[str, str], cost: float) -> None:
        left = self._pending_cost.get(key, 0.0) - cost
        if left > 1e-12:
            self._pending_cost[key] = left
        else:
            self._pending_cost.pop(key, None)

    def _fail(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}".strip()[:500]
        if self._ok or message != self._last_error:
            log.warning("ledger: %s unavailable, records wait in the queue: %s", self.engine.name, message)
        self._ok = False
        self._last_error = message

    async def _refresh_provider_spend(self) -> None:
        # Called under the lock, between commits: the database then holds exactly what this
        # process committed, so replacing the month's figures loses nothing of ours.
        month = month_key(self._clock())
        try:
            counters = await self.engine.counters("provider", month)
        except Exception as exc:
            self._fail(exc)
            return
        self._provider_spent = {month: {name: c.spent_usd for name, c in counters.items()}}
        self._refreshed_at = self._clock_s()

    @staticmethod
    def _clock_s() -> float:
        return time.monotonic()

    # -- reading -----------------------------------------------------------------------------

    def provider_spend_estimate(self, provider: str) -> float:
        """This month's spend on a provider: committed (all gateways, as of the last refresh, plus
        this one's since) and still queued here. In memory: cheap enough for every call."""
        month = month_key(self._clock())
        return self._provider_spent.get(month, {}).get(provider, 0.0) + self._pending_cost.get((provider, month), 0.0)

    def state(self) -> LedgerState:
        """Health's view of the ledger."""
        return LedgerState(
            ok=self._ok and self._ready,
            engine=self.engine.name,
            location=self.engine.location,
            queue_depth=len(self._queue) + self._inflight_size(),
            queue_max=self.queue_max,
            dropped=self._dropped,
            written=self._written,
            last_error=self._last_error,
            last_flush=self._last_flush,
        )

    async def usage(
        self,
        start: datetime | None = None,
        end: datetime | None = None,
        group_by: Sequence[Dimension] = (),
        tenant: str | None = None,
    ) -> list[UsageRow]:
        """Committed usage in ``[start, end)`` grouped by the dimensions, ordered by their values.

        Args:
            start: Inclusive; default the start of the current month (UTC).
            end: Exclusive; default the end of the current month (UTC), as GetUsage's unset end.
            group_by: Dimensions in order; none gives one row for everything.
            tenant: Only this tenant (None or empty: all; idle records have no tenant).

        Raises:
            ValueError: An unknown dimension, or ``end`` not after ``start``.
            LedgerUnavailableError: The database could not be read.
        """
        now = self._clock()
        start = utc(start) if start is not None else month_start(now)
        end = utc(end) if end is not None else next_month_start(now)
        if end <= start:
            raise ValueError(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
        return await self._read(lambda: self.engine.usage(start, end, group_by, tenant or None))

    async def month_spend(self, provider: str | None = None, tenant: str | None = None) -> float:
        """This month's committed cost (UTC calendar month), optionally of one provider and/or
        tenant; ``flush()`` first to include what is queued.

        Raises:
            LedgerUnavailableError: The database could not be read.
        """
        now = self._clock()
        start, end = month_start(now), next_month_start(now)
        return await self._read(lambda: self.engine.spend(start, end, provider, tenant))

    async def _read(self, query: Callable[[], Awaitable[T]]) -> T:
        if not self._ready:
            async with self._lock:
                await self._ensure_ready()
        try:
            return await query()
        except ValueError:
            raise
        except Exception as exc:
            raise LedgerUnavailableError(f"ledger ({self.engine.name}) cannot be read: {exc}") from exc


def _pending(rec: UsageRecord) -> tuple[tuple[str, str], float] | None:
    """The (provider, month) a record's cost counts toward, and the cost; None when it costs
    nothing. Raises for a record without a usable time."""
    key = (rec.provider, month_key(rec.time))
    cost = rec.cost_usd
    if rec.provider and isinstance(cost, float | int) and math.isfinite(cost) and cost > 0:
        return key, float(cost)
    return None
