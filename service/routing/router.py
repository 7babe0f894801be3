"""Routing: provider order, skips, retries, fallback, cold starts, and the first-token rule.

One mechanism serves both RPCs. For each call the router builds a *plan* (the chain minus
providers skipped for an open circuit, bad health, or a cold start under the ``fallback``
policy; when that leaves nothing, the whole chain is tried as a last resort). It then walks the
plan, retrying retryable errors with jittered exponential backoff while the caller's deadline
allows, and falling back to the next provider otherwise. The first token is the point of no
return: before it every failure is invisible to the caller; after it the stream ends with
:class:`StreamInterruptedError`, because splicing another model's text onto a partial answer
would corrupt it silently.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from service.config import Settings
from service.errors import (
    AllProvidersFailedError,
    DeadlineExceededError,
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    ProviderAuthError,
    ProviderError,
    ProviderModelNotFoundError,
    ProviderProtocolError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    StreamInterruptedError,
)
from service.observe.telemetry import AttemptSpan, RouteTrace, RpcStats, current_rpc
from service.providers.base import ChatRequest, ChatResult, Provider, StreamEnd, StreamItem
from service.routing.health import CircuitBreaker, CircuitState, HealthMonitor, HealthState, ProviderSlot, Warmth

log = logging.getLogger(__name__)

T = TypeVar("T")

# A timeout this close to the caller's deadline is the deadline's doing.
_DEADLINE_SLACK_S = 0.01


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of one provider: ``error`` is None for the one that served the call."""

    provider: str
    error: GatewayError | None
    duration_s: float


@dataclass(frozen=True, slots=True)
class Routed:
    """A served unary call."""

    result: ChatResult
    provider: str
    attempts: tuple[Attempt, ...]


@dataclass(frozen=True, slots=True)
class RoutedEnd:
    """The last item of a routed stream."""

    end: StreamEnd
    provider: str
    attempts: tuple[Attempt, ...]


@dataclass(frozen=True, slots=True)
class _Step:
    slot: ProviderSlot
    wait_cold: bool  # the provider is cold and this call waits for it to start


class Router:
    """Sends each call along the provider chain."""

    def __init__(self, providers: Sequence[Provider], settings: Settings) -> None:
        if not providers:
            raise ValueError("the provider chain is empty")
        self.settings = settings
        window_s = settings.modal_scaledown_window_minutes * 60
        self.slots = [
            ProviderSlot(
                p, i, CircuitBreaker(settings.circuit_failure_threshold, settings.circuit_cooldown_s), window_s
            )
            for i, p in enumerate(providers)
        ]
        self.monitor = HealthMonitor(self.slots, settings.health_check_interval_s, settings.health_check_timeout_s)
        for slot in self.slots:
            slot.breaker.on_transition = self._circuit_logger(slot)

    @staticmethod
    def _circuit_logger(slot: ProviderSlot):  # type: ignore[no-untyped-def]
        def note(before, after, reason):  # type: ignore[no-untyped-def]
            RouteTrace.note_circuit(slot.name, before.value, after.value, reason)

        return note

    async def start(self) -> None:
        """Starts every provider, validates them once, then starts the monitor."""
        for slot in self.slots:
            await slot.provider.start()
        await self.monitor.check_all(initial=True)
        for slot in self.slots:
            log.info(
                "provider %d %s (%s) at %s model=%s: %s%s",
                slot.position,
                slot.name,
                slot.provider.kind,
                slot.provider.endpoint,
                slot.provider.default_model,
                slot.state.value,
                f" ({slot.last_error})" if slot.last_error else "",
            )
        self.monitor.start()

    async def aclose(self) -> None:
        """Stops the monitor, wake-ups and providers."""
        await self.monitor.stop()
        for slot in self.slots:
            if slot.waker is not None:
                slot.waker.cancel()
        for slot in self.slots:
            await slot.provider.aclose()

    def serving(self) -> bool:
        """At least one provider is not known to be down."""
        return any(s.state is not HealthState.UNHEALTHY or s.provider.scale_to_zero for s in self.slots)

    # ---- planning -------------------------------------------------------------------------

    def _plan(self, policy: str, trace: RouteTrace) -> list[_Step]:
        now = time.monotonic()
        steps: list[_Step] = []
        skipped: list[ProviderSlot] = []
        n = len(self.slots)
        for i, slot in enumerate(self.slots):
            reason = ""
            others = n - 1 - i > 0 or bool(steps)
            warmth = slot.warmth(now)
            if slot.breaker.state is not CircuitState.CLOSED:
                if slot.breaker.allow():  # half-open: this call is the probe, whatever the health says
                    steps.append(_Step(slot, wait_cold=False))
                    continue
                reason = "circuit_open"
            elif slot.state is HealthState.UNHEALTHY and warmth in (Warmth.NOT_APPLICABLE, Warmth.WARM):
                reason = "unhealthy"  # up but failing: waiting for a cold start will not cure it
            elif warmth in (Warmth.COLD, Warmth.WARMING):
                if policy == "wait" or not others:
                    steps.append(_Step(slot, wait_cold=True))
                    continue
                reason = "cold" if warmth is Warmth.COLD else "warming"
                self._wake(slot, trace)
            if reason:
                slot.counters.skips += 1
                skipped.append(slot)
                trace.skip(slot.name, reason)
                continue
            steps.append(_Step(slot, wait_cold=False))
        if not steps:
            # Everything looks down: try it all anyway rather than fail without asking.
            steps = [_Step(s, wait_cold=s.warmth(now) in (Warmth.COLD, Warmth.WARMING)) for s in skipped]
            trace.event("last_resort", providers=[s.name for s in skipped])
        return steps

    def _wake(self, slot: ProviderSlot, trace: RouteTrace) -> None:
        """Starts one wake-up for a cold provider, shared by every caller that finds it cold."""
        if self.monitor.wake(slot, self.settings.cold_start_timeout_s, self.settings.wake_poll_interval_s):
            trace.event("wake_up", provider=slot.name)

    # ---- attempts -------------------------------------------------------------------------

    def _remaining(self, deadline: float | None) -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    def _backoff_s(self, retry: int, err: ProviderError) -> float | None:
        """Delay before retry number ``retry`` (1-based), or None to fall back instead."""
        if err.retry_after_s is not None:
            return err.retry_after_s if err.retry_after_s <= self.settings.retry_after_max_s else None
        cap = min(self.settings.retry_max_delay_s, self.settings.retry_initial_delay_s * 2 ** (retry - 1))
        return random.uniform(0, cap)

    def _attempt_budget(self, deadline: float | None, first_token: bool) -> float:
        limit = self.settings.request_timeout_s
        if first_token:
            limit = min(limit, self.settings.ttft_timeout_s)
        remaining = self._remaining(deadline)
        return limit if remaining is None else max(0.0, min(limit, remaining))

    async def _await_warm(self, slot: ProviderSlot, call: _Call, fallback_left: bool) -> GatewayError | None:
        """Policy ``wait`` (or nothing else to try): waits for the shared wake-up to finish.

        With a fallback left in the plan, at most half the remaining deadline is spent waiting,
        so a cold start that overruns still leaves time for an answer from elsewhere.
        """
        self._wake(slot, call.trace)
        waker = slot.waker
        if waker is None:
            return None
        remaining = self._remaining(call.deadline)
        limit = self.settings.cold_start_timeout_s
        if remaining is not None:
            budget = remaining / 2 if fallback_left else remaining - self.settings.min_attempt_time_s
            limit = max(0.0, min(limit, budget))
        call.trace.event("wait_cold_start", provider=slot.name, limit_s=round(limit, 3))
        try:
            await asyncio.wait_for(asyncio.shield(waker), limit)
        except TimeoutError:
            return ProviderTimeoutError(slot.name, f"{slot.name} did not finish its cold start within {limit:.1f} s")
        if slot.state is not HealthState.HEALTHY:
            return ProviderUnavailableError(slot.name, f"{slot.name} did not come up: {slot.last_error}")
        return None

    async def _walk(self, call: _Call) -> AsyncIterator[tuple[_Step, int]]:
        """Yields (step, try number) in order; stops at the first success recorded in ``call``."""
        plan = self._plan(call.policy, call.trace)
        for index, step in enumerate(plan):
            if step.wait_cold:
                started = time.perf_counter()
                cold_error = await self._await_warm(step.slot, call, fallback_left=index < len(plan) - 1)
                if cold_error is not None:
                    call.attempts.append(Attempt(step.slot.name, cold_error, time.perf_counter() - started))
                    call.errors[step.slot.name] = cold_error
                    call.last_error = cold_error
                    call.trace.event("fallback", provider=step.slot.name, reason=cold_error.reason)
                    continue
            tries = 1 + self.settings.retry_max_retries
            for n in range(tries):
                remaining = self._remaining(call.deadline)
                if remaining is not None and remaining < self.settings.min_attempt_time_s:
                    call.trace.event("deadline_stop", provider=step.slot.name, remaining_s=round(remaining, 3))
                    return
                yield step, n
                err = call.last_error
                if err is None:
                    return
                if not isinstance(err, ProviderError) or not err.retryable or n == tries - 1:
                    break
                if getattr(err, "connect_failed", False) and index < len(plan) - 1:
                    # Nothing is listening: falling back now beats a backoff and a second refusal.
                    break
                delay = self._backoff_s(n + 1, err)
                remaining = self._remaining(call.deadline)
                if delay is None or (remaining is not None and remaining < delay + self.settings.min_attempt_time_s):
                    call.trace.event(
                        "no_retry",
                        provider=step.slot.name,
                        reason="retry_after_too_long" if delay is None else "deadline",
                    )
                    break
                call.trace.event("retry", provider=step.slot.name, delay_s=round(delay, 3), reason=err.reason)
                await asyncio.sleep(delay)
            if call.last_error is not None:
                call.trace.event("fallback", provider=step.slot.name, reason=call.last_error.reason)

    def _record(self, call: _Call, slot: ProviderSlot, err: BaseException | None, started: float) -> None:
        """Books one attempt's outcome; raises at once for the caller's own mistakes."""
        duration = time.perf_counter() - started
        slot.counters.attempts += 1
        if err is None:
            slot.record_success()
            call.last_error = None
            call.attempts.append(Attempt(slot.name, None, duration))
            return
        if isinstance(err, TimeoutError):
            remaining = self._remaining(call.deadline)
            if remaining is not None and remaining <= _DEADLINE_SLACK_S:
                # The caller's deadline ran out, not the provider's patience: no verdict on it.
                slot.breaker.release_probe()
                raise DeadlineExceededError(f"the call's deadline passed while waiting for {slot.name}") from err
            err = ProviderTimeoutError(slot.name, f"{slot.name} sent no token within {call.budget_s:.1f} s")
        elif isinstance(err, StopAsyncIteration):
            err = ProviderProtocolError(slot.name, f"{slot.name} ended the stream without a final message")
        elif not isinstance(err, GatewayError):
            err = ProviderError(slot.name, f"{slot.name} failed: {type(err).__name__}: {err}")
        call.attempts.append(Attempt(slot.name, err, duration))
        call.last_error = err
        if isinstance(err, InvalidRequestError):
            slot.breaker.release_probe()
            raise err  # the caller's mistake: no retry, no other provider
        if isinstance(err, ProviderError):
            call.errors[slot.name] = err
            slot.record_failure(err.message, force_open=isinstance(err, ProviderAuthError), reason=err.reason)
        else:
            slot.breaker.release_probe()

    def _exhausted(self, call: _Call, request: ChatRequest) -> GatewayError:
        if not call.errors:
            return DeadlineExceededError(
                "the call's deadline left no time to ask any provider; allow more time "
                f"(at least {self.settings.min_attempt_time_s} s per attempt)"
            )
        if request.model and all(isinstance(e, ProviderModelNotFoundError) for e in call.errors.values()):
            served = {n: e.served for n, e in call.errors.items() if isinstance(e, ProviderModelNotFoundError)}
            return ModelNotFoundError(
                f"no provider serves model {request.model!r}; served models: {served}. "
                "Leave model empty to use each provider's default."
            )
        return AllProvidersFailedError(dict(call.errors))

    async def _first(
        self,
        call: _Call,
        step: _Step,
        n: int,
        request: ChatRequest,
        start: Callable[[], Awaitable[T]],
        cleanup: Callable[[], Awaitable[None]] | None,
    ) -> tuple[AttemptSpan, T, float] | None:
        """Runs an attempt up to its first result (a unary answer, or a stream's first item) under
        the attempt span and budget. Returns (span, value, start time), or None after booking a
        provider failure; a caller mistake or a cancellation propagates."""
        slot = step.slot
        call.budget_s = self._attempt_budget(call.deadline, first_token=call.streaming)
        started = time.perf_counter()
        span = call.trace.attempt(slot.provider, request, n, step.wait_cold)
        try:
            with span.current():
                async with asyncio.timeout(call.budget_s):
                    value = await start()
        except asyncio.CancelledError:
            if cleanup is not None:
                await cleanup()
            slot.breaker.release_probe()
            span.end()
            raise
        except Exception as exc:
            if cleanup is not None:
                await cleanup()
            self._add_upstream(call, started)
            try:
                self._record(call, slot, exc, started)
            finally:
                span.failed(call.last_error)
                span.end()
            return None
        self._add_upstream(call, started)
        return span, value, started

    @staticmethod
    def _add_upstream(call: _Call, since: float) -> None:
        if call.stats is not None:
            call.stats.upstream_s += time.perf_counter() - since

    # ---- public API -------------------------------------------------------------------------

    def _call(self, request: ChatRequest, deadline: float | None, policy: str | None, rpc: str) -> _Call:
        policy = policy or self.settings.cold_start_policy
        return _Call(
            stats=current_rpc.get(),
            streaming=rpc == "ChatStream",
            deadline=deadline,
            policy=policy,
            trace=RouteTrace(rpc, request, [s.name for s in self.slots], policy),
        )

    async def chat(self, request: ChatRequest, deadline: float | None = None, policy: str | None = None) -> Routed:
        """Serves a unary call; ``deadline`` is a ``time.monotonic()`` instant."""
        call = self._call(request, deadline, policy, "Chat")
        with call.trace.scope():
            async for step, n in self._walk(call):
                slot = step.slot
                got = await self._first(call, step, n, request, partial(slot.provider.chat, request), None)
                if got is None:
                    continue
                span, result, started = got
                self._record(call, slot, None, started)
                span.succeeded(result.id, result.model, result.finish_reason.value, result.usage)
                span.end()
                call.trace.served(slot.name, len(call.attempts))
                call.served(slot.name, result.usage.prompt_tokens, result.usage.completion_tokens)
                return Routed(result, slot.name, tuple(call.attempts))
            err = self._exhausted(call, request)
            call.trace.failed(err)
            raise err

    async def stream(
        self, request: ChatRequest, deadline: float | None = None, policy: str | None = None
    ) -> AsyncGenerator[str | RoutedEnd, None]:
        """Serves a streaming call: text deltas, then one :class:`RoutedEnd`.

        An async generator: the consumer must close it (``contextlib.aclosing``); closing it
        closes the upstream response, which aborts generation there.
        """
        call = self._call(request, deadline, policy, "ChatStream")
        upstream_s = 0.0  # time awaiting the provider mid-stream; the rest of the call is the gateway's
        with call.trace.scope():
            serving: tuple[ProviderSlot, AsyncGenerator[StreamItem, None], StreamItem] | None = None
            async for step, n in self._walk(call):
                slot = step.slot
                gen = slot.provider.stream(request)
                got = await self._first(call, step, n, request, partial(anext, gen), gen.aclose)
                if got is None:
                    continue
                span, first, started = got
                span.first_chunk()
                serving = (slot, gen, first)
                break
            if serving is None:
                err = self._exhausted(call, request)
                call.trace.failed(err)
                raise err
            slot, gen, item = serving
            sent = 0
            loop = asyncio.get_running_loop()
            idle_s = self.settings.stream_idle_timeout_s
            try:
                async with aclosing(gen) as events, asyncio.timeout(None) as idle:
                    while True:
                        if isinstance(item, StreamEnd):
                            self._record(call, slot, None, started)
                            span.succeeded(item.id, item.model, item.finish_reason.value, item.usage)
                            call.trace.served(slot.name, len(call.attempts))
                            call.served(slot.name, item.usage.prompt_tokens, item.usage.completion_tokens)
                            yield RoutedEnd(item, slot.name, tuple(call.attempts))
                            return
                        sent += 1
                        yield item
                        idle.reschedule(loop.time() + idle_s)
                        waited = time.perf_counter()
                        item = await anext(events)
                        upstream_s += time.perf_counter() - waited
                        idle.reschedule(None)
            except (asyncio.CancelledError, GeneratorExit):
                slot.breaker.release_probe()  # the caller went away: no verdict on the provider
                raise
            except Exception as exc:
                cause: GatewayError
                if isinstance(exc, TimeoutError):
                    cause = ProviderTimeoutError(slot.name, f"{slot.name} sent nothing for {idle_s:.1f} s mid-stream")
                elif isinstance(exc, StopAsyncIteration):
                    cause = ProviderProtocolError(slot.name, f"{slot.name} ended the stream without a final message")
                elif isinstance(exc, GatewayError):
                    cause = exc
                else:
                    cause = ProviderError(slot.name, f"{slot.name} failed mid-stream: {type(exc).__name__}: {exc}")
                slot.counters.attempts += 1
                slot.record_failure(cause.message, force_open=False, reason=cause.reason)
                err = StreamInterruptedError(slot.name, cause, sent)
                span.failed(cause)
                call.trace.failed(err)
                raise err from exc
            finally:
                span.end()
                if call.stats is not None:
                    call.stats.upstream_s += upstream_s


@dataclass(slots=True)
class _Call:
    """Per-call routing state (never shared between calls)."""

    deadline: float | None
    policy: str
    trace: RouteTrace
    attempts: list[Attempt] = field(default_factory=list)
    errors: dict[str, GatewayError] = field(default_factory=dict)
    last_error: GatewayError | None = None
    budget_s: float = 0.0
    stats: RpcStats | None = None
    streaming: bool = False

    def served(self, provider: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Fills the RPC's stats for the access log."""
        if self.stats is not None:
            self.stats.provider = provider
            self.stats.attempts = len(self.attempts)
            self.stats.prompt_tokens = prompt_tokens
            self.stats.completion_tokens = completion_tokens
