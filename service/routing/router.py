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
import dataclasses
import datetime
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.config import Settings
from service.errors import (
    AllProvidersFailedError,
    DeadlineExceededError,
    FieldViolation,
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    ProviderAuthError,
    ProviderError,
    ProviderModelNotFoundError,
    ProviderProtocolError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    ResourceExhaustedError,
    SchemaViolationError,
    StreamInterruptedError,
)
from service.observe.telemetry import AttemptSpan, RouteTrace, RpcStats, current_rpc
from service.providers.base import (
    ChatRequest,
    ChatResult,
    Provider,
    StreamEnd,
    StreamItem,
    ToolCall,
    ToolCallDelta,
    Usage,
    connection_wait,
)
from service.routing.assemble import Assembler, schema_violation
from service.routing.catalogue import CatalogueEntry, default_catalogue, load_catalogue
from service.routing.health import CircuitBreaker, HealthMonitor, HealthState, ProviderSlot
from service.routing.idle import IdleTimeout
from service.routing.planner import Plan, SlotView, Step, plan, serves
from service.spend import Charge, Spend

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
    """The last item of a routed stream, with the whole message the deltas made up."""

    end: StreamEnd
    provider: str
    attempts: tuple[Attempt, ...]
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


class Router:
    """Sends each call along the provider chain: asks the planner, then walks the plan."""

    def __init__(self, providers: Sequence[Provider], settings: Settings) -> None:
        if not providers:
            raise ValueError("the provider chain is empty")
        self.settings = settings
        window_s = settings.modal_scaledown_window_minutes * 60
        self.slots = [
            ProviderSlot(
                p,
                i,
                CircuitBreaker(settings.circuit_failure_threshold, settings.circuit_cooldown_s),
                window_s,
                failure_threshold=settings.health_failure_threshold,
            )
            for i, p in enumerate(providers)
        ]
        self.monitor = HealthMonitor(self.slots, settings.health_check_interval_s, settings.health_check_timeout_s)
        defaults = [(p.name, p.default_model) for p in providers]
        self.catalogue = (
            load_catalogue(settings.models_file, [p.name for p in providers])
            if settings.models_file
            else default_catalogue(defaults)
        )
        # Called (as a task) when serving() changes because of a call's outcome, so grpc.health.v1
        # follows what calls see, not only the periodic probe.
        self.on_change: Callable[[], Coroutine[Any, Any, None]] | None = None
        self._serving_published: bool | None = None
        # The spend ledger, cost model and budgets (set by the server; None: nothing is costed).
        self.spend: Spend | None = None
        self._restarts: list[asyncio.Task[None]] = []
        for slot in self.slots:
            slot.breaker.on_transition = self._circuit_logger(slot)
            slot.on_change = self._state_changed

    @staticmethod
    def _circuit_logger(slot: ProviderSlot):  # type: ignore[no-untyped-def]
        def note(before, after, reason):  # type: ignore[no-untyped-def]
            RouteTrace.note_circuit(slot.name, before.value, after.value, reason)

        return note

    def _state_changed(self) -> None:
        serving = self.serving()
        if serving is self._serving_published or self.on_change is None:
            return
        self._serving_published = serving
        try:
            asyncio.get_running_loop().create_task(self.on_change())
        except RuntimeError:  # no loop (unit tests of the state alone)
            pass

    async def _start_provider(self, slot: ProviderSlot) -> bool:
        try:
            await slot.provider.start()
        except Exception as exc:
            slot.started = False
            slot.state = HealthState.UNHEALTHY
            slot.last_error = f"start-up failed: {exc}"
            return False
        slot.started = True
        slot.last_error = ""
        return True

    async def _retry_start(self, slot: ProviderSlot) -> None:
        """Retries a failed start-up in the background (backoff up to the health interval)."""
        delay = min(1.0, self.settings.health_check_interval_s)
        while not await self._start_provider(slot):
            log.warning("provider %s still cannot start (%s); retrying in %.0f s", slot.name, slot.last_error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.health_check_interval_s)
        log.info("provider %s started after a failed start-up", slot.name)
        await self.monitor.check(slot, definitive=True)
        self._state_changed()

    async def start(self) -> None:
        """Starts every provider, validates them once, then starts the monitor.

        One provider failing to start (say, the Modal URL lookup) never stops the gateway: it is
        listed UNHEALTHY with the reason, its start is retried in the background, the others serve.
        """
        for slot in self.slots:
            if not await self._start_provider(slot):
                log.error("provider %s could not start: %s; retrying in the background", slot.name, slot.last_error)
                self._restarts.append(asyncio.create_task(self._retry_start(slot), name=f"start-{slot.name}"))
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
        self._serving_published = self.serving()
        self.monitor.start()

    async def aclose(self) -> None:
        """Stops the monitor, start-up retries, wake-ups and providers."""
        await self.monitor.stop()
        for task in self._restarts:
            task.cancel()
        for slot in self.slots:
            if slot.waker is not None:
                slot.waker.cancel()
        for slot in self.slots:
            if slot.started:
                await slot.provider.aclose()

    def serving(self) -> bool:
        """A call can be served now: some provider is started, not open-circuited and not known
        to be down (a scale-to-zero provider that is merely asleep counts: a call can wake it)."""
        return any(s.servable() for s in self.slots)

    # ---- planning -------------------------------------------------------------------------

    def _serves(self, slot: ProviderSlot, request: ChatRequest, entry: CatalogueEntry | None) -> bool | None:
        if entry is not None:
            return entry.model_for(slot.name) is not None
        verdict = serves(request.model, slot.provider.default_model, slot.served_models)
        if self.catalogue.from_file and verdict is None:
            # With a catalogue, a name is a catalogue name or a model id someone is known to serve:
            # anything else is NOT_FOUND listing the catalogue before any provider is asked.
            return any(e.model_for(slot.name) == request.model for e in self.catalogue.entries.values())
        return verdict

    def _plan(
        self,
        request: ChatRequest,
        entry: CatalogueEntry | None,
        policy: str,
        trace: RouteTrace,
        allowed: frozenset[str] | None = None,
    ) -> Plan:
        now = time.monotonic()
        images = request.has_images
        views = [
            SlotView(
                name=s.name,
                circuit=s.breaker.state,
                health=s.state,
                warmth=s.warmth(now),
                reachable=s.last_reachable,
                started=s.started,
                serves_model=self._serves(s, request, entry),
                takes_images=s.provider.image_input or not images,
                allowed=allowed is None or s.name in allowed,
                budget_ok=self.spend is None or not self.spend.budgets.provider_exhausted(s.name),
            )
            for s in self.slots
        ]
        result = plan(views, policy)
        for name, reason in result.skipped:
            self.slots[[v.name for v in views].index(name)].counters.skips += 1
            trace.skip(name, reason)
        for index in result.wake:
            self._wake(self.slots[index], trace)
        if any(step.last_resort for step in result.steps):
            trace.event("last_resort", providers=[self.slots[s.index].name for s in result.steps if s.last_resort])
        return result

    def _wake(self, slot: ProviderSlot, trace: RouteTrace) -> None:
        """Starts one wake-up for a cold provider, shared by every caller that finds it cold."""
        if self.monitor.wake(slot, self.settings.cold_start_timeout_s, self.settings.wake_poll_interval_s):
            trace.event("wake_up", provider=slot.name)
            meter = None if self.spend is None else self.spend.costs.meters.get(slot.name)
            if meter is not None:
                meter.wake()  # a container boots and bills from now (docs/cost.md)

    def _over_budget(self, planned: Plan) -> ResourceExhaustedError:
        assert self.spend is not None
        spent = [self.spend.budgets.provider_status(n) for n, r in planned.skipped if r == "budget_exhausted"]
        first = min(spent, key=lambda s: s.resets_at)
        wait_s = max(0.0, (first.resets_at - datetime.datetime.now(datetime.UTC)).total_seconds())
        names = ", ".join(s.name for s in spent)
        return ResourceExhaustedError(
            f"the monthly budget of every provider that could serve this call is spent ({names}); "
            f"budgets reset at {first.resets_at:%Y-%m-%d %H:%M} UTC, or an operator may raise them "
            "(<PROVIDER>_MONTHLY_BUDGET_USD)",
            wait_s,
            reason="BUDGET_EXHAUSTED",
            quota=(first.subject, "monthly_budget_usd", first.description),
        )

    def _charge_done(self, call: _Call, model: str = "", usage: Usage | None = None, relayed_chars: int = 0) -> None:
        """Ends the open attempt's charge: its GPU time, and its tokens when known."""
        charge, call.charge = call.charge, None
        if charge is None:
            return
        if usage is not None:
            cost = charge.finish(model, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
        else:  # cut short: what was relayed was generated (about 4 characters a token)
            cost = charge.finish(model, completion_tokens=relayed_chars // 4)
        call.cost_usd += cost

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
        waited = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.shield(waker), limit)
        except TimeoutError:
            self._add_wait(call, waited)
            return ProviderTimeoutError(slot.name, f"{slot.name} did not finish its cold start within {limit:.1f} s")
        self._add_wait(call, waited)
        if slot.state is not HealthState.HEALTHY:
            return ProviderUnavailableError(slot.name, f"{slot.name} did not come up: {slot.last_error}")
        return None

    async def _walk(self, call: _Call, request: ChatRequest) -> AsyncIterator[tuple[ProviderSlot, Step, int]]:
        """Yields (provider, step, try number) in plan order; stops at the first success in ``call``."""
        planned = self._plan(request, call.entry, call.policy, call.trace, call.allowed)
        if planned.model_unserved:
            raise self._model_not_found(request)
        if planned.over_budget:
            raise self._over_budget(planned)
        if planned.images_unreadable:
            readers = [s.name for s in self.slots if s.provider.image_input]
            raise InvalidRequestError(
                "the request has images, and no provider that could serve it reads images "
                f"(providers that do: {readers or 'none configured'}); remove the image parts, or configure a "
                "vision model (MODAL_WEB_URL, VASTAI_VLLM_URL or ANTHROPIC_API_KEY)",
                [FieldViolation("messages", "image parts cannot be served by the configured providers")],
            )
        if planned.denied:
            names = sorted(call.allowed or ())
            raise PermissionDeniedError(
                f"your tenant's policy lets calls reach only {names}, and none of them can serve this request; "
                "ask for a model they serve (ListModels), or ask an operator to widen the policy"
            )
        steps = planned.steps
        for index, step in enumerate(steps):
            slot = self.slots[step.index]
            fallback_left = index < len(steps) - 1
            if step.probe and not slot.breaker.allow():
                # Another call holds the half-open probe: this call goes elsewhere.
                call.trace.skip(slot.name, "circuit_probe_in_flight")
                continue
            if step.wait_cold:
                started = time.perf_counter()
                cold_error = await self._await_warm(slot, call, fallback_left=fallback_left)
                if cold_error is not None:
                    slot.breaker.release_probe()
                    call.attempts.append(Attempt(slot.name, cold_error, time.perf_counter() - started))
                    call.errors[slot.name] = cold_error
                    call.last_error = cold_error
                    call.trace.event("fallback", provider=slot.name, reason=cold_error.reason)
                    continue
            tries = 1 + self.settings.retry_max_retries
            for n in range(tries):
                remaining = self._remaining(call.deadline)
                if remaining is not None and remaining < self.settings.min_attempt_time_s:
                    slot.breaker.release_probe()
                    call.trace.event("deadline_stop", provider=slot.name, remaining_s=round(remaining, 3))
                    return
                yield slot, step, n
                err = call.last_error
                if err is None:
                    return
                if not isinstance(err, ProviderError) or not err.retryable or n == tries - 1:
                    break
                if getattr(err, "connect_failed", False) and fallback_left:
                    # Nothing is listening: falling back now beats a backoff and a second refusal.
                    break
                delay = self._backoff_s(n + 1, err)
                remaining = self._remaining(call.deadline)
                if delay is None or (remaining is not None and remaining < delay + self.settings.min_attempt_time_s):
                    call.trace.event(
                        "no_retry",
                        provider=slot.name,
                        reason="retry_after_too_long" if delay is None else "deadline",
                    )
                    break
                call.trace.event("retry", provider=slot.name, delay_s=round(delay, 3), reason=err.reason)
                await asyncio.sleep(delay)
                if call.stats is not None:
                    call.stats.wait_s += delay
            if call.last_error is not None:
                call.trace.event("fallback", provider=slot.name, reason=call.last_error.reason)

    def _translate(self, call: _Call, slot: ProviderSlot, err: BaseException, *, mid_answer: bool) -> GatewayError:
        """Lower-level exceptions of one attempt as domain errors (the caller's deadline raises)."""
        if isinstance(err, TimeoutError):
            remaining = self._remaining(call.deadline)
            if remaining is not None and remaining <= _DEADLINE_SLACK_S:
                # The caller's deadline ran out, not the provider's patience: no verdict on it.
                slot.breaker.release_probe()
                raise DeadlineExceededError(f"the call's deadline passed while waiting for {slot.name}") from err
            if mid_answer:
                idle = self.settings.stream_idle_timeout_s
                return ProviderTimeoutError(slot.name, f"{slot.name} sent nothing for {idle:.1f} s mid-answer")
            return ProviderTimeoutError(slot.name, f"{slot.name} sent no token within {call.budget_s:.1f} s")
        if isinstance(err, StopAsyncIteration):
            return ProviderProtocolError(slot.name, f"{slot.name} ended the stream without a final message")
        if isinstance(err, GatewayError):
            return err
        return ProviderError(slot.name, f"{slot.name} failed: {type(err).__name__}: {err}")

    def _record(self, call: _Call, slot: ProviderSlot, err: BaseException | None, started: float) -> None:
        """Books one attempt's outcome; raises at once for the caller's own mistakes."""
        duration = time.perf_counter() - started
        slot.counters.attempts += 1
        if err is None:
            slot.record_success()
            call.last_error = None
            call.attempts.append(Attempt(slot.name, None, duration))
            return
        err = self._translate(call, slot, err, mid_answer=False)
        call.attempts.append(Attempt(slot.name, err, duration))
        call.last_error = err
        if isinstance(err, InvalidRequestError):
            slot.breaker.release_probe()
            raise err  # the caller's mistake: no retry, no other provider
        if isinstance(err, (ProviderModelNotFoundError, SchemaViolationError)):
            # The caller's model choice, not a fault of the provider: no breaker, no health verdict.
            slot.breaker.release_probe()
            call.errors[slot.name] = err
            return
        if isinstance(err, ProviderError):
            call.errors[slot.name] = err
            slot.record_failure(err.message, force_open=isinstance(err, ProviderAuthError), reason=err.reason)
        else:
            slot.breaker.release_probe()

    def _model_not_found(self, request: ChatRequest) -> ModelNotFoundError:
        served = {s.name: s.served_models or [s.provider.default_model] for s in self.slots}
        names = [e.name for e in self.catalogue.ordered()] if self.catalogue.from_file else []
        listing = f"catalogue names: {names}; provider models: {served}" if names else f"served models: {served}"
        return ModelNotFoundError(
            f"no provider serves model {request.model!r}; {listing}. "
            "Use one of them, or leave model empty for the default (ListModels shows the catalogue)."
        )

    @staticmethod
    def _for(slot: ProviderSlot, request: ChatRequest, entry: CatalogueEntry | None) -> ChatRequest:
        """The request as this provider must see it: a catalogue name becomes its own model id."""
        if entry is None:
            return request
        return dataclasses.replace(request, model=entry.model_for(slot.name))

    def _schema_error(self, slot: ProviderSlot, request: ChatRequest, answer: Assembler) -> SchemaViolationError | None:
        problem = schema_violation(answer.text, request.response_format, answer.tool_calls())
        if problem is None:
            return None
        return SchemaViolationError(
            slot.name, f"{slot.name}'s answer is not the structured output asked for: {problem}"
        )

    def _exhausted(self, call: _Call, request: ChatRequest) -> GatewayError:
        if not call.errors:
            return DeadlineExceededError(
                "the call's deadline left no time to ask any provider; allow more time "
                f"(at least {self.settings.min_attempt_time_s} s per attempt)"
            )
        if request.model and all(isinstance(e, ProviderModelNotFoundError) for e in call.errors.values()):
            return self._model_not_found(request)
        hints = [e.retry_after_s for e in call.errors.values() if isinstance(e, ProviderError) and e.retry_after_s]
        return AllProvidersFailedError(dict(call.errors), retry_after_s=max(hints, default=None))

    async def _first(
        self,
        call: _Call,
        slot: ProviderSlot,
        step: Step,
        n: int,
        request: ChatRequest,
        gen: AsyncGenerator[StreamItem, None],
    ) -> tuple[AttemptSpan, StreamItem, float] | None:
        """Runs an attempt up to its stream's first item under the attempt span and the first-token
        budget. Returns (span, item, start time), or None after booking a provider failure (the
        stream is closed); a caller mistake or a cancellation propagates."""
        call.budget_s = self._attempt_budget(call.deadline, first_token=True)
        started = time.perf_counter()
        span = call.trace.attempt(slot.provider, request, n, step.wait_cold)
        loop = asyncio.get_running_loop()
        if self.spend is not None:
            call.charge = self.spend.costs.start(slot.name)
        try:
            with span.current():
                async with asyncio.timeout(call.budget_s) as ttft:

                    def queueing(waiting: bool) -> None:
                        # While we queue for one of our own pooled connections only the caller's
                        # deadline runs; the provider's first-token time starts once we have one.
                        remaining = self._remaining(call.deadline)
                        if waiting:
                            ttft.reschedule(None if remaining is None else loop.time() + remaining)
                        else:
                            ttft.reschedule(loop.time() + self._attempt_budget(call.deadline, first_token=True))

                    token = connection_wait.set(queueing)
                    try:
                        value = await anext(gen)
                    finally:
                        connection_wait.reset(token)
        except asyncio.CancelledError:
            await gen.aclose()
            self._charge_done(call, request.model or slot.provider.default_model)
            slot.breaker.release_probe()
            span.end()
            raise
        except Exception as exc:
            await gen.aclose()
            self._charge_done(call, request.model or slot.provider.default_model)
            self._add_upstream(call, started)
            try:
                self._record(call, slot, exc, started)
            finally:
                span.failed(call.last_error)
                span.end()
            return None
        self._add_upstream(call, started)
        call.ttft_s = time.perf_counter() - call.t0
        return span, value, started

    @staticmethod
    def _add_upstream(call: _Call, since: float) -> None:
        if call.stats is not None:
            call.stats.upstream_s += time.perf_counter() - since

    @staticmethod
    def _add_wait(call: _Call, since: float) -> None:
        if call.stats is not None:
            call.stats.wait_s += time.perf_counter() - since

    def _accounted(self, call: _Call) -> _Accounted:
        """On the way out, whatever happened: the open charge ends, and the RPC's stats get the
        call's cost and every attempt's outcome (the servicer writes them to the ledger)."""
        return _Accounted(self, call)

    def _settle(self, call: _Call) -> None:
        self._charge_done(call)
        if call.stats is not None:
            call.stats.cost_usd = call.cost_usd
            call.stats.ttft_s = call.ttft_s
            call.stats.attempt_outcomes = tuple(
                (a.provider, "ok" if a.error is None else a.error.reason) for a in call.attempts
            )

    # ---- public API -------------------------------------------------------------------------

    def _call(
        self,
        request: ChatRequest,
        deadline: float | None,
        policy: str | None,
        rpc: str,
        allowed: frozenset[str] | None = None,
    ) -> _Call:
        policy = policy or self.settings.cold_start_policy
        entry = self.catalogue.lookup(request.model) if self.catalogue.from_file else None
        return _Call(
            entry=entry,
            allowed=allowed,
            stats=current_rpc.get(),
            deadline=deadline,
            policy=policy,
            trace=RouteTrace(rpc, request, [s.name for s in self.slots], policy),
        )

    async def chat(
        self,
        request: ChatRequest,
        deadline: float | None = None,
        policy: str | None = None,
        providers: frozenset[str] | None = None,
    ) -> Routed:
        """Serves a unary call; ``deadline`` is a ``time.monotonic()`` instant; ``providers`` (the
        tenant's policy) limits which providers the call may reach (None: all).

        Served over the provider's stream and assembled here, so the first-token timeout, the idle
        timeout and cancellation work as for ChatStream. The caller has seen nothing until the
        answer is whole, so a failure part-way is invisible: the partial answer is dropped and the
        call retries or falls back like a failure before the first token (nothing is spliced).
        """
        call = self._call(request, deadline, policy, "Chat", providers)
        idle_s = self.settings.stream_idle_timeout_s
        with call.trace, self._accounted(call):
            async for slot, step, n in self._walk(call, request):
                sent_request = self._for(slot, request, call.entry)
                gen = slot.provider.stream(sent_request)
                got = await self._first(call, slot, step, n, sent_request, gen)
                if got is None:
                    continue
                span, item, started = got
                span.first_chunk()
                answer = Assembler()
                waited = time.perf_counter()
                try:
                    with IdleTimeout(idle_s) as idle:
                        async with aclosing(gen) as events:
                            while not isinstance(item, StreamEnd):
                                if isinstance(item, str):
                                    answer.text_delta(item)
                                else:
                                    answer.tool_delta(item)
                                idle.waiting()
                                try:
                                    item = await anext(events)
                                except asyncio.CancelledError as exc:
                                    idle.expired(exc)  # raises TimeoutError when it was the idle timeout
                                    raise
                except asyncio.CancelledError:
                    self._charge_done(call, sent_request.model or slot.provider.default_model)
                    slot.breaker.release_probe()
                    span.end()
                    raise
                except Exception as exc:
                    self._charge_done(call, sent_request.model or slot.provider.default_model)
                    self._add_upstream(call, waited)
                    err = self._translate(call, slot, exc, mid_answer=True)
                    try:
                        self._record(call, slot, err, started)
                    finally:
                        span.failed(call.last_error)
                        span.end()
                    continue
                self._add_upstream(call, waited)
                self._charge_done(call, item.model, item.usage)
                violation = self._schema_error(slot, request, answer)
                if violation is not None:
                    try:
                        self._record(call, slot, violation, started)
                    finally:
                        span.failed(violation)
                        span.end()
                    continue
                calls = answer.tool_calls()
                result = ChatResult(item.id, item.model, answer.text, item.finish_reason, item.usage, calls)
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
        self,
        request: ChatRequest,
        deadline: float | None = None,
        policy: str | None = None,
        providers: frozenset[str] | None = None,
    ) -> AsyncGenerator[str | ToolCallDelta | RoutedEnd, None]:
        """Serves a streaming call: text deltas, then one :class:`RoutedEnd`.

        An async generator: the consumer must close it (``contextlib.aclosing``); closing it
        closes the upstream response, which aborts generation there.
        """
        call = self._call(request, deadline, policy, "ChatStream", providers)
        upstream_s = 0.0  # time awaiting the provider mid-stream; the rest of the call is the gateway's
        with call.trace, self._accounted(call):
            serving: tuple[ProviderSlot, AsyncGenerator[StreamItem, None], StreamItem] | None = None
            async for slot, step, n in self._walk(call, request):
                sent_request = self._for(slot, request, call.entry)
                gen = slot.provider.stream(sent_request)
                got = await self._first(call, slot, step, n, sent_request, gen)
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
            answer = Assembler()
            idle_s = self.settings.stream_idle_timeout_s
            try:
                with IdleTimeout(idle_s) as idle:
                    async with aclosing(gen) as events:
                        while True:
                            if isinstance(item, StreamEnd):
                                self._charge_done(call, item.model, item.usage)
                                violation = self._schema_error(slot, request, answer)
                                if violation is not None:
                                    raise violation
                                self._record(call, slot, None, started)
                                span.succeeded(item.id, item.model, item.finish_reason.value, item.usage)
                                call.trace.served(slot.name, len(call.attempts))
                                call.served(slot.name, item.usage.prompt_tokens, item.usage.completion_tokens)
                                yield RoutedEnd(item, slot.name, tuple(call.attempts), answer.text, answer.tool_calls())
                                return
                            if isinstance(item, str):
                                answer.text_delta(item)
                                if call.stats is not None:
                                    call.stats.relayed_chars += len(item)
                            else:
                                answer.tool_delta(item)
                            sent += 1
                            yield item
                            idle.waiting()
                            waited = time.perf_counter()
                            try:
                                item = await anext(events)
                            except asyncio.CancelledError as exc:
                                idle.expired(exc)  # raises TimeoutError when it was the idle timeout
                                raise
                            upstream_s += time.perf_counter() - waited
                            idle.idle()
            except (asyncio.CancelledError, GeneratorExit):
                slot.breaker.release_probe()  # the caller went away: no verdict on the provider
                self._charge_done(call, slot.provider.default_model, relayed_chars=len(answer.text))
                raise
            except SchemaViolationError as exc:
                # Text already reached the caller: the stream ends, saying the answer did not fit.
                slot.counters.attempts += 1
                call.attempts.append(Attempt(slot.name, exc, 0.0))
                span.failed(exc)
                call.trace.failed(exc)
                raise
            except Exception as exc:
                self._charge_done(call, slot.provider.default_model, relayed_chars=len(answer.text))
                if isinstance(exc, DeadlineExceededError):
                    raise
                cause = self._translate(call, slot, exc, mid_answer=True)
                slot.counters.attempts += 1
                if isinstance(cause, ProviderError):
                    slot.record_failure(cause.message, force_open=False, reason=cause.reason)
                err = StreamInterruptedError(slot.name, cause, sent)
                span.failed(cause)
                call.trace.failed(err)
                raise err from exc
            finally:
                span.end()
                if call.stats is not None:
                    call.stats.upstream_s += upstream_s


class _Accounted:
    """The context manager of :meth:`Router._accounted` (a class: a generator-based one costs
    more per call)."""

    __slots__ = ("_call", "_router")

    def __init__(self, router: Router, call: _Call) -> None:
        self._router = router
        self._call = call

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        self._router._settle(self._call)


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
    entry: CatalogueEntry | None = None  # the catalogue name the request used, if any
    allowed: frozenset[str] | None = None  # providers the tenant's policy lets the call reach
    charge: Charge | None = None  # the open attempt's cost meter
    cost_usd: float = 0.0  # every finished attempt's cost
    t0: float = field(default_factory=time.perf_counter)
    ttft_s: float | None = None  # time from the call's start to its served answer's first item

    def served(self, provider: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Fills the RPC's stats for the access log."""
        if self.stats is not None:
            self.stats.provider = provider
            self.stats.attempts = len(self.attempts)
            self.stats.prompt_tokens = prompt_tokens
            self.stats.completion_tokens = completion_tokens
            # An upstream that reports nothing leaves both at 0: unknown, not free.
            self.stats.usage_reported = prompt_tokens + completion_tokens > 0
