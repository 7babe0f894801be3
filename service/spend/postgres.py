"""The shared ledger engine: PostgreSQL through psycopg 3's asyncio API and its connection pool.

For several gateways writing one ledger and holding one set of budgets. Every statement runs in
autocommit except a batch (one transaction) and the migrations (one transaction under an advisory
lock, so replicas starting together apply each version once). A tenant's reservation is one
``INSERT ... ON CONFLICT DO UPDATE ... WHERE spent + reserved + amount <= limit RETURNING``: the
row lock PostgreSQL takes for it serialises racing gateways, and the WHERE sees the latest
committed row, so together they never pass a budget.

The pool reconnects by itself after the database comes back; a connection that died with the
server fails its next statement once, and the ledger retries that batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from service.spend.engine import (
    BUDGET_EPSILON_USD,
    MIGRATIONS_VERSION,
    Batch,
    Counter,
    Scope,
    group_columns,
    redact_url,
    usage_row,
)
from service.spend.records import Dimension, UsageRow

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4  # the writer, reservations and the odd report; statements are short
POOL_TIMEOUT_S = 3.0  # waiting for a connection longer means the database is down: fail, queue, retry
CONNECT_TIMEOUT_S = 3
MIGRATION_LOCK_KEY = 0x5BE7D1  # pg_advisory_xact_lock key of the ledger's migrations
BATCH_IDS_KEPT = "1 day"

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE usage_records (
            id TEXT PRIMARY KEY, ts TIMESTAMPTZ NOT NULL, day TEXT NOT NULL, kind TEXT NOT NULL,
            tenant TEXT NOT NULL, request_id TEXT NOT NULL, trace_id TEXT NOT NULL, rpc TEXT NOT NULL,
            model TEXT NOT NULL, served_model TEXT NOT NULL, provider TEXT NOT NULL, attempts JSONB NOT NULL,
            prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
            cache_read_tokens BIGINT NOT NULL, cache_write_tokens BIGINT NOT NULL,
            duration_s DOUBLE PRECISION NOT NULL, ttft_s DOUBLE PRECISION, status_code INTEGER NOT NULL,
            cost_usd DOUBLE PRECISION NOT NULL, tags JSONB NOT NULL)""",
        "CREATE INDEX usage_records_ts ON usage_records (ts)",
        "CREATE INDEX usage_records_tenant_ts ON usage_records (tenant, ts)",
        "CREATE INDEX usage_records_provider_ts ON usage_records (provider, ts)",
        """CREATE TABLE spend_counters (
            scope TEXT NOT NULL, name TEXT NOT NULL, month TEXT NOT NULL,
            spent_usd DOUBLE PRECISION NOT NULL DEFAULT 0, reserved_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
            PRIMARY KEY (scope, name, month))""",
        "CREATE TABLE spend_batches (id TEXT PRIMARY KEY, committed_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        "CREATE INDEX spend_batches_committed_at ON spend_batches (committed_at)",
    ],
}
assert max(_MIGRATIONS) == MIGRATIONS_VERSION

_INSERT_RECORD = """INSERT INTO usage_records (id, ts, day, kind, tenant, request_id, trace_id, rpc, model,
    served_model, provider, attempts, prompt_tokens, completion_tokens, cache_read_tokens, cache_write_tokens,
    duration_s, ttft_s, status_code, cost_usd, tags)
    VALUES (%(id)s, %(ts)s, %(day)s, %(kind)s, %(tenant)s, %(request_id)s, %(trace_id)s, %(rpc)s, %(model)s,
    %(served_model)s, %(provider)s, %(attempts)s, %(prompt_tokens)s, %(completion_tokens)s,
    %(cache_read_tokens)s, %(cache_write_tokens)s, %(duration_s)s, %(ttft_s)s, %(status_code)s,
    %(cost_usd)s, %(tags)s)
    ON CONFLICT (id) DO NOTHING"""

_APPLY_DELTA = """INSERT INTO spend_counters AS c (scope, name, month, spent_usd, reserved_usd)
    VALUES (%(scope)s, %(name)s, %(month)s, %(spent)s, GREATEST(%(reserved)s, 0))
    ON CONFLICT (scope, name, month) DO UPDATE SET
        spent_usd = c.spent_usd + excluded.spent_usd,
        reserved_usd = GREATEST(c.reserved_usd + %(reserved)s, 0)"""

_RESERVE = f"""INSERT INTO spend_counters AS c (scope, name, month, spent_usd, reserved_usd)
    SELECT 'tenant', %(name)s, %(month)s, 0, %(amount)s::float8
    WHERE %(amount)s::float8 <= %(limit)s::float8 + {BUDGET_EPSILON_USD}
    ON CONFLICT (scope, name, month) DO UPDATE SET reserved_usd = c.reserved_usd + excluded.reserved_usd
    WHERE c.spent_usd + c.reserved_usd + excluded.reserved_usd <= %(limit)s::float8 + {BUDGET_EPSILON_USD}
    RETURNING spent_usd, reserved_usd"""


class PostgresEngine:
    """The ledger in PostgreSQL (``LEDGER_URL=postgresql://user@host:5432/db``)."""

    name = "postgresql"

    def __init__(self, url: str) -> None:
        self.location = redact_url(url)
        self._pool = AsyncConnectionPool(
            url,
            min_size=POOL_MIN_SIZE,
            max_size=POOL_MAX_SIZE,
            open=False,
            timeout=POOL_TIMEOUT_S,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            configure=_configure,
            name="ledger",
        )
        self._opened = False

    async def open(self) -> None:
        """Opens the pool (without waiting for a connection) and applies pending migrations."""
        if not self._opened:
            await self._pool.open(wait=False)
            self._opened = True
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS spend_schema (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM spend_schema")
            row = await cur.fetchone()
            current = int(row[0]) if row else 0
            if current > MIGRATIONS_VERSION:
                raise RuntimeError(
                    f"ledger schema version {current} is newer than this gateway's {MIGRATIONS_VERSION}; "
                    "upgrade the gateway"
                )
            for version in range(current + 1, MIGRATIONS_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO spend_schema (version) VALUES (%s)", (version,))

    async def close(self) -> None:
        """Closes the pool."""
        await self._pool.close()

    async def write(self, batch: Batch) -> bool:
        """Commits a batch in one transaction; False when its id was already committed."""
        rows = [_pg_row(row) for row in batch.rows]
        deltas = [
            {"scope": d.scope, "name": d.name, "month": d.month, "spent": d.spent_usd, "reserved": d.reserved_usd}
            for d in batch.deltas
        ]
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute("SET LOCAL synchronous_commit TO on")  # records are kept: wait for the disk
            await cur.execute("INSERT INTO spend_batches (id) VALUES (%s) ON CONFLICT (id) DO NOTHING", (batch.id,))
            if cur.rowcount == 0:
                return False
            if rows:
                await cur.executemany(_INSERT_RECORD, rows)
            if deltas:
                await cur.executemany(_APPLY_DELTA, deltas)
            if batch.id.endswith("00"):  # about one batch in 256: keep the id table small
                await cur.execute(f"DELETE FROM spend_batches WHERE committed_at < now() - interval '{BATCH_IDS_KEPT}'")
        return True

    async def usage(
        self, start: datetime, end: datetime, group_by: Sequence[Dimension], tenant: str | None
    ) -> list[UsageRow]:
        """Records in ``[start, end)`` summed per group, ordered by the group's values."""
        columns = group_columns(group_by)
        sql = (
            f"SELECT {''.join(c + ', ' for c in columns)}"
            "COUNT(*) FILTER (WHERE kind = 'call'), COUNT(*) FILTER (WHERE kind = 'call' AND status_code <> 0), "
            "COALESCE(SUM(prompt_tokens), 0)::bigint, COALESCE(SUM(completion_tokens), 0)::bigint, "
            "COALESCE(SUM(cost_usd), 0) FROM usage_records WHERE ts >= %(start)s AND ts < %(end)s"
        )
        if tenant is not None:
            sql += " AND tenant = %(tenant)s"
        if columns:
            sql += f" GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}"
        params = {"start": start, "end": end, "tenant": tenant}
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return [usage_row(columns, row) for row in await cur.fetchall()]

    async def spend(self, start: datetime, end: datetime, provider: str | None, tenant: str | None) -> float:
        """Sum of ``cost_usd`` of the records in ``[start, end)`` matching the filters."""
        sql = "SELECT COALESCE(SUM(cost_usd), 0) FROM usage_records WHERE ts >= %(start)s AND ts < %(end)s"
        sql += " AND provider = %(provider)s" if provider is not None else ""
        sql += " AND tenant = %(tenant)s" if tenant is not None else ""
        params = {"start": start, "end": end, "provider": provider, "tenant": tenant}
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
        return float(row[0]) if row else 0.0

    async def counters(self, scope: Scope, month: str) -> dict[str, Counter]:
        """Every counter of a scope for a month, by name."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT name, spent_usd, reserved_usd FROM spend_counters WHERE scope = %s AND month = %s",
                (scope, month),
            )
            return {name: Counter(spent, reserved) for name, spent, reserved in await cur.fetchall()}

    async def reserve(self, name: str, month: str, amount_usd: float, limit_usd: float) -> Counter | None:
        """Reserves within the limit in one statement; the counter after it, or None when refused.

        A connection that died with a database restart fails once; the statement is then sent again
        on a fresh one. If the first had in fact run, the tenant holds one extra reservation until
        the month ends: conservative, never an overspend.
        """
        params = {"name": name, "month": month, "amount": amount_usd, "limit": limit_usd}
        for attempt in range(2):
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(_RESERVE, params)
                    row = await cur.fetchone()
                return None if row is None else Counter(row[0], row[1])
            except psycopg.OperationalError:
                if attempt:
                    raise
        raise AssertionError("unreachable")


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # A reservation is a hold of seconds on the call's path: it must be atomic and at once visible
    # to every gateway (asynchronous commit keeps both), not wait ~ms for the server's WAL flush.
    # If the server crashes, holds of its last fraction of a second are lost (their calls go
    # unheld, never double-spent); batches of records switch durability back on (write()).
    await conn.execute("SET synchronous_commit TO off")


def _pg_row(row: dict[str, Any]) -> dict[str, Any]:
    return row | {"attempts": Jsonb(row["attempts"]), "tags": Jsonb(row["tags"])}
