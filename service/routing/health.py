"""Per-provider runtime state: health, circuit breaker, warmth, counters, and the health monitor.

The router reads this state to order and skip providers; the Health RPC and grpc.health.v1 report
it. Scale-to-zero providers (Modal) are special in one way: *any* HTTP request, a health probe
included, starts a replica and resets its idle timer. So the monitor probes them only while real
traffic has been seen within the scale-down window; otherwise periodic probes would keep a GPU
running (and billing) forever.

Several replicas (workers, hosts) share part of this state through :class:`SharedHealth` when
``REDIS_URL`` is set (:mod:`service.shared.health`): a circuit one replica opens is open on all of
them, a success anywhere means Modal is warm everywhere, and only the replica holding the wake-up
lease talks to a cold provider while the others wait for its verdict. Reads stay synchronous and
local (a background refresh applies what the others published), so routing never waits on Redis.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import trace

from service.providers.base import HealthReport, Provider

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("service.routing.health")


class HealthState(enum.Enum):
    """Last observed health."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class CircuitState(enum.Enum):
    """Circuit breaker states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Warmth(enum.Enum):
    """Cold-start state of a scale-to-zero provider."""

    NOT_APPLICABLE = "n/a"
    COLD = "cold"
    WARMING = "warming"
    WARM = "warm"


class WakeLease(enum.Enum):
    """What :meth:`SharedHealth.hold_wake` found."""

    HELD = "held"  # this replica holds the lease: it alone talks to the cold provider
    TAKEN = "taken"  # another replica holds it: wait for its verdict
    WARM = "warm"  # another replica found the provider warm (a wake-up ended, or a call was served)


class SharedHealth(Protocol):
    """What replicas tell each other about providers; every method is cheap and never raises
    (publishing runs in the background; a Redis outage leaves each replica with its own view)."""

    def circuit_opened(self, provider: str, cooldown_s: float) -> None:
        """This replica opened the provider's circuit for ``cooldown_s``."""
        ...

    def circuit_closed(self, provider: str) -> None:
        """A call or probe succeeded here: the circuit is closed for everyone."""
        ...

    def served(self, provider: str, window_s: float) -> None:
        """The (scale-to-zero) provider answered here: warm for ``window_s``."""
        ...

    async def hold_wake(self, provider: str, lease_s: float) -> WakeLease:
        """Takes or renews the cluster's one wake-up lease unless the provider is warm, in one
        atomic step (HELD also when the lease cannot be checked: waking twice beats not waking)."""
        ...

    async def release_wake(self, provider: str, warm_for_s: float = 0.0) -> None:
        """Gives the wake-up lease back (the wake-up ended); with ``warm_for_s``, first publishes
        that the provider is warm, so no replica can take the lease and wake it again."""
        ...


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures (or one auth failure); after ``cooldown_s``
    lets exactly one probe call through (half-open); that call's outcome closes or reopens it."""

    def __init__(
        self,
        threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[CircuitState, CircuitState, str], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._opened_at: float | None = None
        self._probe_in_flight = False
        self._probe_claimed_at = 0.0
        self.consecutive_failures = 0
        self.on_transition = on_transition
        # Set when REDIS_URL is: transitions made here are published under ``name``.
        self.shared: SharedHealth | None = None
        self.name = ""
        self._adopted = False  # open because another replica opened it
        self._closed_at = -1e18  # when a success here last closed it

    @property
    def state(self) -> CircuitState:
        """CLOSED, OPEN, or HALF_OPEN once the cooldown has passed."""
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at >= self.cooldown_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    @property
    def retry_at(self) -> float | None:
        """Monotonic time when a probe is allowed, if open."""
        return None if self._opened_at is None else self._opened_at + self.cooldown_s

    def allow(self) -> bool:
        """Whether a call may go to the provider now (claims the half-open probe)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        # A probe claimed but never reported (its call ended first) expires after a cooldown.
        if state is CircuitState.HALF_OPEN and (
            not self._probe_in_flight or self._clock() - self._probe_claimed_at > self.cooldown_s
        ):
            self._probe_in_flight = True
            self._probe_claimed_at = self._clock()
            return True
        return False

    def record_success(self) -> None:
        """Closes the circuit."""
        before = self.state
        self.consecutive_failures = 0
        self._opened_at = None
        self._probe_in_flight = False
        adopted, self._adopted = self._adopted, False
        self._closed_at = self._clock()
        if before is not CircuitState.CLOSED:
            self._notify(before, CircuitState.CLOSED, "success")
            if self.shared is not None and not adopted:
                self.shared.circuit_closed(self.name)

    def record_failure(self, *, force_open: bool = False, reason: str = "") -> None:
        """Counts a failure; opens on the threshold, on a failed probe, or when forced."""
        before = self.state
        self.consecutive_failures += 1
        self._probe_in_flight = False
        if force_open or before is not CircuitState.CLOSED or self.consecutive_failures >= self.threshold:
            self._opened_at = self._clock()
            self._adopted = False
            if before is not CircuitState.OPEN:
                self._notify(before, CircuitState.OPEN, reason)
                if self.shared is not None:
                    self.shared.circuit_opened(self.name, self.cooldown_s)

    def adopt(self, remaining_s: float | None) -> None:
        """Applies another replica's circuit: open for ``remaining_s`` more (None: it closed).

        An adopted circuit half-opens when the opener's cooldown ends, like one opened here; it
        closes at once when the other replica reports a success. Never published back.
        """
        if remaining_s is not None and remaining_s > 0:
            # A read made before our own close was published must not reopen it here.
            if self.state is CircuitState.CLOSED and self._clock() - self._closed_at > 2.0:
                self._opened_at = self._clock() - max(0.0, self.cooldown_s - remaining_s)
                self._adopted = True
                self._notify(CircuitState.CLOSED, CircuitState.OPEN, "opened by another replica")
        elif self._adopted and self._opened_at is not None:
            before = self.state
            self._opened_at = None
            self._adopted = False
            self._probe_in_flight = False
            self.consecutive_failures = 0
            self._notify(before, CircuitState.CLOSED, "closed by another replica")

    def release_probe(self) -> None:
        """Gives back a half-open probe that ended without a verdict (cancelled, caller error)."""
        self._probe_in_flight = False

    def _notify(self, before: CircuitState, after: CircuitState, reason: str) -> None:
        log.warning("circuit %s -> %s (%s)", before.value, after.value, reason)
        if self.on_transition is not None:
            self.on_transition(before, after, reason)


@dataclass
class Counters:
    """Per-provider totals since start."""

    attempts: int = 0
    successes: int = 0
    failures: int = 0
    skips: int = 0


@dataclass
class ProviderSlot:
    """One provider in the chain and everything observed about it."""

    provider: Provider
    position: int
    breaker: CircuitBreaker
    scaledown_window_s: float
    state: HealthState = HealthState.UNKNOWN
    last_check_wall: float | None = None
    last_latency_s: float | None = None
    last_error: str = ""
    served_models: list[str] = field(default_factory=list)
    last_traffic_ok: float | None = None  # monotonic time of the last served call
    last_probe_ok: float | None = None  # monotonic time a probe last found a server answering
    last_reachable: bool = False  # the last probe got an answer (maybe not a healthy one)
    waker: asyncio.Task[None] | None = None
    counters: Counters = field(default_factory=Counters)
    failure_threshold: int = 1  # consecutive failed probes before UNHEALTHY (HEALTH_FAILURE_THRESHOLD)
    consecutive_failures: int = 0  # failed probes in a row
    started: bool = True  # start() succeeded; False while a failed start is retried
    on_change: Callable[[], None] | None = None  # health verdict changed (grpc.health.v1 follows it)
    shared: SharedHealth | None = None  # other replicas' view (REDIS_URL), None when alone
    remote_warm_at: float | None = None  # monotonic time another replica last saw it answer

    def adopt_remote_warmth(self, age_s: float | None) -> None:
        """Another replica saw this provider answer ``age_s`` ago (None: not within the window)."""
        self.remote_warm_at = None if age_s is None else time.monotonic() - age_s

    @property
    def name(self) -> str:
        """The provider's chain name."""
        return self.provider.name

    def warmth(self, now: float | None = None) -> Warmth:
        """WARM while a success happened within the scale-down window; WARMING while waking."""
        if not self.provider.scale_to_zero:
            return Warmth.NOT_APPLICABLE
        if self.waker is not None and not self.waker.done():
            return Warmth.WARMING
        now = time.monotonic() if now is None else now
        last = max(self.last_traffic_ok or -1e18, self.last_probe_ok or -1e18, self.remote_warm_at or -1e18)
        return Warmth.WARM if now - last < self.scaledown_window_s else Warmth.COLD

    def _set_state(self, state: HealthState) -> None:
        if state is not self.state:
            self.state = state
            if self.on_change is not None:
                self.on_change()

    def _failed(self, message: str, *, definitive: bool) -> None:
        """One failed probe; UNHEALTHY after ``failure_threshold`` in a row, at once when definitive."""
        self.consecutive_failures += 1
        self.last_error = message
        if definitive or self.consecutive_failures >= self.failure_threshold:
            self._set_state(HealthState.UNHEALTHY)

    def _succeeded(self) -> None:
        self.consecutive_failures = 0
        self.last_error = ""
        self._set_state(HealthState.HEALTHY)

    def record_report(self, report: HealthReport, *, definitive: bool = False) -> None:
        """Stores a probe's outcome; ``definitive`` (the start-up check) skips the hysteresis."""
        self.last_check_wall = time.time()
        self.last_latency_s = report.latency_s
        if report.served_models:
            self.served_models = report.served_models
        self.last_reachable = bool(report.reachable)
        if report.reachable:
            self.last_probe_ok = time.monotonic()
        if report.ok:
            self._succeeded()
        else:
            self._failed(report.error, definitive=definitive)

    def record_success(self) -> None:
        """A call was served."""
        self.counters.successes += 1
        self.last_traffic_ok = time.monotonic()
        if self.shared is not None and self.provider.scale_to_zero:
            self.shared.served(self.name, self.scaledown_window_s)
        self._succeeded()
        self.breaker.record_success()

    def record_failure(self, message: str, *, force_open: bool, reason: str) -> None:
        """A call failed for a provider reason (not the caller's).

        Calls are judged by the circuit breaker (CIRCUIT_FAILURE_THRESHOLD in a row): the call that
        opens the circuit also makes the provider UNHEALTHY; single failures before that only
        record the error, so one flaky call never moves traffic away (probes have their own
        threshold, HEALTH_FAILURE_THRESHOLD).
        """
        self.counters.failures += 1
        self.last_error = message
        self.breaker.record_failure(force_open=force_open, reason=reason)
        if self.breaker.state is not CircuitState.CLOSED:
            self._set_state(HealthState.UNHEALTHY)

    def servable(self) -> bool:
        """A call could be served by this provider now (or after a cold start it can trigger)."""
        if not self.started or self.breaker.state is CircuitState.OPEN:
            return False
        if self.state is not HealthState.UNHEALTHY:
            return True
        # Asleep, not broken: a scale-to-zero provider that no server answered for can be woken.
        return self.provider.scale_to_zero and not self.last_reachable


class HealthMonitor:
    """Validates providers at startup, then probes them every ``interval_s``."""

    def __init__(
        self,
        slots: list[ProviderSlot],
        interval_s: float,
        timeout_s: float,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.slots = slots
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_change = on_change
        self._task: asyncio.Task[None] | None = None

    async def check(self, slot: ProviderSlot, *, definitive: bool = False, wake: bool = False) -> None:
        """Probes one provider and records the outcome.

        ``wake``: this probe is meant to start a scaled-to-zero provider. A provider that can tell
        its warmth without waking itself (Modal, through its API) has a ``wake(timeout_s)`` for
        that; its ``check_health`` deliberately never starts a container.
        """
        if not slot.started:
            return  # its start-up is being retried; nothing to probe yet
        waker = getattr(slot.provider, "wake", None) if wake else None
        try:
            report = await (waker or slot.provider.check_health)(self.timeout_s)
        except Exception as exc:  # a probe must never kill the monitor
            report = HealthReport(False, 0.0, error=f"probe crashed: {type(exc).__name__}: {exc}")
        before = slot.state
        slot.record_report(report, definitive=definitive)
        if before is not slot.state:
            log.info(
                "provider %s is %s%s", slot.name, slot.state.value, f" ({slot.last_error})" if slot.last_error else ""
            )

    def wake(self, slot: ProviderSlot, timeout_s: float, poll_interval_s: float) -> bool:
        """Starts the one wake-up of a cold provider unless one is running; True if it started."""
        if slot.waker is not None and not slot.waker.done():
            return False
        # A context of its own: the wake-up outlives the call that triggered it, so its events go on
        # its own span, never on that caller's (by then ended) span.
        slot.waker = asyncio.create_task(
            self._wake_loop(slot, timeout_s, poll_interval_s), name=f"wake-{slot.name}", context=contextvars.Context()
        )
        return True

    async def _wake_loop(self, slot: ProviderSlot, timeout_s: float, poll_interval_s: float) -> None:
        with _tracer.start_as_current_span(f"wake_up {slot.name}", attributes={"gateway.provider": slot.name}):
            await self._wake_polls(slot, timeout_s, poll_interval_s)

    async def _wake_polls(self, slot: ProviderSlot, timeout_s: float, poll_interval_s: float) -> None:
        shared = slot.shared
        # Renewed every poll; outlives one probe (on Modal a probe blocks until a replica is up), and
        # expires soon enough that a replica dying mid-wake-up leaves the job to another.
        lease_s = 2 * max(poll_interval_s, self.timeout_s) + 5
        deadline = time.monotonic() + timeout_s
        holding = False
        warm_for_s = 0.0
        try:
            while time.monotonic() < deadline:
                # Warmth and the lease are read in one step: the holder publishes warmth and frees the
                # lease in one step too, so a replica that finds the lease free finds the warmth with it
                # (read apart, a release between the two reads let a second replica wake it again).
                lease = WakeLease.HELD if shared is None else await shared.hold_wake(slot.name, lease_s)
                if lease is WakeLease.WARM:
                    slot.adopt_remote_warmth(0.0)
                    slot._succeeded()
                    slot.breaker.record_success()
                    log.info("provider %s is warm again (woken by another replica)", slot.name)
                    trace.get_current_span().add_event("provider_warm", {"provider": slot.name, "by": "replica"})
                    return
                if lease is WakeLease.TAKEN:
                    # Another replica is waking it: wait for its verdict without touching the provider.
                    await asyncio.sleep(min(poll_interval_s, 0.5))
                    continue
                if not holding and shared is not None:
                    log.info("provider %s: this replica holds the wake-up lease", slot.name)
                holding = True
                # On Modal one probe blocks until a replica is up; a stand-in that refuses
                # connections is polled instead. Either way only this task talks to it.
                await self.check(slot, wake=True)
                if slot.state is HealthState.HEALTHY:
                    slot.breaker.record_success()
                    warm_for_s = slot.scaledown_window_s if slot.provider.scale_to_zero else 0.0
                    log.info("provider %s is warm again", slot.name)
                    trace.get_current_span().add_event("provider_warm", {"provider": slot.name})
                    return
                if slot.last_reachable:
                    log.warning("provider %s is up but unhealthy: %s", slot.name, slot.last_error)
                    return
                await asyncio.sleep(poll_interval_s)
            log.warning("provider %s did not wake within %.0f s", slot.name, timeout_s)
        finally:
            if holding and shared is not None:
                await asyncio.shield(shared.release_wake(slot.name, warm_for_s))

    def should_probe(self, slot: ProviderSlot, now: float) -> bool:
        """Scale-to-zero providers are probed only while traffic keeps them warm anyway."""
        if not slot.provider.scale_to_zero:
            return True
        if slot.warmth(now) is Warmth.WARMING:
            return False
        return slot.last_traffic_ok is not None and now - slot.last_traffic_ok < slot.scaledown_window_s

    async def check_all(self, *, initial: bool = False) -> None:
        """Probes every provider concurrently (at startup, scale-to-zero ones included once)."""
        now = time.monotonic()
        due = [s for s in self.slots if initial or self.should_probe(s, now)]
        await asyncio.gather(*(self.check(s, definitive=initial) for s in due))
        if self.on_change is not None:
            await self.on_change()

    async def _run(self) -> None:
        while True:
            # A little jitter keeps several gateway replicas from probing in lockstep.
            await asyncio.sleep(self.interval_s * random.uniform(0.9, 1.1))
            await self.check_all()

    def start(self) -> None:
        """Starts periodic probing."""
        self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def stop(self) -> None:
        """Stops periodic probing."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
