"""kill -9 of a gateway process: what the ledger had committed survives; the loss window, measured.

The child process records a burst of N calls through the real writer, says when, then keeps
recording one "tick" record every few milliseconds until it is killed with SIGKILL. Afterwards
the burst must be complete, and the newest tick that made it to disk tells how much was lost:
``loss window = kill time - time of the newest durable tick`` (records made in that window died
with the process). The design bound is one flush interval plus a commit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.spend import SqlLedger, UsageRecord
from service.spend.engine import engine_for_url
from tests.test_spend_support import pg_admin

pytest_plugins = ("tests.test_spend_support",)  # fixture: pg_url

ROOT = Path(__file__).resolve().parent.parent
BURST = 500  # fewer than a batch: the burst waits for the flush interval, the worst case
INTERVAL_MS = 200  # the default LEDGER_FLUSH_INTERVAL_MS
TICK_S = 0.005


def _record(tenant: str, i: int) -> UsageRecord:
    return UsageRecord(
        time=datetime.now(UTC),
        tenant=tenant,
        request_id=f"{tenant}-{i}",
        rpc="Chat",
        provider="anthropic",
        served_model="claude-sonnet-4-6",
        prompt_tokens=120,
        completion_tokens=40,
        duration_s=0.5,
        cost_usd=0.00096,
        id=uuid.uuid4().hex,
    )


async def _child(url: str) -> None:
    led = SqlLedger(engine_for_url(url), flush_interval_s=INTERVAL_MS / 1000)
    await led.open()
    for i in range(BURST):
        led.record(_record("burst", i))
    print(f"burst {time.time()!r}", flush=True)
    tick = 0
    while True:  # until SIGKILL
        led.record(_record("tick", tick))
        tick += 1
        await asyncio.sleep(TICK_S)


def _durable(url: str) -> tuple[int, float]:
    """(burst records present, wall time of the newest tick present)."""
    sql = "SELECT COUNT(*) FILTER (WHERE tenant = 'burst'), MAX(ts) FILTER (WHERE tenant = 'tick') FROM usage_records"
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            n, newest = conn.execute(sql).fetchone()
        return n, newest or 0.0
    with pg_admin(url.rsplit("/", 1)[1]) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0], row[1].timestamp() if row[1] else 0.0


def _kill_after(url: str, delay_s: float) -> tuple[int, float]:
    """Runs the child, kills it ``delay_s`` after its burst; (burst present, loss window in s)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_spend_crash", url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("burst "), (line, proc.stderr.read() if proc.poll() is not None else "")
        burst_at = float(line.split()[1])
        time.sleep(max(burst_at + delay_s - time.time(), 0))
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    present, newest_tick = _durable(url)
    return present, killed_at - newest_tick


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_kill_9_loses_at_most_the_last_flush_interval(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    windows = []
    pg = request.getfixturevalue("pg_url") if engine == "postgresql" else ""
    for run, delay_s in enumerate([1.0, 1.0, 1.0, INTERVAL_MS / 1000 * 2, INTERVAL_MS / 1000 * 2]):
        url = pg or f"sqlite:///{tmp_path}/run{run}/ledger.sqlite3"
        if pg:
            await asyncio.to_thread(_truncate, pg)
        present, window = await asyncio.to_thread(_kill_after, url, delay_s)
        assert present == BURST, f"kill -9 {delay_s} s after {BURST} records: only {present} were durable"
        windows.append(window)
    print(f"\n{engine}: loss window after kill -9 (s): {', '.join(f'{w:.3f}' for w in windows)}")
    # A behaviour about time, so a generous bound: the design's is one interval plus a commit.
    assert max(windows) < 5 * INTERVAL_MS / 1000, windows


def _truncate(url: str) -> None:
    with pg_admin(url.rsplit("/", 1)[1]) as conn:
        if conn.execute("SELECT to_regclass('usage_records')").fetchone() != (None,):
            conn.execute("TRUNCATE usage_records")


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1]))
