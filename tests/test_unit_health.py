"""Unit tests of the circuit breaker and warmth bookkeeping (a fake clock, no I/O)."""

from __future__ import annotations

from service.routing.health import CircuitBreaker, CircuitState


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
