"""InferenceService: proto <-> domain translation only.

No HTTP and no provider knowledge here: requests are validated into domain types, handed to the
router, and the router's results (or domain errors) are turned back into protos and gRPC statuses.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from service.api.accounting import CallAccount, add_budget, ledger_health, usage
from service.api.status import code_for, to_grpc_status
from service.api.validation import to_domain
from service.config import Settings
from service.errors import GatewayError, ProviderUnavailableError
from service.guard.policy import allowed_providers
from service.guard.redaction import redact, strip_userinfo
from service.observe import metrics
from service.providers.base import ChatRequest, FinishReason, ToolCall, ToolCallDelta, Usage
from service.routing.health import CircuitState, HealthState, ProviderSlot, Warmth
from service.routing.router import Attempt, RoutedEnd, Router
from service.spend import LedgerUnavailableError, Spend

_FINISH = {
    FinishReason.UNSPECIFIED: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_STATE = {
    HealthState.UNKNOWN: pb.PROVIDER_STATE_UNSPECIFIED,
    HealthState.HEALTHY: pb.PROVIDER_STATE_HEALTHY,
    HealthState.UNHEALTHY: pb.PROVIDER_STATE_UNHEALTHY,
}
_CIRCUIT = {
    CircuitState.CLOSED: pb.CIRCUIT_STATE_CLOSED,
    CircuitState.OPEN: pb.CIRCUIT_STATE_OPEN,
    CircuitState.HALF_OPEN: pb.CIRCUIT_STATE_HALF_OPEN,
}
_WARMTH = {
    Warmth.NOT_APPLICABLE: pb.WARMTH_UNSPECIFIED,
    Warmth.COLD: pb.WARMTH_COLD,
    Warmth.WARMING: pb.WARMTH_WARMING,
    Warmth.WARM: pb.WARMTH_WARM,
}


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


def _duration(seconds: float) -> duration_pb2.Duration:
    nanos = max(0, int(seconds * 1e9))  # built directly: FromNanoseconds is Python-level and slower
    return duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def _attempts(attempts: tuple[Attempt, ...]) -> list[pb.Attempt]:
    return [
        pb.Attempt(
            provider=a.provider,
            error_reason=a.error.reason if a.error else "",
            error_message=redact(a.error.message) if a.error else "",
            duration=_duration(a.duration_s),
        )
        for a in attempts
    ]


def _assistant(text: str, calls: tuple[ToolCall, ...]) -> pb.Message:
    return pb.Message(
        role=pb.ROLE_ASSISTANT,
        content=text,
        tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls],
    )


def _tool_call_delta(d: ToolCallDelta) -> pb.ToolCallDelta:
    return pb.ToolCallDelta(index=d.index, id=d.id, name=d.name, arguments=d.arguments)


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def provider_health(slot: ProviderSlot, spend: Spend | None = None) -> pb.ProviderHealth:
    """The proto view of one provider's state (and its month's spend)."""
    msg = pb.ProviderHealth(
        name=slot.name,
        kind=slot.provider.kind,
        endpoint=strip_userinfo(slot.provider.endpoint),
        model=slot.provider.default_model,
        state=_STATE[slot.state],
        last_error=redact(slot.last_error),
        circuit_state=_CIRCUIT[slot.breaker.state],
        warmth=_WARMTH[slot.warmth()],
        position=slot.position,
    )
    if slot.last_check_wall is not None:
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(int(slot.last_check_wall * 1e9))
        msg.last_check_time.CopyFrom(ts)
    if slot.last_latency_s is not None:
        msg.last_latency.CopyFrom(_duration(slot.last_latency_s))
    add_budget(msg, spend)
    return msg


class InferenceServicer(pb_grpc.InferenceServiceServicer):  # type: ignore[misc]  # generated, untyped base
    """The gRPC face of the router."""

    def __init__(self, router: Router, settings: Settings, in_flight: Callable[[], int] = lambda: 0) -> None:
        self.router = router
        self.settings = settings
        self._in_flight = in_flight

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ChatResponse:
        """Unary chat."""
        account = CallAccount(self.router, "Chat", ChatRequest((), model=request.model or None), context)
        with account:
            try:
                domain, policy = to_domain(request, self.settings)
                account.request = domain
                await account.reserve(request)
                routed = await self.router.chat(domain, _deadline(context), policy, providers=allowed_providers())
            except GatewayError as exc:
                account.code = code_for(exc)
                await context.abort_with_status(to_grpc_status(exc))
                raise  # unreachable: abort raises
            account.served_model = routed.result.model
        r = routed.result
        return pb.ChatResponse(
            id=r.id,
            model=r.model,
            message=_assistant(r.content, r.tool_calls),
            finish_reason=_FINISH[r.finish_reason],
            usage=_usage(r.usage),
            provider=routed.provider,
            attempts=_attempts(routed.attempts),
        )

    async def ChatStream(
        self, request: pb.ChatStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        """Streaming chat: deltas as they arrive, then one final message."""
        account = CallAccount(self.router, "ChatStream", ChatRequest((), model=request.model or None), context)
        with account:
            try:
                domain, policy = to_domain(request, self.settings)
                account.request = domain
                await account.reserve(request)
            except GatewayError as exc:
                account.code = code_for(exc)
                await context.abort_with_status(to_grpc_status(exc))
                return
            # One generator for the whole stream (no inner one per call): every message passes
            # through each generator layer between the provider and grpc.
            metrics.stream_started()
            Delta = pb.ChatStreamDelta
            Response = pb.ChatStreamResponse
            try:
                providers = allowed_providers()
                async with aclosing(
                    self.router.stream(domain, _deadline(context), policy, providers=providers)
                ) as events:
                    async for item in events:
                        if isinstance(item, str):
                            yield Response(delta=Delta(text=item))
                        elif isinstance(item, ToolCallDelta):
                            yield Response(delta=Delta(tool_calls=[_tool_call_delta(item)]))
                        else:
                            assert isinstance(item, RoutedEnd)
                            end = item.end
                            account.served_model = end.model
                            yield Response(
                                final=pb.ChatStreamFinal(
                                    id=end.id,
                                    model=end.model,
                                    finish_reason=_FINISH[end.finish_reason],
                                    usage=_usage(end.usage),
                                    provider=item.provider,
                                    attempts=_attempts(item.attempts),
                                    message=_assistant(item.text, item.tool_calls),
                                )
                            )
            except GatewayError as exc:
                account.code = code_for(exc)
                await context.abort_with_status(to_grpc_status(exc))
            finally:
                metrics.stream_ended()

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.HealthResponse:
        """Overall status plus one entry per provider."""
        status = pb.SERVING_STATUS_SERVING if self.router.serving() else pb.SERVING_STATUS_NOT_SERVING
        spend = self.router.spend
        providers = [provider_health(s, spend) for s in self.router.slots]
        return pb.HealthResponse(status=status, providers=providers, ledger=ledger_health(spend))

    async def GetProviderStatus(
        self, request: pb.GetProviderStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetProviderStatusResponse:
        """Admin view: health, counters, served models, circuit retry time."""
        out = []
        now_mono, now_wall = time.monotonic(), time.time()
        for slot in self.router.slots:
            c = slot.counters
            status = pb.ProviderStatus(
                health=provider_health(slot, self.router.spend),
                counters=pb.ProviderCounters(
                    attempts=c.attempts,
                    successes=c.successes,
                    failures=c.failures,
                    skips=c.skips,
                    consecutive_failures=slot.breaker.consecutive_failures,
                ),
                served_models=slot.served_models,
            )
            retry_at = slot.breaker.retry_at
            if retry_at is not None:
                ts = timestamp_pb2.Timestamp()
                ts.FromNanoseconds(int((now_wall + retry_at - now_mono) * 1e9))
                status.circuit_retry_time.CopyFrom(ts)
            out.append(status)
        return pb.GetProviderStatusResponse(
            providers=out, in_flight=self._in_flight(), max_concurrent_requests=self.settings.max_concurrent_requests
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        """The model catalogue: each name a request may use, and the provider model ids behind it."""
        return pb.ListModelsResponse(
            models=[
                pb.CatalogModel(name=e.name, routes=[pb.ModelRoute(provider=p, model=m) for p, m in e.routes])
                for e in self.router.catalogue.ordered()
            ]
        )

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetUsageResponse:
        """The ledger summed over a time range (default: this calendar month, UTC), grouped as asked."""
        try:
            return await usage(self.router.spend, request)
        except GatewayError as exc:
            await context.abort_with_status(to_grpc_status(exc))
            raise  # unreachable: abort raises
        except LedgerUnavailableError as exc:
            await context.abort_with_status(
                to_grpc_status(ProviderUnavailableError("ledger", f"the usage ledger cannot be read now: {exc}"))
            )
            raise
