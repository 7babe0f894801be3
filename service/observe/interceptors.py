"""The telemetry server interceptor: server span, context propagation, access log, overhead.

For every InferenceService RPC it

* extracts a W3C ``traceparent`` from the call's metadata and starts the SERVER span under it
  (the routing and attempt spans then nest below, and upstream HTTP carries the trace on);
* keeps a :class:`service.observe.telemetry.RpcStats` in a contextvar for the router to fill;
* writes one structured access-log line (JSON) with trace/span ids, provider, status, latency,
  tokens - never credentials, and message content only when LOG_CONTENT=true;
* records ``gateway.overhead.duration`` (time not spent awaiting a provider) and returns it to the
  caller as trailing metadata ``x-gateway-overhead-ms``.

Wrapped handlers are cached per method, so the per-call cost is the wrapper itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import orjson
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from service.guard.security import current_tenant
from service.observe import metrics
from service.observe.telemetry import RpcStats, current_rpc, tracer, tracing_enabled

access_log = logging.getLogger("service.access")

OVERHEAD_METADATA_KEY = "x-gateway-overhead-ms"
_PREFIX = "/inference.v1.InferenceService/"


class _MetadataGetter:
    """Reads propagation headers from gRPC invocation metadata (a sequence of key/value pairs)."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


def _code_name(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    try:
        code = context.code()
    except Exception:  # older grpcio: code() may be missing
        code = None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, BaseException) and type(error).__name__ == "CancelledError" else "UNKNOWN"


class _Call:
    """Per-RPC bookkeeping shared by the unary and stream wrappers."""

    __slots__ = ("context", "method", "span", "start", "stats", "stats_token", "token")

    def __init__(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.method = method
        self.context = context
        self.start = time.perf_counter()
        self.stats = RpcStats()
        self.stats_token = current_rpc.set(self.stats)
        if not tracing_enabled():
            self.span: Span = trace.INVALID_SPAN
            self.token: object = None
            return
        parent = propagate.extract(context.invocation_metadata() or (), getter=_GETTER)  # type: ignore[arg-type]
        self.span = tracer.start_span(
            f"inference.v1.InferenceService/{method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": "inference.v1.InferenceService", "rpc.method": method},
        )
        self.token = otel_context.attach(trace.set_span_in_context(self.span, parent))

    def overhead_s(self) -> float:
        return max(0.0, time.perf_counter() - self.start - self.stats.upstream_s)

    def set_trailer(self) -> None:
        self.context.set_trailing_metadata(((OVERHEAD_METADATA_KEY, f"{self.overhead_s() * 1000:.3f}"),))

    def finish(self, error: BaseException | None, content: dict[str, Any] | None = None) -> None:
        code = _code_name(self.context, error)
        elapsed = time.perf_counter() - self.start
        overhead = self.overhead_s()
        stats = self.stats
        span = self.span
        span.set_attribute("rpc.grpc.status_code", code)
        if stats.provider:
            span.set_attribute("gateway.served_by", stats.provider)
        if code != "OK":
            span.set_status(Status(StatusCode.ERROR, code))
        span.end()
        ctx = span.get_span_context()
        metrics.record_rpc(self.method, code, overhead if code == "OK" else None)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                orjson.dumps(
                    {
                        **(content or {}),
                        "event": "rpc",
                        "method": self.method,
                        "code": code,
                        "latency_ms": round(elapsed * 1000, 3),
                        "overhead_ms": round(overhead * 1000, 3),
                        "tenant": current_tenant.get(),
                        "provider": stats.provider,
                        "attempts": stats.attempts,
                        "prompt_tokens": stats.prompt_tokens,
                        "completion_tokens": stats.completion_tokens,
                        "trace_id": f"{ctx.trace_id:032x}" if ctx.is_valid else "",
                        "span_id": f"{ctx.span_id:016x}" if ctx.is_valid else "",
                    },
                ).decode()
            )
        current_rpc.reset(self.stats_token)
        if self.token is not None:
            otel_context.detach(self.token)  # type: ignore[arg-type]


def _content(request: Any, response_text: str | None) -> dict[str, Any]:
    """Message content for the access log, only when LOG_CONTENT=true."""
    messages = [{"role": int(m.role), "content": m.content} for m in getattr(request, "messages", ())]
    return {"request_messages": messages, "response_text": response_text}


def _wrap_unary(
    method: str, behavior: Callable[[Any, Any], Awaitable[Any]], log_content: bool
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(method, context)
        error: BaseException | None = None
        response: Any = None
        try:
            response = await behavior(request, context)
            call.set_trailer()
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            text = response.message.content if log_content and hasattr(response, "message") else None
            call.finish(error, _content(request, text) if log_content else None)

    return unary


def _wrap_stream(
    method: str, behavior: Callable[[Any, Any], AsyncIterator[Any]], log_content: bool
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = _Call(method, context)
        error: BaseException | None = None
        parts: list[str] = []
        try:
            async for message in behavior(request, context):
                if log_content and message.HasField("delta"):
                    parts.append(message.delta.text)
                yield message
            call.set_trailer()
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.finish(error, _content(request, "".join(parts)) if log_content else None)

    return stream


class TelemetryInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps InferenceService handlers; other services (health, reflection) pass through."""

    def __init__(self, log_content: bool = False) -> None:
        self._log_content = log_content
        # method -> (inner handler, wrapped). Inner interceptors (auth) may return a different
        # handler per call, e.g. one that aborts; only the same inner handler reuses its wrapper.
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        full = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or not full.startswith(_PREFIX):
            return handler
        cached = self._cache.get(full)
        if cached is not None and cached[0] is handler:
            return cached[1]
        method = full[len(_PREFIX) :]
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary, self._log_content),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream, self._log_content),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            return handler
        self._cache[full] = (handler, wrapped)
        return wrapped
