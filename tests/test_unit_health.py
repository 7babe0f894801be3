"""Unit tests of the circuit breaker and warmth bookkeeping (a fake clock, no I/O)."""

from __future__ import annotations

from service.providers.base import HealthReport
from service.routing.health import CircuitBreaker, CircuitState, HealthState, ProviderSlot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_then_allows_one_probe() -> None:
    clock = Clock()
    transitions: list[tuple[str, str]] = []
    cb = CircuitBreaker(3, 10.0, clock, on_transition=lambda a, b, r: transitions.append((a.value, b.value)))
    for _ in range(2):
        cb.record_failure()
    assert cb.state is CircuitState.CLOSED and cb.allow()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN and not cb.allow()
    clock.now += 10
    assert cb.state is CircuitState.HALF_OPEN
    assert cb.allow() and not cb.allow()  # exactly one probe
    cb.record_failure()
    assert cb.state is CircuitState.OPEN  # a failed probe reopens at once
    clock.now += 10
    assert cb.allow()
    cb.record_success()
    assert cb.state is CircuitState.CLOSED and cb.consecutive_failures == 0
    assert transitions == [("closed", "open"), ("half_open", "open"), ("half_open", "closed")]


def test_auth_failure_opens_immediately() -> None:
    cb = CircuitBreaker(5, 1.0, Clock())
    cb.record_failure(force_open=True)
    assert cb.state is CircuitState.OPEN


def test_abandoned_probe_expires() -> None:
    clock = Clock()
    cb = CircuitBreaker(1, 5.0, clock)
    cb.record_failure()
    clock.now += 5
    assert cb.allow() and not cb.allow()
    clock.now += 6  # the probe's call ended without a verdict
    assert cb.allow()


def test_success_resets_the_count() -> None:
    cb = CircuitBreaker(2, 1.0, Clock())
    cb.record_failure()
    cb.record_success()
    cb.record_failure()
    assert cb.state is CircuitState.CLOSED


class _Stub:
    name = "vastai"
    scale_to_zero = False
    image_input = True


def _slot(threshold: int) -> ProviderSlot:
    return ProviderSlot(_Stub(), 0, CircuitBreaker(5, 30), 300.0, failure_threshold=threshold)  # type: ignore[arg-type]


def test_one_failed_probe_is_not_a_verdict() -> None:
    slot = _slot(2)
    slot.record_report(HealthReport(True, 0.01))
    slot.record_report(HealthReport(False, 0.01, error="timed out"))
    assert slot.state is HealthState.HEALTHY and slot.last_error == "timed out"
    slot.record_report(HealthReport(False, 0.01, error="timed out"))
    assert slot.state is HealthState.UNHEALTHY
    slot.record_report(HealthReport(True, 0.01))
    assert slot.state is HealthState.HEALTHY and slot.consecutive_failures == 0


def test_the_start_up_check_is_a_verdict_at_once() -> None:
    slot = _slot(2)
    slot.record_report(HealthReport(False, 0.01, error="401"), definitive=True)
    assert slot.state is HealthState.UNHEALTHY


def test_a_call_that_opens_the_circuit_makes_it_unhealthy_and_tells() -> None:
    slot, changes = _slot(2), []
    slot.on_change = lambda: changes.append(slot.state)
    slot.record_success()
    slot.record_failure("refused credentials", force_open=True, reason="PROVIDER_AUTH")
    assert slot.state is HealthState.UNHEALTHY and not slot.servable()
    assert changes == [HealthState.HEALTHY, HealthState.UNHEALTHY]
