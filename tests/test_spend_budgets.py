"""Budgets on both real engines: provider budgets from the ledger, tenant reserve/settle, outages,
and two gateway processes racing for one tenant's budget."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.spend import Budgets, SqlLedger
from service.spend.engine import engine_for_url
from service.spend.gpu import GpuMeter
from tests.test_spend_support import NOW, call, new_ledger, set_pg_down

pytest_plugins = ("tests.test_spend_support",)  # fixtures: ledger_url (each engine), ledger, pg_url

ROOT = Path(__file__).resolve().parent.parent
DECEMBER = datetime(2026, 12, 1, tzinfo=UTC)


def budgets(led: SqlLedger, **kwargs: object) -> Budgets:
    kwargs.setdefault("clock", lambda: NOW)
    return Budgets(led, **kwargs)  # type: ignore[arg-type]


# -- providers ---------------------------------------------------------------------------------


async def test_a_provider_at_its_budget_is_exhausted_counting_queued_records(ledger: SqlLedger) -> None:
    b = budgets(ledger, provider_limits_usd={"modal": 1.0, "anthropic": 0.0}, commit_cost_usd=lambda p: 0.1)
    ledger.record(call("acme", "modal", cost=0.85))
    assert not b.provider_exhausted("modal")  # 0.85 + one idle window (0.10) < 1.00
    ledger.record(call("acme", "modal", cost=0.05))
    assert b.provider_exhausted("modal")  # 0.90 + 0.10: waking it would reach the budget
    assert await ledger.flush()
    assert b.provider_exhausted("modal")  # committed now, still counted
    ledger.record(call("acme", "anthropic", cost=1e6))
    assert not b.provider_exhausted("anthropic")  # 0 = no limit
    assert not b.provider_exhausted("vastai")  # no budget at all
    status = b.provider_status("modal")
    assert (status.limit_usd, round(status.spent_usd, 6), status.exhausted) == (1.0, 0.9, True)
    assert status.resets_at == DECEMBER
    assert "provider:modal" in status.description and "2026-12-01T00:00:00Z" in status.description


async def test_gpu_idle_time_counts_toward_the_providers_budget(
    ledger: SqlLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The meter dates its records by the wall clock; the ledger counts the month of the tests' NOW.
    # Pin the wall clock to NOW while the meter takes its offset, or this test fails in any other month.
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: NOW.timestamp())
        meter = GpuMeter("modal", 3.6, 60.0, ledger.record, clock=lambda: 0.0)  # $0.001 a second
    b = budgets(ledger, provider_limits_usd={"modal": 0.07}, commit_cost_usd=lambda p: 0.0)
    meter.finish(meter.start(0.0), 10.0)  # the call's own $0.010 goes on its record, not booked here
    meter.poll(70.0)  # the tail: $0.060, booked by the meter to the provider
    assert ledger.provider_spend_estimate("modal") == pytest.approx(0.060)
    ledger.record(call("acme", "modal", cost=0.010))
    assert b.provider_exhausted("modal")


async def test_other_gateways_spend_arrives_at_the_next_refresh(ledger_url: str) -> None:
    mine = new_ledger(ledger_url, refresh_interval_s=0.0)
    theirs = new_ledger(ledger_url)
    await mine.open()
    await theirs.open()
    b = budgets(mine, provider_limits_usd={"anthropic": 1.0})
    theirs.record(call("acme", "anthropic", cost=0.7))
    mine.record(call("zeta", "anthropic", cost=0.2))
    assert await theirs.flush()
    assert mine.provider_spend_estimate("anthropic") == pytest.approx(0.2)
    assert await mine.flush()  # commits ours, then re-reads every gateway's
    assert mine.provider_spend_estimate("anthropic") == pytest.approx(0.9)
    theirs.record(call("acme", "anthropic", cost=0.1))
    assert await theirs.flush() and await mine.flush()
    assert b.provider_exhausted("anthropic")
    await mine.close()
    await theirs.close()


async def test_provider_spend_starts_again_in_a_new_month(ledger_url: str) -> None:
    now = [NOW]
    led = SqlLedger(engine_for_url(ledger_url), flush_interval_s=0.05, refresh_interval_s=0.0, clock=lambda: now[0])
    await led.open()
    led.record(call("acme", "modal", cost=0.5))
    assert await led.flush()
    assert led.provider_spend_estimate("modal") == pytest.approx(0.5)
    now[0] = DECEMBER
    assert led.provider_spend_estimate("modal") == 0.0
    await led.close()


# -- tenants -----------------------------------------------------------------------------------


async def test_reserve_settle_and_exhaustion(ledger: SqlLedger) -> None:
    b = budgets(ledger, tenant_limits_usd={"acme": 1.0})
    first = await b.reserve("acme", 0.6)
    assert first is not None and first.limited and first.durable and first.month == "2026-11"
    assert await b.reserve("acme", 0.5) is None  # 0.6 held + 0.5 > 1.0
    refused = await b.tenant_status("acme")
    assert (refused.spent_usd, refused.reserved_usd, refused.resets_at) == (0.0, 0.6, DECEMBER)
    b.settle(first, 0.2)
    b.settle(first, 0.2)  # settling twice settles once
    assert await ledger.flush()
    status = await b.tenant_status("acme")
    assert (status.spent_usd, status.reserved_usd, status.exhausted) == (pytest.approx(0.2), 0.0, False)
    second = await b.reserve("acme", 0.8)
    assert second is not None  # 0.2 spent + 0.8 = 1.0: exactly fits
    assert await b.reserve("acme", 0.001) is None
    assert (await b.tenant_status("acme")).exhausted
    assert "tenant:acme" in status.subject and "monthly_budget_usd" in status.description


async def test_a_budget_fills_exactly_with_many_small_reservations(ledger: SqlLedger) -> None:
    b = budgets(ledger, tenant_limits_usd={"acme": 1.0})
    held = [await b.reserve("acme", 0.01) for _ in range(101)]
    assert sum(r is not None for r in held) == 100  # float sums do not refuse the 100th cent


async def test_tenants_without_a_budget_are_never_refused_and_still_booked(ledger: SqlLedger) -> None:
    b = budgets(ledger, tenant_limits_usd={"acme": 1.0})
    free = await b.reserve("zeta", 1e9)
    assert free is not None and not free.limited
    b.settle(free, 0.25)
    assert await ledger.flush()
    status = await b.tenant_status("zeta")
    assert (status.limit_usd, status.spent_usd, status.exhausted) == (None, 0.25, False)
    b.set_tenant_limits({"zeta": 0.25})  # a policy reload: this month's spend already counts
    assert await b.reserve("zeta", 0.01) is None


async def test_reservations_hold_in_process_while_the_database_is_down(pg_url: str) -> None:
    led = new_ledger(pg_url)
    await led.open()
    b = budgets(led, tenant_limits_usd={"acme": 1.0})
    first = await b.reserve("acme", 0.5)
    assert first is not None and first.durable
    set_pg_down(pg_url, True)
    try:
        local = await b.reserve("acme", 0.3)  # never fails a call: held here against what we knew
        assert local is not None and not local.durable
        assert await b.reserve("acme", 0.3) is None  # 0.5 + 0.3 + 0.3 > 1.0, even offline
        b.settle(first, 0.4)
        b.settle(local, 0.3)
        assert not await led.flush()
    finally:
        set_pg_down(pg_url, False)
    for _ in range(600):  # the writer's retries reach the database again
        if await led.flush():
            break
        await asyncio.sleep(0.05)
    status = await b.tenant_status("acme")
    assert (status.spent_usd, status.reserved_usd) == (pytest.approx(0.7), 0.0)
    await led.close()


# -- two gateways racing -----------------------------------------------------------------------

LIMIT_USD = 5.0
AMOUNT_USD = 0.01
TASKS = 16


async def _race(url: str, start_at: float) -> dict[str, float]:
    """One gateway: TASKS concurrent callers reserve AMOUNT_USD each until refused, then settle."""
    led = SqlLedger(engine_for_url(url), flush_interval_s=0.05)
    await led.open()
    b = Budgets(led, tenant_limits_usd={"acme": LIMIT_USD})
    await asyncio.sleep(max(start_at - time.time(), 0))
    granted = []

    async def caller() -> None:
        while (res := await b.reserve("acme", AMOUNT_USD)) is not None:
            granted.append(res)
            await asyncio.sleep(0)

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(TASKS)))
    elapsed = time.perf_counter() - began
    for res in granted:
        b.settle(res, res.amount_usd)
    await led.close()
    return {"granted": len(granted), "elapsed_s": elapsed, "durable": all(r.durable for r in granted)}


def _race_processes(url: str, tmp_path: Path) -> list[dict[str, float]]:
    start_at = time.time() + 3.0  # both open their ledger first, then start together
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.test_spend_budgets", "race", url, str(start_at)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("engine", ["postgresql", "sqlite"])
async def test_two_gateways_racing_never_spend_past_a_budget(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue("pg_url") if engine == "postgresql" else f"sqlite:///{tmp_path}/shared.sqlite3"
    results = await asyncio.to_thread(_race_processes, url, tmp_path)
    granted = [int(r["granted"]) for r in results]
    print(f"\n{engine}: reservations granted per gateway {granted}; race took {[r['elapsed_s'] for r in results]} s")
    assert all(r["durable"] for r in results)
    assert sum(granted) == round(LIMIT_USD / AMOUNT_USD)  # never more; and none refused early
    assert min(granted) > 0, granted  # both really raced
    led = SqlLedger(engine_for_url(url))
    await led.open()
    month = datetime.now(UTC).strftime("%Y-%m")
    counter = (await led.engine.counters("tenant", month))["acme"]
    assert counter.spent_usd == pytest.approx(LIMIT_USD) and counter.reserved_usd == pytest.approx(0.0, abs=1e-9)
    await led.close()


if __name__ == "__main__":
    if sys.argv[1] == "race":
        print(json.dumps(asyncio.run(_race(sys.argv[2], float(sys.argv[3])))))
