"""The Modal provider never wakes a cold GPU to learn that it is cold.

Modal's API (the container count) is replaced by a fake stats source; the endpoint is a real
OpenAI-compatible stand-in on 127.0.0.1 that records every request it gets, so "nothing was sent
to the GPU" is checked where it matters.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from inference.v1 import inference_pb2 as pb

from modal_vllm.sdk import FunctionStats
from service.config import Settings
from service.errors import ConfigError
from service.providers.modal import COLD_REASON, ModalProvider, validate_mode
from service.providers.registry import FACTORIES
from tests.conftest import start_gateway, stop_gateway
from tests.routing_helpers import MODAL_MODEL, call, chain_settings
from tests.upstreams import FakeOpenAI, Ok

TOKENS = {"modal_token_id": "ak-test", "modal_token_secret": "as-secret-test-77"}


def modal_settings(modal: FakeOpenAI | None = None, vast: FakeOpenAI | None = None, **overrides: Any) -> Any:
    """Routing-test settings, but with MODAL_VALIDATE_ON_START left at its real default."""
    return chain_settings(modal, vast, **{"modal_validate_on_start": None, **overrides})


class FakeStats:
    """A stand-in for ``Function.get_current_stats()``: a settable container count, recorded calls."""

    def __init__(self, containers: int = 0, backlog: int = 0) -> None:
        self.containers, self.backlog = containers, backlog
        self.error: Exception | None = None
        self.calls: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, app: str, function: str, env: Mapping[str, str]) -> FunctionStats:
        with self._lock:
            self.calls.append((app, function, env["MODAL_TOKEN_ID"]))
            if self.error is not None:
                raise self.error
            return FunctionStats(running_containers=self.containers, backlog=self.backlog)


@pytest.fixture
def modal() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(models=[MODAL_MODEL]).start()
    server.default = Ok(tokens=["m1 ", "m2"])
    yield server
    server.stop()


def _provider(modal: FakeOpenAI, stats: FakeStats, **settings: Any) -> ModalProvider:
    return ModalProvider(modal_settings(modal, **settings), stats_source=stats)


async def test_startup_check_at_zero_containers_sends_nothing_to_the_gpu(modal: FakeOpenAI) -> None:
    stats = FakeStats(containers=0, backlog=2)
    provider = _provider(modal, stats, **TOKENS)
    await provider.start()
    try:
        report = await provider.check_health(2.0)
    finally:
        await provider.aclose()

    assert provider.validate_on_start == "stats"
    assert stats.calls == [("multi-agent-vllm-inference", "serve", "ak-test")]
    assert modal.requests == []
    assert not report.ok and report.reachable is False
    assert report.error.startswith(COLD_REASON) and "2 queued" in report.error


async def test_running_container_is_probed_for_health_and_model(modal: FakeOpenAI) -> None:
    stats = FakeStats(containers=1)
    provider = _provider(modal, stats, **TOKENS)
    await provider.start()
    try:
        report = await provider.check_health(2.0)
    finally:
        await provider.aclose()

    assert report.ok and report.served_models == [MODAL_MODEL]
    assert [r.path for r in modal.requests] == ["/health", "/v1/models"]


async def test_unreadable_stats_are_reported_without_probing(modal: FakeOpenAI) -> None:
    stats = FakeStats()
    stats.error = PermissionError("token as-secret-test-77 refused")
    provider = _provider(modal, stats, **TOKENS)
    await provider.start()
    try:
        report = await provider.check_health(2.0)
    finally:
        await provider.aclose()

    assert not report.ok and report.reachable is False
    assert "not probed" in report.error and "as-secret-test-77" not in report.error
    assert modal.requests == []


async def test_wake_probes_even_when_modal_counts_zero(modal: FakeOpenAI) -> None:
    stats = FakeStats(containers=0)
    provider = _provider(modal, stats, **TOKENS)
    await provider.start()
    try:
        report = await provider.wake(2.0)
    finally:
        await provider.aclose()

    assert report.ok and [r.path for r in modal.requests] == ["/health", "/v1/models"]


async def test_validate_off_asks_nothing_at_startup_then_probes_without_tokens(modal: FakeOpenAI) -> None:
    stats = FakeStats(containers=1)
    provider = _provider(modal, stats)
    await provider.start()
    try:
        first = await provider.check_health(2.0)
        assert provider.validate_on_start == "off"
        assert not first.ok and first.reachable is False and "MODAL_VALIDATE_ON_START=off" in first.error
        assert modal.requests == [] and stats.calls == []
        # Later checks come only from traffic-driven probes and wake-ups: without a token they probe.
        assert (await provider.check_health(2.0)).ok
    finally:
        await provider.aclose()
    assert stats.calls == []


async def test_validate_probe_wakes_at_startup_then_uses_stats(modal: FakeOpenAI) -> None:
    stats = FakeStats(containers=0)
    provider = ModalProvider(modal_settings(modal, **TOKENS), stats_source=stats, validate_on_start="probe")
    await provider.start()
    try:
        assert (await provider.check_health(2.0)).ok
        assert stats.calls == [] and len(modal.requests) == 2
        later = await provider.check_health(2.0)
    finally:
        await provider.aclose()
    assert later.error.startswith(COLD_REASON) and len(modal.requests) == 2


def test_validate_mode_defaults_and_errors(modal: FakeOpenAI) -> None:
    assert validate_mode(modal_settings(modal, **TOKENS)) == "stats"
    assert validate_mode(modal_settings(modal)) == "off"
    assert validate_mode(modal_settings(modal, modal_validate_on_start="probe")) == "probe"
    assert Settings.from_env({"MODAL_VALIDATE_ON_START": " Probe "}).modal_validate_on_start == "probe"
    with pytest.raises(
        ConfigError, match=r"MODAL_VALIDATE_ON_START=stats .* needs MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
    ):
        Settings.from_env({"MODAL_VALIDATE_ON_START": "stats"})
    with pytest.raises(ConfigError, match="MODAL_VALIDATE_ON_START='sometimes'"):
        Settings.from_env({"MODAL_VALIDATE_ON_START": "sometimes"})


async def test_failed_url_lookup_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(app: str, function: str, env: Mapping[str, str]) -> str:
        raise RuntimeError(f"UNAUTHENTICATED: token {env['MODAL_TOKEN_SECRET']} is invalid")

    monkeypatch.setattr("modal_vllm.status.modal_sdk_web_url", refuse)
    provider = ModalProvider(modal_settings(modal_model=MODAL_MODEL, **TOKENS), stats_source=FakeStats())
    with pytest.raises(ConfigError) as info:
        await provider.start()
    message = str(info.value)
    assert "set MODAL_WEB_URL" in message and "modal deploy modal_vllm/deployment.py" in message
    assert "as-secret-test-77" not in message


async def _gateway_with_cold_modal(modal: FakeOpenAI, vast: FakeOpenAI, stats: FakeStats) -> Any:
    settings = modal_settings(modal, vast, health_check_timeout_s=2.0, **TOKENS)
    providers = [ModalProvider(settings, stats_source=stats), FACTORIES["vastai"].build(settings)]
    return await start_gateway(settings, providers)


async def test_gateway_start_does_not_wake_a_cold_modal(modal: FakeOpenAI) -> None:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    vast.default = Ok(tokens=["v1 ", "v2"])
    running = await _gateway_with_cold_modal(modal, vast, FakeStats(containers=0))
    try:
        assert modal.requests == []  # today's gateway start woke it with a /health probe
        health = await running.stub.Health(pb.HealthRequest())
        modal_health = next(p for p in health.providers if p.name == "modal")
        assert modal_health.warmth == pb.WARMTH_COLD and COLD_REASON in modal_health.last_error

        outcome = await call(running.stub, "Chat")
        assert outcome.provider == "vastai"  # cold, not broken: served elsewhere at once
        assert modal.chat_requests == []
    finally:
        await stop_gateway(running)
        vast.stop()


async def test_a_wake_up_reaches_a_cold_modal_and_traffic_returns(modal: FakeOpenAI) -> None:
    vast = FakeOpenAI(models=[MODAL_MODEL]).start()
    vast.default = Ok(tokens=["v1 ", "v2"])
    stats = FakeStats(containers=0)
    running = await _gateway_with_cold_modal(modal, vast, stats)
    try:
        assert (await call(running.stub, "Chat")).provider == "vastai"  # starts the one wake-up
        await asyncio.to_thread(modal.wait_for_requests, 1, 3.0, chat_only=False)  # never block the loop
        stats.containers = 1
        for _ in range(50):
            outcome = await call(running.stub, "Chat")
            if outcome.provider == "modal":
                break
            await asyncio.sleep(0.1)
        assert outcome.provider == "modal"
    finally:
        await stop_gateway(running)
        vast.stop()
