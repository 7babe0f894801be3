"""Fixtures and helpers of the spend tests (no tests here): both ledger engines, for real.

SQLite: a file in the test's temporary folder. PostgreSQL: a database of its own on the server at
``SPEND_TEST_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``, the test
machines' server), created for the test and dropped after it; the PostgreSQL half skips, saying
so, only when no server answers there.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import pytest_asyncio

from service.spend import SqlLedger, UsageRecord
from service.spend.engine import engine_for_url
from service.spend.records import Attempt

PG_ADMIN_URL = os.environ.get("SPEND_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
NOW = datetime(2026, 11, 17, 12, 0, tzinfo=UTC)  # the tests' "now": mid-November 2026


def pg_url_for(database: str) -> str:
    """The admin URL pointed at another database."""
    return urlunsplit(urlsplit(PG_ADMIN_URL)._replace(path=f"/{database}"))


def pg_admin(database: str = "") -> psycopg.Connection:
    """An autocommit connection to the test server (skips the test when none answers)."""
    url = pg_url_for(database) if database else PG_ADMIN_URL
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(
            f"PostgreSQL not reachable at {PG_ADMIN_URL} ({str(exc).strip()}): the PostgreSQL half of the "
            "spend tests needs a server (the test machines run one; SPEND_TEST_PG_URL points elsewhere)"
        )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped after it."""
    name = f"spend_test_{uuid.uuid4().hex[:12]}"
    with pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_url_for(name)
    finally:
        with pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def set_pg_down(url: str, down: bool) -> None:
    """Takes a test database down for the gateway (refuses connections, ends the open ones), or
    brings it back: what a database restart or outage looks like from the ledger."""
    name = urlsplit(url).path.lstrip("/")
    with pg_admin() as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if down else "true"}')
        if down:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """LEDGER_URL of each engine in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state/ledger.sqlite3"
    url: str = request.getfixturevalue("pg_url")
    return url


def new_ledger(url: str, *, now: datetime = NOW, **kwargs: object) -> SqlLedger:
    """A ledger on ``url`` whose clock says ``now`` (fast flushes unless told)."""
    kwargs.setdefault("flush_interval_s", 0.05)
    return SqlLedger(engine_for_url(url), clock=lambda: now, **kwargs)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def ledger(ledger_url: str) -> AsyncIterator[SqlLedger]:
    """An open ledger on each engine, closed after the test."""
    led = new_ledger(ledger_url)
    await led.open()
    yield led
    await led.close(timeout_s=2)


def call(
    tenant: str = "acme",
    provider: str = "anthropic",
    *,
    cost: float = 0.01,
    at: datetime = NOW,
    model: str = "claude-sonnet-4-6",
    prompt: int = 100,
    completion: int = 50,
    status: int = 0,
    **kwargs: object,
) -> UsageRecord:
    """A call's record with the fields reports group by."""
    fields: dict[str, object] = {
        "duration_s": 0.8,
        "ttft_s": 0.2,
        "attempts": (Attempt(provider, "ok" if status == 0 else "PROVIDER_UNAVAILABLE"),),
    } | kwargs
    return UsageRecord(
        time=at,
        tenant=tenant,
        request_id=uuid.uuid4().hex[:16],
        trace_id="0af7651916cd43dd8448eb211c80319c",
        rpc="Chat",
        model=model,
        served_model=model,
        provider=provider,
        prompt_tokens=prompt,
        completion_tokens=completion,
        status_code=status,
        cost_usd=cost,
        **fields,  # type: ignore[arg-type]
    )


DAY = timedelta(days=1)
