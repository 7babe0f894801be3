"""Usage on demand: what ``client.usage(...)`` sends and returns, shared by both clients and the CLI.

The gateway's ``GetUsage`` sums its ledger over ``[start, end)`` grouped by tenant, provider,
served model and/or day (UTC). An admin key sees every tenant; a tenant key only its own. Unset
times mean the current calendar month (UTC), decided by the gateway's clock.

Times are given as a ``datetime`` (naive means UTC), a ``date`` or a string: ``YYYY-MM-DD``,
``YYYY-MM`` or ISO 8601 (``2026-11-01T09:00Z``). A day or month given as ``until`` is included
whole (``until="2026-11-30"`` ends at the end of that day), while an exact time is exclusive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta

from inference.v1 import inference_pb2 as pb

from clients.types import UsageRow

UsageTime = datetime | date | str
"""A bound of a usage query: a datetime (naive is UTC), a date, or ``YYYY-MM-DD``, ``YYYY-MM`` or an
ISO 8601 time."""

DIMENSIONS: dict[str, pb.UsageDimension] = {
    "tenant": pb.USAGE_DIMENSION_TENANT,
    "provider": pb.USAGE_DIMENSION_PROVIDER,
    "model": pb.USAGE_DIMENSION_MODEL,
    "day": pb.USAGE_DIMENSION_DAY,
}
"""The ways usage can be grouped, by the name ``by=`` and ``--by`` take."""

DEFAULT_BY: tuple[str, ...] = ("tenant", "provider", "day")
"""The grouping when the caller names none."""

_MONTH = re.compile(r"\d{4}-\d{2}")


def parse_time(value: UsageTime, *, end: bool = False, name: str = "since") -> datetime:
    """One bound as an aware UTC datetime.

    Args:
        value: A datetime (naive is UTC), a date, or ``YYYY-MM-DD``, ``YYYY-MM`` or ISO 8601 text.
        end: It is the end of the range: a day or a month given without a time is included whole,
            so the bound is the start of the next one.
        name: How to name the bound in an error (``until``, ``--until``).

    Raises:
        ValueError: Not a date or time; the message names the bound and the accepted forms.
        TypeError: Not a datetime, date or str.
    """
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return _midnight(value + timedelta(days=1) if end else value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a datetime, a date or a string, not {type(value).__name__}")
    text = value.strip()
    try:
        if _MONTH.fullmatch(text):
            first = date.fromisoformat(f"{text}-01")
            return _midnight(_next_month(first) if end else first)
        try:
            day = date.fromisoformat(text)  # a date without a time is a whole day
        except ValueError:
            return parse_time(datetime.fromisoformat(text), end=end, name=name)
        return parse_time(day, end=end, name=name)
    except ValueError:
        raise ValueError(
            f"{name} {value!r} is not a date: use YYYY-MM-DD, YYYY-MM or an ISO 8601 time such as 2026-11-01T09:00Z"
        ) from None


def month_window(now: datetime | None = None) -> tuple[datetime, datetime]:
    """The current calendar month (UTC) as ``[start, end)``: what unset times mean."""
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    first = today.replace(day=1)
    return _midnight(first), _midnight(_next_month(first))


def window(
    since: UsageTime | None, until: UsageTime | None, *, names: tuple[str, str] = ("since", "until")
) -> tuple[datetime, datetime]:
    """The range a query covers, unset bounds filled with the current month (UTC).

    Raises:
        ValueError: A bound is not a date, or the range is empty.
    """
    month_start, month_end = month_window()
    start = parse_time(since, name=names[0]) if since is not None else month_start
    end = parse_time(until, end=True, name=names[1]) if until is not None else month_end
    if end <= start:
        first = _given(since) if since is not None else f"unset: this month, from {month_start:%Y-%m-%d}"
        last = _given(until) if until is not None else f"unset: this month, to {month_end - timedelta(days=1):%Y-%m-%d}"
        raise ValueError(f"{names[1]} ({last}) is not after {names[0]} ({first}): the range is empty")
    return start, end


def dimensions(by: str | Iterable[str], name: str = "by") -> list[str]:
    """The grouping as dimension names, in order, without repeats; a string is comma-separated.

    Raises:
        ValueError: An unknown dimension; the message lists the known ones.
    """
    items = by.split(",") if isinstance(by, str) else list(by)
    out: list[str] = []
    for item in items:
        dim = item.strip().lower()
        if not dim:
            continue
        if dim not in DIMENSIONS:
            raise ValueError(f"{name}: unknown dimension {item!r}; use {', '.join(DIMENSIONS)}")
        if dim not in out:
            out.append(dim)
    return out


def build_request(
    since: UsageTime | None, until: UsageTime | None, by: Sequence[str], tenant: str | None
) -> pb.GetUsageRequest:
    """The GetUsage request; unset bounds stay unset (the gateway's clock picks the month).

    Raises:
        ValueError: A bad bound, an empty range or an unknown dimension.
    """
    window(since, until)  # checked here: one clear error instead of the server's
    request = pb.GetUsageRequest(group_by=[DIMENSIONS[d] for d in dimensions(by)], tenant=tenant or "")
    if since is not None:
        request.start_time.FromDatetime(parse_time(since))
    if until is not None:
        request.end_time.FromDatetime(parse_time(until, end=True, name="until"))
    return request


def rows(response: pb.GetUsageResponse, by: Sequence[str]) -> list[UsageRow]:
    """The response's rows, with None for every dimension not grouped by."""
    dims = set(dimensions(by))

    def pick(name: str, value: str) -> str | None:
        return value if name in dims else None

    return [
        UsageRow(
            tenant=pick("tenant", r.tenant),
            provider=pick("provider", r.provider),
            model=pick("model", r.model),
            day=date.fromisoformat(r.day) if "day" in dims and r.day else None,
            requests=r.requests,
            failed_requests=r.failed_requests,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            cost_usd=r.cost_usd,
        )
        for r in response.rows
    ]


def total(items: Iterable[UsageRow]) -> UsageRow:
    """Every row summed into one (no dimensions)."""
    requests = failed = prompt = completion = 0
    cost = 0.0
    for r in items:
        requests += r.requests
        failed += r.failed_requests
        prompt += r.prompt_tokens
        completion += r.completion_tokens
        cost += r.cost_usd
    return UsageRow(
        requests=requests,
        failed_requests=failed,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=cost,
    )


def daily_cost(items: Iterable[UsageRow]) -> dict[str, dict[date, float]]:
    """Cost per provider per day, summed over any other dimension (rows grouped by day and provider).

    Raises:
        ValueError: A row has no day or no provider (it was not grouped by both).
    """
    out: dict[str, dict[date, float]] = {}
    for r in items:
        if r.day is None or r.provider is None:
            raise ValueError("daily cost needs rows grouped by day and provider")
        per_day = out.setdefault(r.provider, {})
        per_day[r.day] = per_day.get(r.day, 0.0) + r.cost_usd
    return out


def describe(start: datetime, end: datetime) -> str:
    """A range for people: ``2026-11-01 to 2026-11-30`` (whole days, both included), else the
    times (``2026-11-25 00:00 to 2026-11-26 06:00``, the end exclusive)."""
    if start.time() == end.time() == datetime.min.time():
        last = (end - timedelta(days=1)).date()
        return start.date().isoformat() if last == start.date() else f"{start.date()} to {last}"
    return f"{_show(start)} to {_show(end)}"


def _given(value: UsageTime) -> str:
    return value.isoformat() if isinstance(value, date) else value


def _show(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S" if t.second or t.microsecond else "%Y-%m-%d %H:%M")


def _midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def _next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)
