"""Usage on demand from the client side (issue 14): ``client.usage(...)`` on both clients and
``python -m clients usage`` (table, JSON, ``--plot``), over a real gateway with a real SQLite ledger.

The gateway serves live calls this month (a priced vast.ai fake and an Anthropic fake, two tenant
keys and an admin key); the previous month holds records written straight into its ledger, so the
figures of that month are exact whatever day the suite runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from inference.v1 import inference_pb2 as pb

from clients import (
    AsyncInferenceClient,
    AuthenticationError,
    InferenceClient,
    PermissionDeniedError,
    UsageRow,
)
from clients.cli import main
from clients.usage import daily_cost, parse_time, total, window
from clients.usage_plot import MISSING, draw
from service.spend.records import UsageRecord
from tests.conftest import RunningGateway, start_gateway, stop_gateway
from tests.fakes import bearer
from tests.routing_helpers import MESSAGES, MODAL_MODEL, chain_settings
from tests.upstreams import FakeAnthropic, FakeOpenAI, Ok

ROOT = Path(__file__).resolve().parent.parent
ADMIN, ACME, BIG = "tok-ops-0123456789ab", "tok-acme-0123456789a", "tok-big-0123456789ab"
HAIKU = "claude-haiku-4-5"


@dataclass
class World:
    running: RunningGateway
    today: date
    prev: date  # the first day of the previous month, which holds the seeded records

    @property
    def prev_month(self) -> str:
        return f"{self.prev:%Y-%m}"


def _first_of_previous_month(today: date) -> date:
    return (today.replace(day=1) - timedelta(days=1)).replace(day=1)


def _at(day: date, hour: int = 10) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def _seed(running: RunningGateway, prev: date) -> None:
    ledger = running.gateway.spend.ledger
    d1, d3 = prev + timedelta(days=1), prev + timedelta(days=3)
    for rec in (
        UsageRecord(_at(d1), "acme", "s1", provider="vastai", served_model=MODAL_MODEL, prompt_tokens=1200,
                    completion_tokens=3400, cost_usd=1.5),
        UsageRecord(_at(d1, 11), "acme", "s2", provider="vastai", served_model=MODAL_MODEL, prompt_tokens=800,
                    completion_tokens=600, cost_usd=0.5, status_code=14),
        UsageRecord(_at(d3), "big", "s3", provider="anthropic", served_model=HAIKU, prompt_tokens=50000,
                    completion_tokens=20000, cost_usd=0.15),
        UsageRecord(_at(d3, 12), "", "", provider="vastai", served_model=MODAL_MODEL, cost_usd=0.25, kind="idle",
                    rpc="idle"),
        # The month before: outside every range the tests ask for.
        UsageRecord(_at(prev - timedelta(days=1)), "acme", "s0", provider="vastai", cost_usd=100.0),
    ):  # fmt: skip
        ledger.record(rec)


@pytest_asyncio.fixture(scope="module")
async def world() -> AsyncIterator[World]:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    vast.default = Ok(tokens=["a ", "b"])
    anth = FakeAnthropic()
    anth.start()
    settings = chain_settings(
        None,
        vast,
        anth,
        vastai_price_per_hour=3600.0,  # a dollar a second: every vast.ai call costs something
        anthropic_model=HAIKU,
        inference_api_keys=f"acme:{ACME},big:{BIG}",
        admin_api_keys=f"ops:{ADMIN}",
    )
    running = await start_gateway(settings)
    try:
        today = datetime.now(UTC).date()
        assert (await running.stub.Chat(pb.ChatRequest(messages=MESSAGES), metadata=bearer(ACME))).provider == "vastai"
        answer = await running.stub.Chat(pb.ChatRequest(messages=MESSAGES, model=HAIKU), metadata=bearer(BIG))
        assert answer.provider == "anthropic"
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.Chat(pb.ChatRequest(messages=MESSAGES, temperature=5), metadata=bearer(BIG))
        prev = _first_of_previous_month(today)
        _seed(running, prev)
        assert await running.gateway.spend.ledger.flush()
        yield World(running, today, prev)
    finally:
        await stop_gateway(running)
        vast.stop()
        anth.stop()


async def cli(capsys: pytest.CaptureFixture[str], *argv: str, **env: str) -> tuple[int, str, str]:
    """The CLI in a thread (its blocking client must not stall the gateway's event loop)."""
    code = await asyncio.to_thread(main, list(argv), env)
    out, err = capsys.readouterr()
    return code, out, err


# The library ---------------------------------------------------------------------------------


async def test_this_month_by_default_with_typed_rows(world: World) -> None:
    async with AsyncInferenceClient(world.running.target, api_key=ADMIN) as client:
        rows = await client.usage()

    calls = [r for r in rows if r.requests]
    assert [(r.tenant, r.provider, r.day) for r in calls] == [
        ("acme", "vastai", world.today),
        ("big", "", world.today),  # the invalid call: recorded, failed, served by no provider
        ("big", "anthropic", world.today),
    ]
    acme, refused, big = calls
    assert isinstance(acme, UsageRow) and acme.model is None  # not grouped by model
    assert acme.cost_usd > 0 and acme.completion_tokens > 0 and acme.failed_requests == 0
    assert (refused.requests, refused.failed_requests, refused.cost_usd) == (1, 1, 0)
    assert (big.requests, big.failed_requests) == (1, 0) and big.cost_usd > 0
    assert all(r.day == world.today for r in rows)  # nothing of the seeded months


async def test_ranges_groupings_and_both_clients_agree(world: World) -> None:
    since, until = world.prev, world.today.replace(day=1) - timedelta(days=1)  # the whole previous month
    async with AsyncInferenceClient(world.running.target, api_key=ADMIN) as client:
        by_model = await client.usage(since=since, until=until, by=["provider", "model"])
        one = await client.usage(since=world.prev_month, until=world.prev_month, by=())
        acme_days = await client.usage(since=since, until=until, by="day, tenant", tenant="acme")

    def blocking() -> list[UsageRow]:
        with InferenceClient(world.running.target, api_key=ADMIN) as client:
            return client.usage(since=since, until=until, by=("provider", "model"))

    assert await asyncio.to_thread(blocking) == by_model
    assert [(r.provider, r.model, r.requests, r.cost_usd) for r in by_model] == [
        ("anthropic", HAIKU, 1, pytest.approx(0.15)),
        ("vastai", MODAL_MODEL, 2, pytest.approx(2.25)),  # with the idle time: cost, no request
    ]
    (row,) = one
    assert (row.tenant, row.provider, row.model, row.day) == (None, None, None, None)
    assert row.cost_usd == pytest.approx(total(by_model).cost_usd) == pytest.approx(2.4)
    assert (row.requests, row.failed_requests, row.prompt_tokens, row.completion_tokens) == (3, 1, 52000, 24000)
    assert [(r.day, r.tenant, r.cost_usd) for r in acme_days] == [(world.prev + timedelta(days=1), "acme", 2.0)]


async def test_a_tenant_key_sees_its_own_usage_only(world: World) -> None:
    async with AsyncInferenceClient(world.running.target, api_key=BIG) as client:
        own = await client.usage(by="tenant")
        with pytest.raises(PermissionDeniedError):
            await client.usage(tenant="acme")
    async with AsyncInferenceClient(world.running.target, api_key="") as client:
        with pytest.raises(AuthenticationError):
            await client.usage()
    assert [(r.tenant, r.requests, r.failed_requests) for r in own] == [("big", 2, 1)]


async def test_bad_arguments_fail_before_any_call() -> None:
    async with AsyncInferenceClient("127.0.0.1:1", api_key=ADMIN) as client:  # nothing listens there
        with pytest.raises(ValueError, match=r"^since '2026-02-30' is not a date"):
            await client.usage(since="2026-02-30")
        with pytest.raises(ValueError, match=r"^until \(2026-10-31\) is not after since \(2026-11-01\)"):
            await client.usage(since="2026-11-01", until=date(2026, 10, 31))
        with pytest.raises(ValueError, match="unknown dimension 'week'"):
            await client.usage(by=("day", "week"))
        with pytest.raises(TypeError):
            await client.usage(since=20261101)  # type: ignore[arg-type]


def test_dates_days_and_months_are_utc_and_an_until_day_is_included_whole() -> None:
    assert parse_time("2026-11-05") == datetime(2026, 11, 5, tzinfo=UTC)
    assert parse_time("2026-11-05", end=True) == datetime(2026, 11, 6, tzinfo=UTC)
    assert parse_time("2026-12", end=True) == datetime(2027, 1, 1, tzinfo=UTC)
    assert parse_time(date(2026, 11, 30), end=True) == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_time("2026-11-05T09:30+02:00") == datetime(2026, 11, 5, 7, 30, tzinfo=UTC)
    assert parse_time("2026-11-05T09:30Z", end=True) == datetime(2026, 11, 5, 9, 30, tzinfo=UTC)  # exact: exclusive
    assert parse_time(datetime(2026, 11, 5, 9)) == datetime(2026, 11, 5, 9, tzinfo=UTC)  # naive is UTC
    start, end = window(None, None)
    assert start.day == 1 and end.day == 1 and (end - start).days in (28, 29, 30, 31)


# The command line ----------------------------------------------------------------------------


async def test_the_table_is_aligned_with_a_totals_row(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    d1, d3, last = world.prev + timedelta(days=1), world.prev + timedelta(days=3), world.today.replace(day=1)
    code, out, err = await cli(
        capsys, "usage", "--since", world.prev_month, "--until", world.prev_month, "--target",
        world.running.target, "--api-key", ADMIN,
    )  # fmt: skip
    assert code == 0, err
    assert out == (
        f"usage {world.prev} to {last - timedelta(days=1)} (UTC)\n"
        "tenant  provider   day         requests  failed  prompt_tokens  completion_tokens  cost_usd\n"
        f"-       vastai     {d3}         0       0              0                  0    0.2500\n"
        f"acme    vastai     {d1}         2       1          2,000              4,000    2.0000\n"
        f"big     anthropic  {d3}         1       0         50,000             20,000    0.1500\n"
        f"{'-' * 91}\n"
        "total                                 3       1         52,000             24,000    2.4000\n"
    )

    code, out, err = await cli(
        capsys, "usage", "--by", "", "--tenant", "acme", "--since", str(world.prev), "--until",
        str(last - timedelta(days=1)), "--target", world.running.target, "--api-key", ADMIN,
    )  # fmt: skip
    assert code == 0, err
    header = "       requests  failed  prompt_tokens  completion_tokens  cost_usd"
    assert out.splitlines()[1:] == [
        header,
        "-" * len(header),
        "total         2       1          2,000              4,000    2.0000",
    ]
    assert out.splitlines()[0].endswith("(UTC), tenant acme")


async def test_json_and_an_empty_range(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"INFERENCE_TARGET": world.running.target, "INFERENCE_API_KEY": ADMIN}
    code, out, err = await cli(
        capsys, "usage", "--json", "--by", "provider", "--since", world.prev_month, "--until", world.prev_month, **env
    )
    assert code == 0, err
    assert json.loads(out) == [
        {"tenant": None, "provider": "anthropic", "model": None, "day": None, "requests": 1, "failed_requests": 0,
         "prompt_tokens": 50000, "completion_tokens": 20000, "cost_usd": pytest.approx(0.15)},
        {"tenant": None, "provider": "vastai", "model": None, "day": None, "requests": 2, "failed_requests": 1,
         "prompt_tokens": 2000, "completion_tokens": 4000, "cost_usd": pytest.approx(2.25)},
    ]  # fmt: skip

    code, out, err = await cli(capsys, "usage", "--since", "2020-01", "--until", "2020-01", **env)
    assert (code, out, err) == (0, "usage 2020-01-01 to 2020-01-31 (UTC)\nno usage recorded\n", "")


async def test_plot_draws_daily_cost_per_provider_whatever_by_says(
    world: World, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    png = tmp_path / "usage.png"
    code, out, err = await cli(
        capsys, "usage", "--by", "tenant", "--since", world.prev_month, "--until", world.prev_month, "--plot",
        str(png), "--target", world.running.target, "--api-key", ADMIN,
    )  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[1].split() == "tenant requests failed prompt_tokens completion_tokens cost_usd".split()
    assert err.startswith(f"wrote {png}: daily cost per provider")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 10_000

    # What the file shows, from the same rows: a bar per day of the month per provider.
    async with AsyncInferenceClient(world.running.target, api_key=ADMIN) as client:
        rows = await client.usage(since=world.prev_month, until=world.prev_month, by=("day", "provider"))
    start, end = window(world.prev_month, world.prev_month)
    fig = draw(daily_cost(rows), start, end)
    (ax,) = fig.axes
    days = (end - start).days
    assert fig.get_suptitle() == "Daily cost per provider" and "(UTC) · total $2.40" in ax.get_title()
    assert "USD" in ax.get_ylabel() and "UTC" in ax.get_xlabel()
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["vastai  $2.25", "anthropic  $0.15"]
    heights = [[bar.get_height() for bar in container] for container in ax.containers]
    assert [len(h) for h in heights] == [days, days]
    assert [sum(h) for h in heights] == [pytest.approx(2.25), pytest.approx(0.15)]
    assert heights[0][1] == pytest.approx(2.0) and heights[0][3] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--since", "2026-13-01"], "error: --since '2026-13-01' is not a date: use YYYY-MM-DD, YYYY-MM or an ISO"),
        (["--until", "last week"], "error: --until 'last week' is not a date"),
        (["--since", "2026-11-05", "--until", "2026-11-01"], "error: --until (2026-11-01) is not after --since"),
        (["--until", "2020-01-01"], "error: --until (2020-01-01) is not after --since (unset: this month, from"),
        (["--by", "tenant,week"], "error: --by: unknown dimension 'week'; use tenant, provider, model, day"),
        (["--plot", "usage.txt"], "error: --plot 'usage.txt': end the name with .png, .svg, .pdf or another image"),
        (["--plot", "/no/such/dir/usage.png"], "error: --plot '/no/such/dir/usage.png': no such directory"),
    ],
)
async def test_bad_dates_and_options_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens on port 1 and retries are off: a call would exit 1, so exit 2 means none was made.
    code, out, err = await cli(capsys, "usage", *argv, "--target", "127.0.0.1:1", "--retries", "0")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith(message), err


async def test_plot_without_matplotlib_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib... now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = await cli(
        capsys, "usage", "--plot", str(tmp_path / "u.png"), "--target", "127.0.0.1:1", "--retries", "0"
    )
    assert (code, out, err) == (2, "", f"error: {MISSING}\n")


async def test_python_dash_m_clients_usage(world: World) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients", "usage", "--by", "tenant", "--json",
        cwd=ROOT, env={**clean, "INFERENCE_TARGET": world.running.target, "INFERENCE_API_KEY": ACME},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    (row,) = json.loads(out)
    assert row["tenant"] == "acme" and row["requests"] == 1 and row["cost_usd"] > 0
