"""The storage interface both ledger engines implement, and what they share.

Two real engines sit behind it, chosen by ``LEDGER_URL``: SQLite (``sqlite:///path``, the embedded
default, WAL mode) and PostgreSQL (``postgresql://...``, for replicas sharing one ledger). Each
keeps its SQL in its own module (placeholders and types differ); the schema is the same:

- ``usage_records``: one row per record (:class:`~service.spend.records.UsageRecord`).
- ``spend_counters``: month-to-date ``spent_usd`` and ``reserved_usd`` per (scope, name, month),
  scope ``provider`` or ``tenant``. Provider rows grow with every committed record (same
  transaction, so they always equal the sum of the records); tenant rows move only through
  reserve and settle, so a budget check is one row, one statement.
- ``spend_batches``: the id of every committed batch, so a batch whose COMMIT reply was lost and
  that is sent again changes nothing (records are also keyed by id).
- ``spend_schema``: applied migration versions. Migrations are applied in order at startup, each
  in its own transaction, under a lock, so two gateways starting together apply each once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from service.spend.records import DIMENSIONS, Dimension, UsageRow

Scope = Literal["provider", "tenant"]

BUDGET_EPSILON_USD = 1e-9
"""Slack in budget comparisons: sums of float dollars must not refuse the reservation that exactly
fills a budget (100 x $0.01 of a $1.00 budget)."""


@dataclass(frozen=True, slots=True)
class CounterDelta:
    """A change to one month-to-date counter, applied in a batch's transaction."""

    scope: Scope
    name: str
    month: str
    spent_usd: float = 0.0
    reserved_usd: float = 0.0


@dataclass(slots=True)
class Batch:
    """What one transaction writes; retried unchanged (same id) until it commits.

    Attributes:
        id: Unique id, written with the batch: a batch sent again after a lost reply is skipped.
        rows: Records as columns (:func:`~service.spend.records.to_row`), already sanitised.
        deltas: Counter changes.
    """

    id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    deltas: list[CounterDelta] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Counter:
    """A month-to-date counter as stored."""

    spent_usd: float
    reserved_usd: float


class Engine(Protocol):
    """A ledger database. Every method may raise the driver's errors; the ledger handles them."""

    name: str
    location: str

    async def open(self) -> None:
        """Connects and applies the pending schema migrations."""
        ...

    async def close(self) -> None:
        """Closes every connection."""
        ...

    async def write(self, batch: Batch) -> bool:
        """Commits a batch in one transaction; False when its id was already committed."""
        ...

    async def usage(
        self, start: datetime, end: datetime, group_by: Sequence[Dimension], tenant: str | None
    ) -> list[UsageRow]:
        """Records in ``[start, end)`` summed per group, ordered by the group's values."""
        ...

    async def spend(self, start: datetime, end: datetime, provider: str | None, tenant: str | None) -> float:
        """Sum of ``cost_usd`` of the records in ``[start, end)`` matching the filters."""
        ...

    async def counters(self, scope: Scope, month: str) -> dict[str, Counter]:
        """Every counter of a scope for a month, by name."""
        ...

    async def reserve(self, name: str, month: str, amount_usd: float, limit_usd: float) -> Counter | None:
        """Adds ``amount_usd`` to a tenant's reserved spend if spent + reserved + amount stays within
        ``limit_usd``, in one atomic statement; the counter after it, or None when refused."""
        ...


MIGRATIONS_VERSION = 1
"""The schema version this code writes; a database at a newer version is refused (not downgraded)."""


def group_columns(group_by: Sequence[Dimension]) -> list[str]:
    """Column names for the dimensions, in order, without repeats.

    Raises:
        ValueError: An unknown dimension.
    """
    columns = {"tenant": "tenant", "provider": "provider", "model": "served_model", "day": "day"}
    out: list[str] = []
    for dim in group_by:
        if dim not in DIMENSIONS:
            raise ValueError(f"unknown usage dimension {dim!r}; known: {', '.join(DIMENSIONS)}")
        if columns[dim] not in out:
            out.append(columns[dim])
    return out


def usage_row(columns: Sequence[str], values: Sequence[Any]) -> UsageRow:
    """A :class:`UsageRow` from one result row: the group's values, then the five sums."""
    dims = dict(zip(columns, values[: len(columns)], strict=True))
    requests, failed, prompt, completion, cost = values[len(columns) :]
    return UsageRow(
        tenant=str(dims.get("tenant", "")),
        provider=str(dims.get("provider", "")),
        model=str(dims.get("served_model", "")),
        day=str(dims.get("day", "")),
        requests=int(requests or 0),
        failed_requests=int(failed or 0),
        prompt_tokens=int(prompt or 0),
        completion_tokens=int(completion or 0),
        cost_usd=float(cost or 0.0),
    )


def redact_url(url: str) -> str:
    """``url`` without its password (for Health and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def engine_for_url(url: str) -> Engine:
    """The engine ``LEDGER_URL`` names.

    Args:
        url: ``sqlite:///relative/path``, ``sqlite:////absolute/path``, ``sqlite:///:memory:``
            or ``postgresql://user@host:port/db`` (``postgres://`` too; libpq's query options apply).

    Raises:
        ValueError: Another scheme, or no path.
    """
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        from service.spend.sqlite import SQLiteEngine

        return SQLiteEngine(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        from service.spend.postgres import PostgresEngine

        return PostgresEngine(url)
    raise ValueError(f"LEDGER_URL must be sqlite:///path or postgresql://user@host/db, got {redact_url(url)!r}")
