"""Spend in the request path (issue 14): every call on the ledger, GetUsage, budgets that routing obeys,
Health showing the month's spend. Real gateway, real SQLite ledger, scripted upstreams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inference.v1 import inference_pb2 as pb

from tests.conftest import start_gateway, stop_gateway
from tests.fakes import bearer
from tests.routing_helpers import MESSAGES, MODAL_MODEL, chain_settings
from tests.upstreams import FakeAnthropic, FakeOpenAI, Ok

# A dollar a second: any call costs far more than the tiny budgets below.
PRICE_PER_HOUR = 3600.0


def details(exc: grpc.aio.AioRpcError) -> dict[str, Any]:
    status = rpc_status.from_call(exc)
    assert status is not None
    out: dict[str, Any] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                out[kind.DESCRIPTOR.name] = message
    return out


async def test_every_call_is_on_the_ledger_and_get_usage_sums_it() -> None:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    vast.default = Ok(tokens=["a ", "b"])
    running = await start_gateway(chain_settings(None, vast, vastai_price_per_hour=PRICE_PER_HOUR))
    try:
        call = running.stub.Chat(
            pb.ChatRequest(messages=MESSAGES, metadata={"team": "billing"}), metadata=(("x-request-id", "req-42"),)
        )
        await call
        assert dict(await call.trailing_metadata())["x-request-id"] == "req-42"  # echoed
        generated = running.stub.Chat(pb.ChatRequest(messages=MESSAGES))
        await generated
        assert dict(await generated.trailing_metadata())["x-request-id"]  # made when the caller sent none
        async for _ in running.stub.ChatStream(pb.ChatStreamRequest(messages=MESSAGES)):
            pass
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.Chat(pb.ChatRequest(messages=MESSAGES, temperature=5))
        assert await running.gateway.spend.ledger.flush()

        by_provider = await running.stub.GetUsage(pb.GetUsageRequest(group_by=[pb.USAGE_DIMENSION_PROVIDER]))
        vast_row = next(r for r in by_provider.rows if r.provider == "vastai")
        assert vast_row.requests == 3 and vast_row.completion_tokens > 0 and vast_row.cost_usd > 0
        everything = await running.stub.GetUsage(pb.GetUsageRequest())
        (row,) = everything.rows
        assert row.requests == 4 and row.failed_requests == 1  # the invalid call is recorded, as failed
        by_day = await running.stub.GetUsage(
            pb.GetUsageRequest(group_by=[pb.USAGE_DIMENSION_TENANT, pb.USAGE_DIMENSION_DAY])
        )
        assert [(r.tenant, len(r.day)) for r in by_day.rows] == [("anonymous", 10)]

        health = await running.stub.Health(pb.HealthRequest())
        assert health.ledger.state == "ok" and health.ledger.engine == "sqlite" and health.ledger.dropped == 0
        assert health.providers[0].month_spend_usd > 0 and not health.providers[0].HasField("monthly_budget_usd")
    finally:
        await stop_gateway(running)
        vast.stop()


async def test_a_provider_at_its_budget_is_skipped_then_the_call_is_resource_exhausted() -> None:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    anth = FakeAnthropic()
    anth.start()
    settings = chain_settings(None, vast, anth, vastai_price_per_hour=PRICE_PER_HOUR, vastai_monthly_budget_usd=0.0001)
    running = await start_gateway(settings)
    try:
        first = await running.stub.Chat(pb.ChatRequest(messages=MESSAGES))
        assert first.provider == "vastai"
        second = await running.stub.Chat(pb.ChatRequest(messages=MESSAGES))
        assert second.provider == "anthropic" and [a.provider for a in second.attempts] == ["anthropic"]
        health = await running.stub.Health(pb.HealthRequest())
        vast_health = next(p for p in health.providers if p.name == "vastai")
        assert vast_health.budget_exhausted and vast_health.monthly_budget_usd == pytest.approx(0.0001)
        assert vast_health.month_spend_usd >= 0.0001
    finally:
        await stop_gateway(running)

    running = await start_gateway(
        chain_settings(None, vast, vastai_price_per_hour=PRICE_PER_HOUR, vastai_monthly_budget_usd=0.0001)
    )
    try:
        # The ledger is fresh for this gateway: one call spends the budget, the next has nowhere to go.
        await running.stub.Chat(pb.ChatRequest(messages=MESSAGES))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Chat(pb.ChatRequest(messages=MESSAGES))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        found = details(info.value)
        assert found["ErrorInfo"].reason == "BUDGET_EXHAUSTED"
        (violation,) = found["QuotaFailure"].violations
        assert violation.subject == "provider:vastai" and violation.quota_id == "monthly_budget_usd"
        assert found["RetryInfo"].retry_delay.seconds > 0  # until the month resets
    finally:
        await stop_gateway(running)
        vast.stop()
        anth.stop()


TENANTS = """
[tenants.acme]
monthly_budget_usd = 0.000001

[tenants.big]
monthly_budget_usd = 1000
"""


async def test_tenant_budgets_and_who_may_read_usage(tmp_path: Path) -> None:
    anth = FakeAnthropic()
    anth.start()
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS)
    settings = chain_settings(
        None,
        None,
        anth,
        tenants_file=str(tenants),
        inference_api_keys="acme:tok-acme-123456,big:tok-big-1234567",
        admin_api_keys="ops:tok-ops-1234567",
        anthropic_model="claude-haiku-4-5",
    )
    running = await start_gateway(settings)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.Chat(
                pb.ChatRequest(messages=MESSAGES, max_tokens=200), metadata=bearer("tok-acme-123456")
            )
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        (violation,) = details(info.value)["QuotaFailure"].violations
        assert violation.subject == "tenant:acme" and violation.quota_id == "monthly_budget_usd"
        assert anth.chat_requests == []  # refused before any provider was asked

        answer = await running.stub.Chat(pb.ChatRequest(messages=MESSAGES), metadata=bearer("tok-big-1234567"))
        assert answer.provider == "anthropic"
        assert await running.gateway.spend.ledger.flush()

        own = await running.stub.GetUsage(
            pb.GetUsageRequest(group_by=[pb.USAGE_DIMENSION_TENANT]), metadata=bearer("tok-big-1234567")
        )
        assert [r.tenant for r in own.rows] == ["big"] and own.rows[0].cost_usd > 0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.GetUsage(pb.GetUsageRequest(tenant="acme"), metadata=bearer("tok-big-1234567"))
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        everyone = await running.stub.GetUsage(
            pb.GetUsageRequest(group_by=[pb.USAGE_DIMENSION_TENANT]), metadata=bearer("tok-ops-1234567")
        )
        assert sorted(r.tenant for r in everyone.rows) == ["acme", "big"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.GetUsage(pb.GetUsageRequest(group_by=[0]), metadata=bearer("tok-ops-1234567"))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        long_ago = pb.GetUsageRequest()
        long_ago.end_time.FromSeconds(86_400)  # 1970: before the default start (this month)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.GetUsage(long_ago, metadata=bearer("tok-ops-1234567"))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # not UNKNOWN
    finally:
        await stop_gateway(running)
        anth.stop()


async def test_cost_and_ledger_metrics() -> None:
    from tests.otel_memory import delta, install_metrics, snapshot, unit

    reader = install_metrics()
    if reader is None:
        pytest.skip("another test installed a MeterProvider first")
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    running = await start_gateway(chain_settings(None, vast, vastai_price_per_hour=PRICE_PER_HOUR))
    try:
        before = snapshot(reader)
        await running.stub.Chat(pb.ChatRequest(messages=MESSAGES))
        after = snapshot(reader)
        cost = delta(before, after, "gateway.cost", **{"gen_ai.provider.name": "vastai", "gateway.tenant": "anonymous"})
        assert cost.value > 0 and unit(after, "gateway.cost") == "USD"
        assert any(name == "gateway.ledger.dropped" for name, _ in after)
    finally:
        await stop_gateway(running)
        vast.stop()
