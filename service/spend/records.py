"""What the ledger stores and returns: one record per call, grouped rows, states, and the calendar.

Budgets and reports share one calendar: the month is the UTC calendar month, and a budget resets at
00:00 UTC on the first day of the next one (:func:`next_month_start`).
"""

from __future__ import annotations

import itertools
import math
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Dimension = Literal["tenant", "provider", "model", "day"]
"""A way to group usage rows (``GetUsageRequest.group_by``); ``model`` is the served model."""

DIMENSIONS: tuple[Dimension, ...] = ("tenant", "provider", "model", "day")

RecordKind = Literal["call", "idle"]
"""``call``: one RPC. ``idle``: a GPU provider's billed idle time, booked with no tenant."""

# The caller's tags are bounded like the API bounds them (service/api/agent_fields.py); repeated here
# because the ledger sits below the API layer and must hold even for a record built elsewhere.
MAX_TAGS = 16
MAX_TAG_KEY_CHARS = 64
MAX_TAG_VALUE_CHARS = 256
MAX_TEXT_CHARS = 256  # ids, names and outcomes: anything longer is truncated, never refused
MAX_ATTEMPTS = 32
_INT64_MAX = 2**63 - 1


# Record ids: a random 64-bit prefix per process and a counter. Unique across processes and
# restarts like a uuid4, without a syscall per call, and ids of one process sort in insertion
# order, so the primary-key index grows at its end instead of splitting pages at random.
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of one provider while serving a call.

    Attributes:
        provider: The provider tried, e.g. ``modal``.
        outcome: ``ok``, or the error's reason (``PROVIDER_UNAVAILABLE``, ``PROVIDER_TIMEOUT``...).
    """

    provider: str
    outcome: str


# Not frozen: a frozen dataclass sets each of these 21 fields through object.__setattr__, the
# largest single allocation cost of a call in the profile. Treat records as immutable anyway.
@dataclass(slots=True)
class UsageRecord:
    """One call (or one stretch of a GPU's idle time) as the ledger stores it.

    Attributes:
        time: When the call was admitted; timezone-aware (a naive value is taken as UTC).
        tenant: The caller's tenant; empty for idle records.
        request_id: ``x-request-id`` from the call's metadata, or the one the gateway generated.
        trace_id: The call's trace id (32 hex digits), empty when untraced.
        rpc: ``Chat``, ``ChatStream``...; ``idle`` for idle records.
        model: The model the caller asked for (catalogue name), empty for the default.
        served_model: The provider's model id that answered.
        provider: The provider that served the call (or the last one tried when none did).
        attempts: Every attempt, in order.
        prompt_tokens: Input tokens billed at the input price (Anthropic: without cache reads/writes).
        completion_tokens: Output tokens.
        cache_read_tokens: Input tokens read from a prompt cache, where the provider reports them.
        cache_write_tokens: Input tokens written to a prompt cache, where the provider reports them.
        duration_s: Wall time of the call (of the idle stretch for idle records).
        ttft_s: Time to the first token; None when no token came.
        status_code: The final gRPC status code as a number (0 is OK).
        cost_usd: Estimated cost (see docs/cost.md).
        tags: The caller's ``metadata`` tags; bounded on write (16 tags, 64/256 characters).
        kind: ``call`` or ``idle``.
        id: Unique id of this record; a batch written twice never doubles it.
    """

    time: datetime
    tenant: str
    request_id: str
    trace_id: str = ""
    rpc: str = ""
    model: str = ""
    served_model: str = ""
    provider: str = ""
    attempts: tuple[Attempt, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    duration_s: float = 0.0
    ttft_s: float | None = None
    status_code: int = 0
    cost_usd: float = 0.0
    tags: tuple[tuple[str, str], ...] = ()
    kind: RecordKind = "call"
    id: str = field(default_factory=lambda: f"{_ID_PREFIX}{next(_ids):012x}")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Usage of one group (``GetUsageResponse.rows``); dimensions not grouped by are empty.

    ``requests`` counts calls only (idle records add cost, not requests); ``failed_requests``
    counts calls whose status was not OK.
    """

    tenant: str = ""
    provider: str = ""
    model: str = ""
    day: str = ""
    requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class LedgerState:
    """What Health shows about the ledger.

    Attributes:
        ok: The last write (or the schema migration at startup) succeeded.
        engine: ``sqlite`` or ``postgresql``.
        location: Where it writes, without credentials.
        queue_depth: Records waiting to be written (including a batch being retried).
        queue_max: The bound; past it new records are dropped and counted.
        dropped: Records dropped since startup (queue full, or lost at shutdown).
        written: Records committed since startup.
        last_error: The last write error, empty when ``ok``.
        last_flush: When the last batch committed; None before the first.
    """

    ok: bool
    engine: str
    location: str
    queue_depth: int
    queue_max: int
    dropped: int
    written: int
    last_error: str
    last_flush: datetime | None


def utc(t: datetime) -> datetime:
    """``t`` as an aware UTC datetime (naive values are taken as UTC)."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def month_key(t: datetime) -> str:
    """The calendar month (UTC) of ``t`` as ``YYYY-MM``, the key budgets are counted under."""
    t = utc(t)
    return f"{t.year:04d}-{t.month:02d}"


def month_start(t: datetime) -> datetime:
    """00:00 UTC on the first day of ``t``'s month."""
    t = utc(t)
    return datetime(t.year, t.month, 1, tzinfo=UTC)


def next_month_start(t: datetime) -> datetime:
    """00:00 UTC on the first day of the month after ``t``'s: when a monthly budget resets."""
    t = utc(t)
    return datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=UTC)


def clean_text(value: object, limit: int = MAX_TEXT_CHARS) -> str:
    """``value`` as text a database takes: without NUL (PostgreSQL refuses it; one odd string must
    never block a batch of good ones) and at most ``limit`` characters."""
    return str(value).replace("\x00", "")[:limit]


_text = clean_text


def _count(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return min(max(n, 0), _INT64_MAX)


def _number(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    # NaN would poison every SUM it joins; a negative cost or duration is a bug upstream.
    return x if math.isfinite(x) and x > 0 else 0.0


def to_row(rec: UsageRecord) -> dict[str, Any]:
    """The columns of one record, sanitised so that no value can make a batch fail.

    Text is truncated and stripped of NUL, counts are clamped to 0..2**63-1, non-finite or
    negative numbers become 0, tags are bounded; ``ts`` is an aware UTC datetime and ``day``
    its ``YYYY-MM-DD``.
    """
    ts = utc(rec.time)
    tags: dict[str, str] = {}
    for key, value in list(rec.tags)[:MAX_TAGS]:
        tags[_text(key, MAX_TAG_KEY_CHARS)] = _text(value, MAX_TAG_VALUE_CHARS)
    attempts = [{"provider": _text(a.provider), "outcome": _text(a.outcome)} for a in list(rec.attempts)[:MAX_ATTEMPTS]]
    ttft = None if rec.ttft_s is None else _number(rec.ttft_s)
    return {
        "id": _text(rec.id, 64),
        "ts": ts,
        "day": f"{ts.year:04d}-{ts.month:02d}-{ts.day:02d}",
        "kind": "idle" if rec.kind == "idle" else "call",
        "tenant": _text(rec.tenant),
        "request_id": _text(rec.request_id),
        "trace_id": _text(rec.trace_id, 64),
        "rpc": _text(rec.rpc),
        "model": _text(rec.model),
        "served_model": _text(rec.served_model),
        "provider": _text(rec.provider),
        "attempts": attempts,
        "prompt_tokens": _count(rec.prompt_tokens),
        "completion_tokens": _count(rec.completion_tokens),
        "cache_read_tokens": _count(rec.cache_read_tokens),
        "cache_write_tokens": _count(rec.cache_write_tokens),
        "duration_s": _number(rec.duration_s),
        "ttft_s": ttft,
        "status_code": min(_count(rec.status_code), 2**31 - 1),
        "cost_usd": _number(rec.cost_usd),
        "tags": tags,
    }
