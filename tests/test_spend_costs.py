"""The cost model against hand-computed cases: token prices, lookups, PRICES_FILE, GPU-hour shares."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.errors import ConfigError
from service.spend import Spend, UsageRecord
from service.spend.costs import CostModel
from service.spend.gpu import GpuMeter
from service.spend.prices import ANTHROPIC_PRICES, PriceTable, TokenPrice

TABLE = PriceTable()


def usd(x: float) -> float:
    return pytest.approx(x, abs=1e-12)  # type: ignore[no-any-return]


# -- per token ---------------------------------------------------------------------------------


def test_sonnet_input_and_output() -> None:
    # 1,000 x $3/M + 500 x $15/M = $0.003 + $0.0075
    price, key = TABLE.token_price("claude-sonnet-4-6")
    assert key == "claude-sonnet-4-6"
    assert price.cost_usd(1_000, 500) == usd(0.0105)


def test_cache_reads_and_writes_have_their_own_prices() -> None:
    # 200 x 3 + 10,000 x 0.30 + 2,000 x 3.75 + 300 x 15 = 15,600 micro-dollars
    price, _ = TABLE.token_price("claude-sonnet-4-6")
    assert price.cost_usd(200, 300, cache_read_tokens=10_000, cache_write_tokens=2_000) == usd(0.0156)


def test_long_prompt_tier_prices_every_token_of_the_request() -> None:
    price, _ = TABLE.token_price("claude-haiku-5-5")
    # at the threshold: 100,000 x 0.10 + 1,000 x 0.50 = 10,500 micro-dollars
    assert price.cost_usd(100_000, 1_000) == usd(0.0105)
    # one token over: 100,001 x 0.50 + 1,000 x 2.50 = 52,500.5
    assert price.cost_usd(100_001, 1_000) == usd(0.0525005)
    # cache reads count toward the threshold: 60,000 x 0.50 + 50,000 x 0.05 = 32,500
    assert price.cost_usd(60_000, 0, cache_read_tokens=50_000) == usd(0.0325)


def test_missing_cache_prices_follow_anthropics_multipliers() -> None:
    price = TokenPrice(2.0, 8.0)
    # reads 0.1 x input, writes 1.25 x input: 1M x 0.2 + 1M x 2.5
    assert price.cost_usd(0, 0, cache_read_tokens=1_000_000, cache_write_tokens=1_000_000) == usd(2.7)


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-opus-4-6[1m]", "claude-opus-4-6"),
        ("claude-opus-4@20250514", "claude-opus-4"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-opus-4-9", "family:opus"),  # not claude-opus-4 ($15/$75): a newer opus
        ("claude-fable-5-2", "family:fable"),
        ("claude-mythos-preview", "family:mythos"),
        ("some-other-model", "most-expensive"),
    ],
)
def test_lookup_by_id_dated_id_family_then_most_expensive(model: str, key: str) -> None:
    assert TABLE.token_price(model)[1] == key


def test_unknown_models_are_overestimated_never_free() -> None:
    unknown, _ = TABLE.token_price("gpt-something")
    assert unknown.output == max(p.output for p in ANTHROPIC_PRICES.values()) == 75.0
    opus, _ = TABLE.token_price("claude-opus-4-9")
    assert (opus.input, opus.output) == (5.0, 25.0)


# -- PRICES_FILE -------------------------------------------------------------------------------


def test_prices_file_overrides_and_adds(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        """
[anthropic."claude-sonnet-4-6"]
input = 2.5
output = 12.0

[anthropic."claude-new-1"]
input = 1.0
output = 4.0
cache_read = 0.05
cache_write = 1.5
long_prompt = { threshold_tokens = 1000, input = 2.0, output = 8.0 }

[gpu_usd_per_hour]
l4 = 0.85
T4 = 0.59
"""
    )
    table = PriceTable.from_file(path)
    sonnet, _ = table.token_price("claude-sonnet-4-6")
    assert sonnet.cost_usd(1_000_000, 1_000_000) == usd(14.5)
    new, key = table.token_price("claude-new-1-20261201")
    assert key == "claude-new-1"
    assert new.cost_usd(1_000, 1_000) == usd(0.005)  # 1,000 x 1 + 1,000 x 4 (at the threshold)
    assert new.cost_usd(1_001, 1_000) == usd(0.010002)  # long: 1,001 x 2 + 1,000 x 8
    assert table.gpu_price("L4") == 0.85 and table.gpu_price("t4") == 0.59
    assert table.gpu_price("H100") == 4.50  # untouched entries stay
    assert TABLE.token_price("claude-sonnet-4-6")[0].input == 3.0  # the built-in table is not modified


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[anthropic."m"]\ninput = -1\noutput = 1\n', "anthropic.m.input"),
        ('[anthropic."m"]\ninput = 1\n', "anthropic.m.output"),
        ('[anthropic."m"]\ninput = 1\noutput = 1\nspeed = 2\n', "anthropic.m.speed"),
        ("[gpu_usd_per_hour]\nL4 = 0\n", "gpu_usd_per_hour.L4"),
        ("[tokens]\n", "tokens"),
        ("this is = not toml = at all", "not TOML"),
    ],
)
def test_prices_file_errors_name_the_file_and_the_entry(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        PriceTable.from_file(path)
    assert str(path) in str(info.value) and says in str(info.value)


def test_missing_prices_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PRICES_FILE"):
        PriceTable.from_file(tmp_path / "absent.toml")


# -- per GPU hour ------------------------------------------------------------------------------

RATE = 3.6  # USD per hour = $0.001 per second: a charge in dollars reads as milli-seconds of GPU


def meter(window_s: float = 60.0) -> tuple[GpuMeter, list[UsageRecord]]:
    booked: list[UsageRecord] = []
    return GpuMeter("modal", RATE, window_s, booked.append, model="qwen", clock=lambda: 0.0), booked


def test_overlapping_calls_share_the_overlap() -> None:
    m, idle = meter()
    a = m.start(0.0)
    b = m.start(5.0)
    # A: 5 s alone + 5 s shared by two = 7.5 s; B: 5 s shared + 5 s alone = 7.5 s
    assert m.finish(a, 10.0) == usd(0.0075)
    assert m.finish(b, 15.0) == usd(0.0075)
    m.poll(74.9)
    assert idle == []  # still inside the 60 s scale-down window
    m.poll(75.0)
    assert [(r.kind, r.tenant, r.duration_s, r.cost_usd) for r in idle] == [("idle", "", 60.0, usd(0.060))]
    assert idle[0].provider == "modal" and idle[0].served_model == "qwen"
    assert not m.up  # the container scaled down: the next call is a cold start


def test_three_calls_split_by_calls_in_flight() -> None:
    m, _ = meter()
    a, b = m.start(0.0), m.start(3.0)
    c = m.start(6.0)
    # 0-3 A alone; 3-6 A,B halves; 6-9 A,B,C thirds; 9-12 A,C halves
    assert m.finish(b, 9.0) == usd(0.0025)  # 1.5 + 1
    assert m.finish(a, 12.0) == usd(0.007)  # 3 + 1.5 + 1 + 1.5
    assert m.finish(c, 12.0) == usd(0.0025)  # 1 + 1.5


def test_gap_between_calls_is_idle_and_the_tail_is_booked_at_shutdown() -> None:
    m, idle = meter()
    assert m.finish(m.start(0.0), 10.0) == usd(0.010)
    c = m.start(40.0)  # 30 s idle, shorter than the window: the container stayed up
    assert [(r.duration_s, r.cost_usd) for r in idle] == [(30.0, usd(0.030))]
    assert m.finish(c, 50.0) == usd(0.010)
    m.close(55.0)  # the provider bills the rest of the window whether or not we are running
    assert [r.duration_s for r in idle] == [30.0, 60.0]
    # everything adds up to the container's uptime, 0..110 s
    assert 0.010 + 0.010 + sum(r.cost_usd for r in idle) == usd(0.110)


def test_a_call_after_the_window_starts_a_new_container() -> None:
    m, idle = meter()
    m.finish(m.start(0.0), 10.0)
    c = m.start(200.0)  # the tail (10..70) is booked now; 70..200 nothing was billed
    assert [r.duration_s for r in idle] == [60.0]
    assert m.finish(c, 204.0) == usd(0.004)


def test_wake_up_without_a_call_bills_from_the_wake() -> None:
    m, idle = meter()
    m.wake(0.0)
    c = m.start(20.0)
    assert [r.duration_s for r in idle] == [20.0]  # boot and wait, booked to the provider
    assert m.finish(c, 30.0) == usd(0.010)


def test_always_on_host_books_busy_time_only() -> None:
    m, idle = meter(window_s=0.0)
    assert m.finish(m.start(0.0), 10.0) == usd(0.010)
    m.poll(1_000.0)
    m.close(2_000.0)
    assert idle == []


def test_finish_twice_charges_once() -> None:
    m, _ = meter()
    t = m.start(0.0)
    assert m.finish(t, 1.0) == usd(0.001)
    assert m.finish(t, 2.0) == 0.0


calls = st.lists(
    st.tuples(st.integers(0, 400), st.integers(0, 50)),  # (start, duration) in seconds
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(calls=calls, window=st.sampled_from([0.0, 7.0, 60.0]), polls=st.lists(st.integers(0, 600), max_size=5))
def test_charges_plus_idle_equal_the_containers_uptime(
    calls: list[tuple[int, int]], window: float, polls: list[int]
) -> None:
    """Whatever the traffic, a month's records add up to what the provider bills."""
    m, idle = meter(window)
    events: list[tuple[float, int, str, int]] = []  # (time, order, kind, call index)
    for i, (start, duration) in enumerate(calls):
        events.append((float(start), 0, "start", i))  # at equal times starts first: a call may last 0 s
        events.append((float(start + duration), 1, "end", i))
    events += [(float(t), 2, "poll", -1) for t in polls]
    tickets = {}
    charged = 0.0
    for t, _, kind, i in sorted(events):
        if kind == "start":
            tickets[i] = m.start(t)
        elif kind == "end":
            charged += m.finish(tickets[i], t)
        else:
            m.poll(t)
    m.close(1_000.0)
    # uptime: the union of [start, end + window] over the calls
    spans = sorted((float(s), float(s + d) + window) for s, d in calls)
    uptime, (lo, hi) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s <= hi:
            hi = max(hi, e)
        else:
            uptime, lo, hi = uptime + hi - lo, s, e
    uptime += hi - lo
    assert charged + sum(r.cost_usd for r in idle) == pytest.approx(uptime * RATE / 3600, abs=1e-9)


# -- the cost model ----------------------------------------------------------------------------


def test_costs_by_provider_kind() -> None:
    booked: list[UsageRecord] = []
    costs = CostModel(meters={"modal": GpuMeter("modal", 0.80, 300, booked.append)})
    assert costs.start("local").finish("smollm2", prompt_tokens=10_000, completion_tokens=10_000) == 0.0
    assert costs.start("anthropic").finish("claude-sonnet-4-6", prompt_tokens=1_000, completion_tokens=500) == usd(
        0.0105
    )
    gpu = costs.start("modal", now=0.0)
    assert gpu.finish("qwen", prompt_tokens=99, completion_tokens=99, now=36.0) == usd(0.008)  # 36 s at $0.80/h


def test_the_most_a_call_may_cost() -> None:
    costs = CostModel(meters={"modal": GpuMeter("modal", 0.80, 300, lambda r: None)})
    # 1,000 x 3 + 512 x 15 micro-dollars
    assert costs.max_cost_usd("anthropic", "claude-sonnet-4-6", 1_000, 512, 120.0) == usd(0.01068)
    assert costs.max_cost_usd("modal", "qwen", 1_000, 512, 120.0) == usd(0.8 * 120 / 3600)
    assert costs.max_cost_usd("local", "smollm2", 1_000, 512, 120.0) == 0.0
    worst = costs.worst_case_usd([("modal", "qwen"), ("anthropic", "claude-opus-4-1")], 1_000, 512, 120.0)
    assert worst == usd(0.0534)  # opus 4.1: 1,000 x 15 + 512 x 75
    assert costs.wake_cost_usd("modal") == usd(0.8 * 300 / 3600) and costs.wake_cost_usd("anthropic") == 0.0


# -- settings ----------------------------------------------------------------------------------


def test_settings_defaults_and_spend_from_settings() -> None:
    s = Settings()
    assert s.ledger_url == "sqlite:///./.state/ledger.sqlite3" and s.ledger_flush_interval_ms == 200
    assert s.modal_monthly_budget_usd == 30.0 and s.anthropic_monthly_budget_usd == 0.0
    spend = Spend.from_settings(s.replace(ledger_url="sqlite:///:memory:"))
    modal = spend.costs.meters["modal"]
    assert (modal.usd_per_hour, modal.idle_window_s) == (0.80, 300.0)  # L4 from modal_vllm.pricing, 5 min
    assert "vastai" not in spend.costs.meters  # not priced: its calls cost 0
    assert spend.ledger.flush_interval_s == 0.2


def test_spend_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="LEDGER_URL"):
        Settings.from_env({"LEDGER_URL": "mysql://db"})
    with pytest.raises(ConfigError, match="MODAL_GPU_TYPE=T4 has no built-in price"):
        Settings.from_env({"MODAL_GPU_TYPE": "t4"})
    with pytest.raises(ConfigError, match="MODAL_MONTHLY_BUDGET_USD"):
        Settings.from_env({"MODAL_MONTHLY_BUDGET_USD": "-1"})
    s = Settings.from_env({"MODAL_GPU_TYPE": "t4", "MODAL_GPU_PRICE_PER_HOUR": "0.59", "VASTAI_PRICE_PER_HOUR": "0.4"})
    spend = Spend.from_settings(s.replace(ledger_url="sqlite:///:memory:"))
    assert spend.costs.meters["modal"].usd_per_hour == 0.59
    assert spend.costs.meters["vastai"].idle_window_s == 0.0


def test_prices_file_gpu_price_reaches_the_modal_meter(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text("[gpu_usd_per_hour]\nT4 = 0.59\n")
    s = Settings.from_env({"MODAL_GPU_TYPE": "T4", "PRICES_FILE": str(path), "LEDGER_URL": "sqlite:///:memory:"})
    assert Spend.from_settings(s).costs.meters["modal"].usd_per_hour == 0.59


def test_the_worked_example_of_docs_cost_md() -> None:
    """docs/cost.md's morning, to the cent: if this changes, the document must too."""
    booked: list[UsageRecord] = []
    costs = CostModel(meters={"modal": GpuMeter("modal", 0.80, 300, booked.append)})
    a = costs.start("modal", now=0.0)  # 09:00:00, cold: the container boots inside A's call
    cost_a = a.finish("qwen", now=40.0)
    b = costs.start("modal", now=60.0)  # 20 s idle since A: booked to modal, no tenant
    c = costs.start("modal", now=70.0)
    cost_b = b.finish("qwen", now=90.0)
    cost_c = c.finish("qwen", now=100.0)
    costs.meters["modal"].poll(400.0)  # 09:06:40: the 5-minute window has passed
    cost_d = costs.start("anthropic").finish(
        "claude-sonnet-4-6", prompt_tokens=1_200, completion_tokens=350, cache_read_tokens=8_000
    )
    assert [round(x, 6) for x in (cost_a, cost_b, cost_c, cost_d)] == [0.008889, 0.004444, 0.004444, 0.01125]
    assert [(r.duration_s, round(r.cost_usd, 6)) for r in booked] == [(20.0, 0.004444), (300.0, 0.066667)]
    modal = cost_a + cost_b + cost_c + sum(r.cost_usd for r in booked)
    assert modal == pytest.approx(400 * 0.80 / 3600)  # 09:00:00 to 09:06:40 of an L4
    worst = costs.worst_case_usd([("modal", "qwen"), ("anthropic", "claude-sonnet-4-6")], 1_200, 512, 120.0)
    assert round(worst, 6) == 0.026667  # 120 s of the L4 beats 1,200 + 512 tokens of Sonnet ($0.01128)
    assert round(costs.wake_cost_usd("modal"), 6) == 0.066667
