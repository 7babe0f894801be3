"""The embedded ledger engine: one SQLite file in WAL mode, driven from one thread of its own.

sqlite3 blocks, so every statement runs on a single dedicated thread (which also gives SQLite the
one-writer discipline it wants); the event loop only awaits it. WAL with ``synchronous=NORMAL``:
a commit survives ``kill -9`` of the gateway (the OS holds the written pages), but the last
commits before a power cut may be lost; ``synchronous=FULL`` would fsync every batch. Several
processes may share the file (``busy_timeout`` waits for the lock), so budgets hold across
processes on one machine too.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from service.spend.engine import (
    BUDGET_EPSILON_USD,
    MIGRATIONS_VERSION,
    Batch,
    Counter,
    Scope,
    group_columns,
    usage_row,
)
from service.spend.records import Dimension, UsageRow

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000  # another process holding the write lock: wait this long, then fail the batch (retried)
BATCH_IDS_KEPT_S = 86400.0  # a batch is retried within seconds; a day of ids is ample
PRUNE_EVERY_S = 3600.0

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE usage_records (
            id TEXT PRIMARY KEY, ts REAL NOT NULL, day TEXT NOT NULL, kind TEXT NOT NULL,
            tenant TEXT NOT NULL, request_id TEXT NOT NULL, trace_id TEXT NOT NULL, rpc TEXT NOT NULL,
            model TEXT NOT NULL, served_model TEXT NOT NULL, provider TEXT NOT NULL, attempts TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
            cache_read_tokens INTEGER NOT NULL, cache_write_tokens INTEGER NOT NULL,
            duration_s REAL NOT NULL, ttft_s REAL, status_code INTEGER NOT NULL, cost_usd REAL NOT NULL,
            tags TEXT NOT NULL)""",
        "CREATE INDEX usage_records_ts ON usage_records (ts)",
        "CREATE INDEX usage_records_tenant_ts ON usage_records (tenant, ts)",
        "CREATE INDEX usage_records_provider_ts ON usage_records (provider, ts)",
        """CREATE TABLE spend_counters (
            scope TEXT NOT NULL, name TEXT NOT NULL, month TEXT NOT NULL,
            spent_usd REAL NOT NULL DEFAULT 0, reserved_usd REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (scope, name, month))""",
        "CREATE TABLE spend_batches (id TEXT PRIMARY KEY, committed_at REAL NOT NULL)",
    ],
}
assert max(_MIGRATIONS) == MIGRATIONS_VERSION

_INSERT_RECORD = """INSERT INTO usage_records (id, ts, day, kind, tenant, request_id, trace_id, rpc, model,
    served_model, provider, attempts, prompt_tokens, completion_tokens, cache_read_tokens, cache_write_tokens,
    duration_s, ttft_s, status_code, cost_usd, tags)
    VALUES (:id, :ts, :day, :kind, :tenant, :request_id, :trace_id, :rpc, :model, :served_model, :provider,
    :attempts, :prompt_tokens, :completion_tokens, :cache_read_tokens, :cache_write_tokens, :duration_s,
    :ttft_s, :status_code, :cost_usd, :tags)
    ON CONFLICT (id) DO NOTHING"""

_APPLY_DELTA = """INSERT INTO spend_counters AS c (scope, name, month, spent_usd, reserved_usd)
    VALUES (:scope, :name, :month, :spent, max(:reserved, 0))
    ON CONFLICT (scope, name, month) DO UPDATE SET
        spent_usd = c.spent_usd + excluded.spent_usd,
        reserved_usd = max(c.reserved_usd + :reserved, 0)"""

# One statement: create the month's counter holding the reservation, or add to it, only while
# spent + reserved + amount stays within the limit. RETURNING nothing means refused.
_RESERVE = f"""INSERT INTO spend_counters AS c (scope, name, month, spent_usd, reserved_usd)
    SELECT 'tenant', :name, :month, 0, :amount WHERE :amount <= :limit + {BUDGET_EPSILON_USD}
    ON CONFLICT (scope, name, month) DO UPDATE SET reserved_usd = c.reserved_usd + excluded.reserved_usd
    WHERE c.spent_usd + c.reserved_usd + excluded.reserved_usd <= :limit + {BUDGET_EPSILON_USD}
    RETURNING spent_usd, reserved_usd"""


class SQLiteEngine:
    """The ledger in a SQLite file (``LEDGER_URL=sqlite:///path``); parent folders are created."""

    name = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.location = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._last_prune = 0.0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; each batch says BEGIN IMMEDIATE itself.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not halfway through
        try:
            result = body(conn)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def open(self) -> None:
        """Creates the file if needed and applies pending migrations."""
        await self._run(self._migrate)

    def _migrate(self) -> None:
        # Switching a new file to WAL takes an exclusive lock, and SQLite reports a second process
        # doing the same at that moment as "locked" without waiting: retry that briefly.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                return self._migrate_once()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _migrate_once(self) -> None:
        conn = self._connection()
        conn.execute("CREATE TABLE IF NOT EXISTS spend_schema (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")

        def apply(conn: sqlite3.Connection) -> None:
            (current,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM spend_schema").fetchone()
            if current > MIGRATIONS_VERSION:
                raise RuntimeError(
                    f"ledger schema version {current} is newer than this gateway's {MIGRATIONS_VERSION}; "
                    "upgrade the gateway"
                )
            for version in range(current + 1, MIGRATIONS_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO spend_schema (version, applied_at) VALUES (?, ?)", (version, time.time()))

        # SQLite DDL is transactional: a migration applies whole or not at all.
        self._transaction(apply)

    async def close(self) -> None:
        """Closes the connection and stops the thread."""
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def write(self, batch: Batch) -> bool:
        """Commits a batch in one transaction; False when its id was already committed."""
        rows = [_sqlite_row(row) for row in batch.rows]
        deltas = [
            {"scope": d.scope, "name": d.name, "month": d.month, "spent": d.spent_usd, "reserved": d.reserved_usd}
            for d in batch.deltas
        ]
        return await self._run(self._write, batch.id, rows, deltas)

    def _write(self, batch_id: str, rows: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> bool:
        now = time.time()

        def body(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO spend_batches (id, committed_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                (batch_id, now),
            )
            if cur.rowcount == 0:
                return False
            conn.executemany(_INSERT_RECORD, rows)
            conn.executemany(_APPLY_DELTA, deltas)
            if now - self._last_prune > PRUNE_EVERY_S:
                conn.execute("DELETE FROM spend_batches WHERE committed_at < ?", (now - BATCH_IDS_KEPT_S,))
                self._last_prune = now
            return True

        return self._transaction(body)

    async def usage(
        self, start: datetime, end: datetime, group_by: Sequence[Dimension], tenant: str | None
    ) -> list[UsageRow]:
        """Records in ``[start, end)`` summed per group, ordered by the group's values."""
        columns = group_columns(group_by)
        sql = (
            f"SELECT {''.join(c + ', ' for c in columns)}"
            "SUM(kind = 'call'), SUM(kind = 'call' AND status_code <> 0), "
            "SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd) "
            "FROM usage_records WHERE ts >= :start AND ts < :end"
        )
        if tenant is not None:
            sql += " AND tenant = :tenant"
        if columns:
            sql += f" GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}"
        params = {"start": start.timestamp(), "end": end.timestamp(), "tenant": tenant}

        def query() -> list[tuple[Any, ...]]:
            return self._connection().execute(sql, params).fetchall()

        return [usage_row(columns, row) for row in await self._run(query)]

    async def spend(self, start: datetime, end: datetime, provider: str | None, tenant: str | None) -> float:
        """Sum of ``cost_usd`` of the records in ``[start, end)`` matching the filters."""
        sql = "SELECT COALESCE(SUM(cost_usd), 0) FROM usage_records WHERE ts >= :start AND ts < :end"
        sql += " AND provider = :provider" if provider is not None else ""
        sql += " AND tenant = :tenant" if tenant is not None else ""
        params = {"start": start.timestamp(), "end": end.timestamp(), "provider": provider, "tenant": tenant}

        def query() -> float:
            return float(self._connection().execute(sql, params).fetchone()[0])

        return await self._run(query)

    async def counters(self, scope: Scope, month: str) -> dict[str, Counter]:
        """Every counter of a scope for a month, by name."""

        def query() -> dict[str, Counter]:
            rows = self._connection().execute(
                "SELECT name, spent_usd, reserved_usd FROM spend_counters WHERE scope = ? AND month = ?",
                (scope, month),
            )
            return {name: Counter(spent, reserved) for name, spent, reserved in rows}

        return await self._run(query)

    async def reserve(self, name: str, month: str, amount_usd: float, limit_usd: float) -> Counter | None:
        """Reserves within the limit in one statement; the counter after it, or None when refused."""
        params = {"name": name, "month": month, "amount": amount_usd, "limit": limit_usd}

        def statement() -> Counter | None:
            # Autocommit: the statement is its own transaction, atomic under SQLite's write lock.
            # fetchall: a RETURNING statement ends (and commits) only once its rows are read out.
            rows = self._connection().execute(_RESERVE, params).fetchall()
            return Counter(rows[0][0], rows[0][1]) if rows else None

        return await self._run(statement)


def _sqlite_row(row: dict[str, Any]) -> dict[str, Any]:
    return row | {
        "ts": row["ts"].timestamp(),
        "attempts": orjson.dumps(row["attempts"]).decode(),
        "tags": orjson.dumps(row["tags"]).decode(),
    }
