"""The ledger on both real engines: migrations, batches, grouping, bounds, outages, shutdown."""

from __future__ import annotations

import asyncio
import math
import shutil
import sqlite3
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from service.spend import SqlLedger, UsageRecord, UsageRow
from service.spend.engine import Batch, CounterDelta, engine_for_url, redact_url
from service.spend.ledger import LedgerUnavailableError
from service.spend.records import to_row
from tests.test_spend_support import DAY, NOW, call, new_ledger, pg_admin, set_pg_down

pytest_plugins = ("tests.test_spend_support",)  # fixtures: ledger_url (each engine), ledger, pg_url

WIDE = (NOW - 400 * DAY, NOW + 400 * DAY)


async def count(led: SqlLedger) -> int:
    (row,) = await led.usage(*WIDE)
    return row.requests


async def wait_until_written(led: SqlLedger, timeout_s: float = 30.0) -> None:
    """Waits for the writer to empty the queue (a behaviour about time: generous bound)."""
    for _ in range(int(timeout_s / 0.05)):
        if not led.state().queue_depth:
            break
        await asyncio.sleep(0.05)
    assert led.state().queue_depth == 0, led.state()


def schema_versions(url: str) -> list[int]:
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return [v for (v,) in conn.execute("SELECT version FROM spend_schema ORDER BY version")]
    with pg_admin(url.rsplit("/", 1)[1]) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM spend_schema ORDER BY version").fetchall()]


async def test_migrations_apply_once_however_many_gateways_start(ledger_url: str) -> None:
    first, second = new_ledger(ledger_url), new_ledger(ledger_url)
    await asyncio.gather(first.open(), second.open())  # two replicas starting together
    assert first.state().ok and second.state().ok, (first.state(), second.state())
    await asyncio.gather(first.close(), second.close())
    third = new_ledger(ledger_url)
    await third.open()
    await third.close()
    assert schema_versions(ledger_url) == [1]


async def test_sqlite_default_creates_its_folder_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / ".state" / "ledger.sqlite3"
    led = new_ledger(f"sqlite:///{path}")
    await led.open()
    led.record(call())
    assert await led.flush()
    await led.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_usage_grouped_by_each_dimension(ledger: SqlLedger) -> None:
    day1, day2 = NOW - 2 * DAY, NOW - DAY
    for rec in [
        call("acme", "anthropic", cost=0.010, at=day1, prompt=100, completion=10),
        call("acme", "anthropic", cost=0.020, at=day2, prompt=200, completion=20),
        call("acme", "modal", cost=0.001, at=day2, model="qwen", prompt=300, completion=30),
        call("zeta", "modal", cost=0.002, at=day2, model="qwen", status=14, prompt=0, completion=0),
        UsageRecord(
            time=day2,
            tenant="",
            request_id="",
            rpc="idle",
            provider="modal",
            served_model="qwen",
            duration_s=300,
            cost_usd=0.0667,
            kind="idle",
        ),
        call("acme", "anthropic", cost=5.0, at=NOW + 20 * DAY),  # December: outside November
    ]:
        ledger.record(rec)
    assert await ledger.flush()

    (total,) = await ledger.usage()  # default: this month (November 2026), one row
    assert (total.requests, total.failed_requests, total.prompt_tokens, total.completion_tokens) == (4, 1, 600, 60)
    assert total.cost_usd == pytest.approx(0.0997)
    (since_october,) = await ledger.usage(NOW - 40 * DAY)  # an unset end is the end of this month
    assert since_october == total

    by_tenant = await ledger.usage(group_by=["tenant"])
    assert [(r.tenant, r.requests, round(r.cost_usd, 6)) for r in by_tenant] == [
        ("", 0, 0.0667),  # the GPU's idle time: the provider's, no tenant's
        ("acme", 3, 0.031),
        ("zeta", 1, 0.002),
    ]
    by_provider_day = await ledger.usage(group_by=["provider", "day"])
    assert [(r.provider, r.day, r.requests, r.failed_requests, round(r.cost_usd, 6)) for r in by_provider_day] == [
        ("anthropic", "2026-11-15", 1, 0, 0.01),
        ("anthropic", "2026-11-16", 1, 0, 0.02),
        ("modal", "2026-11-16", 2, 1, 0.0697),
    ]
    assert all(r.tenant == "" and r.model == "" for r in by_provider_day)  # not grouped: empty
    by_model = await ledger.usage(group_by=["model", "model"])
    assert [r.model for r in by_model] == ["claude-sonnet-4-6", "qwen"]
    only_zeta = await ledger.usage(group_by=["tenant"], tenant="zeta")
    assert only_zeta == [UsageRow(tenant="zeta", requests=1, failed_requests=1, cost_usd=0.002)]
    december = await ledger.usage(NOW + 14 * DAY, NOW + 45 * DAY, ["day"])
    assert [(r.day, r.cost_usd) for r in december] == [("2026-12-07", 5.0)]
    assert await ledger.usage(NOW + 100 * DAY, NOW + 101 * DAY, ["tenant"]) == []
    assert await ledger.usage(NOW + 100 * DAY, NOW + 101 * DAY) == [UsageRow()]

    assert await ledger.month_spend() == pytest.approx(0.0997)
    assert await ledger.month_spend(provider="modal") == pytest.approx(0.0697)
    assert await ledger.month_spend(tenant="acme") == pytest.approx(0.031)
    assert await ledger.month_spend(provider="modal", tenant="acme") == pytest.approx(0.001)

    with pytest.raises(ValueError, match="unknown usage dimension"):
        await ledger.usage(group_by=["colour"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="must be after"):
        await ledger.usage(NOW, NOW - DAY)


async def test_a_batch_sent_again_after_a_lost_commit_reply_changes_nothing(ledger_url: str) -> None:
    led = new_ledger(ledger_url)
    await led.open()
    batch = Batch("b1", [to_row(call(cost=0.5))], [CounterDelta("provider", "anthropic", "2026-11", spent_usd=0.5)])
    assert await led.engine.write(batch) is True
    assert await led.engine.write(batch) is False  # same id: already committed
    assert await count(led) == 1
    assert (await led.engine.counters("provider", "2026-11"))["anthropic"].spent_usd == 0.5
    await led.close()


async def test_odd_values_never_block_a_batch(ledger: SqlLedger) -> None:
    ledger.record(
        call(
            "ac\x00me",
            cost=math.nan,
            prompt=2**70,
            completion=-5,
            tags=tuple((f"k{i}" * 40, "v" * 1000) for i in range(40)),
        )
    )
    ledger.record(call("inf", cost=math.inf))
    ledger.record(call("neg", cost=-3.0, duration_s=-1.0))
    assert await ledger.flush(), ledger.state()
    rows = {r.tenant: r for r in await ledger.usage(group_by=["tenant"])}
    assert set(rows) == {"acme", "inf", "neg"}  # NUL stripped
    assert rows["acme"].prompt_tokens == 2**63 - 1 and rows["acme"].completion_tokens == 0
    assert all(r.cost_usd == 0.0 for r in rows.values())  # NaN, inf, negative: never summed


async def test_a_malformed_record_is_dropped_alone_never_blocking_its_batch(ledger: SqlLedger) -> None:
    ledger.record(call("a"))
    ledger.record(call("b", at="yesterday"))  # type: ignore[arg-type]  # refused by record() itself
    ledger.record(call("c", cost=0.5, attempts=("not an attempt",)))  # refused when its batch is formed
    ledger.record(call("d"))
    assert await ledger.flush(), ledger.state()
    assert [r.tenant for r in await ledger.usage(group_by=["tenant"])] == ["a", "d"]
    assert ledger.state().dropped == 2
    assert ledger.provider_spend_estimate("anthropic") == pytest.approx(0.02)  # c's 0.5 no longer counted


async def test_record_never_raises_and_the_bound_drops_and_counts(ledger_url: str) -> None:
    led = new_ledger(ledger_url, queue_max=10)
    for _ in range(15):
        led.record(call())
    led.record(None)  # type: ignore[arg-type]  # not even this raises
    state = led.state()
    assert (state.queue_depth, state.dropped) == (10, 6)
    await led.open()
    assert await led.flush()
    assert await count(led) == 10 and led.state().written == 10
    await led.close()


async def test_close_writes_everything_queued(ledger_url: str) -> None:
    led = new_ledger(ledger_url, flush_interval_s=60.0)  # the writer would not get to it
    await led.open()
    for i in range(2_500):  # more than two batches
        led.record(call(cost=0.001 * (i % 3)))
    await led.close()
    assert led.state().dropped == 0
    again = new_ledger(ledger_url)
    await again.open()
    assert await count(again) == 2_500
    await again.close()


async def test_the_writer_commits_without_being_asked(ledger: SqlLedger) -> None:
    ledger.record(call())
    await wait_until_written(ledger)
    assert await count(ledger) == 1 and ledger.state().last_flush is not None


async def test_postgres_down_records_wait_in_the_queue_then_arrive(pg_url: str) -> None:
    led = new_ledger(pg_url)
    await led.open()
    led.record(call())
    assert await led.flush()
    set_pg_down(pg_url, True)
    try:
        started = time.perf_counter()
        for _ in range(500):
            led.record(call(cost=0.002))
        assert time.perf_counter() - started < 1.0  # never waits for the database
        assert not await led.flush()
        state = led.state()
        assert not state.ok and state.queue_depth == 500 and state.last_error, state
        with pytest.raises(LedgerUnavailableError):
            await led.usage()
    finally:
        set_pg_down(pg_url, False)
    await wait_until_written(led)  # the pool reconnects; the writer's retry sends the batch
    assert led.state().ok and led.state().dropped == 0
    assert await count(led) == 501
    assert await led.month_spend(provider="anthropic") == pytest.approx(0.01 + 500 * 0.002)
    await led.close()


async def test_postgres_down_at_startup_degrades_instead_of_failing(pg_url: str) -> None:
    set_pg_down(pg_url, True)
    led = new_ledger(pg_url)
    try:
        await led.open()  # does not raise
        assert not led.state().ok and led.state().last_error
        led.record(call())
    finally:
        set_pg_down(pg_url, False)
    await wait_until_written(led)  # migrations first, then the record
    assert await count(led) == 1
    await led.close()


async def test_close_with_the_database_down_reports_what_it_could_not_write(pg_url: str) -> None:
    led = new_ledger(pg_url)
    await led.open()
    set_pg_down(pg_url, True)
    try:
        for _ in range(7):
            led.record(call())
        await led.close(timeout_s=0.5)
        assert led.state().dropped == 7
    finally:
        set_pg_down(pg_url, False)


def _mount_tmpfs(path: Path, size: str) -> None:
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system to fill")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {run.stderr.decode().strip()}")


async def test_full_disk_records_wait_then_arrive_when_space_returns(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount_tmpfs(disk, "256k")
    try:
        led = new_ledger(f"sqlite:///{disk}/ledger.sqlite3", batch_max=50)
        await led.open()
        big = tuple((f"tag{i}", "x" * 256) for i in range(16))  # ~4 KB a record
        for _ in range(400):
            led.record(call(tags=big))
        assert not await led.flush()
        state = led.state()
        assert not state.ok and "full" in state.last_error, state
        assert 0 < state.queue_depth <= 400
        await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,size=16m", str(disk)], check=True)
        await wait_until_written(led)
        assert led.state().ok and await count(led) == 400
        await led.close()
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(disk)], check=False)


def test_urls_choose_the_engine_and_hide_passwords() -> None:
    assert engine_for_url("sqlite:///./.state/ledger.sqlite3").name == "sqlite"
    assert engine_for_url("postgres://u@h/db").name == "postgresql"
    with pytest.raises(ValueError, match="LEDGER_URL"):
        engine_for_url("sqlite://")
    with pytest.raises(ValueError) as info:
        engine_for_url("mysql://root:hunter2@db/x")
    assert "hunter2" not in str(info.value)
    assert redact_url("postgresql://gw:s3cret@db.internal:5433/ledger") == "postgresql://gw:***@db.internal:5433/ledger"
    assert engine_for_url("postgresql://gw:s3cret@db/ledger").location == "postgresql://gw:***@db/ledger"


def test_month_boundaries_are_utc_calendar_months() -> None:
    from service.spend.records import month_key, month_start, next_month_start

    late = datetime.fromisoformat("2026-12-31T23:59:59-02:00")  # already January in UTC
    assert month_key(late) == "2027-01"
    assert month_start(late).isoformat() == "2027-01-01T00:00:00+00:00"
    assert next_month_start(datetime.fromisoformat("2026-12-15T00:00:00+00:00")).isoformat() == (
        "2027-01-01T00:00:00+00:00"
    )
    assert next_month_start(NOW) - timedelta(days=14) == datetime.fromisoformat("2026-11-17T00:00:00+00:00")
