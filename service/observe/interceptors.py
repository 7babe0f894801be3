"""The telemetry server interceptor: server span, context propagation, access log, overhead.

For every InferenceService RPC it

* extracts a W3C ``traceparent`` from the call's metadata and starts the SERVER span under it
  (the routing and attempt spans then nest below, and upstream HTTP carries the trace on). The
  caller's ``baggage`` is dropped unless FORWARD_BAGGAGE=true, so it never reaches an upstream;
* keeps a :class:`service.observe.telemetry.RpcStats` in a contextvar for the router to fill;
* writes one structured access-log line (JSON) with trace/span ids, tenant, provider, status,
  latency, overhead, waits, tokens - never credentials, and message content only when
  LOG_CONTENT=true;
* splits the RPC's time three ways: upstream (awaiting a provider), waits (backoff, Retry-After,
  a cold start, a concurrency slot, the caller reading a stream slowly) and overhead (the rest:
  the gateway's own work). Overhead is recorded as ``gateway.overhead.duration`` and both are
  returned as trailing metadata, ``x-gateway-overhead-ms`` and ``x-gateway-wait-ms``, on errors
  too (the inner handlers see a context whose aborts carry them).

The server span's ``rpc.grpc.status_code`` is the integer code; its status is ERROR only for the
codes that mean the server failed (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
UNAVAILABLE, DATA_LOSS), never for a caller's mistake or a refusal.

Wrapped handlers are cached per method, so the per-call cost is the wrapper itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import orjson
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from service.guard.security import current_tenant
from service.observe import metrics
from service.observe.logs import sole_handler
from service.observe.telemetry import RpcStats, current_rpc, tracer, tracing_enabled

access_log = logging.getLogger("service.access")

OVERHEAD_METADATA_KEY = "x-gateway-overhead-ms"
WAIT_METADATA_KEY = "x-gateway-wait-ms"
_PREFIX = "/inference.v1.InferenceService/"
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


class _MetadataGetter:
    """Reads propagation headers from gRPC invocation metadata (a sequence of key/value pairs)."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _MetadataGetter()


def _status_code(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:  # older grpcio: code() may be missing
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    if error is None:
        return grpc.StatusCode.OK
    return grpc.StatusCode.CANCELLED if type(error).__name__ == "CancelledError" else grpc.StatusCode.UNKNOWN


class _Status(grpc.Status):  # type: ignore[misc]  # grpc is untyped here
    """A status with the gateway's trailers added to the original's."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class _Context:
    """The servicer context as the inner handlers see it: the same, except that an abort carries
    the overhead and wait trailers (trailers set after an abort are never sent)."""

    __slots__ = ("_call", "_context")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], call: _Call) -> None:
        self._context = context
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    # The methods every chat call uses, delegated directly (``__getattr__`` is the slow path).
    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()  # type: ignore[no-any-return]

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    async def abort_with_status(self, status: grpc.Status) -> None:
        trailers = (*(status.trailing_metadata or ()), *self._call.trailers())
        await self._context.abort_with_status(_Status(status.code, status.details, trailers))

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        await self._context.abort(code, details, (*(trailing_metadata or ()), *self._call.trailers()))


class _Call:
    """Per-RPC bookkeeping shared by the unary and stream wrappers."""

    __slots__ = ("context", "method", "span", "start", "stats", "stats_token", "token")

    def __init__(self, method: str, context: grpc.aio.ServicerContext[Any, Any], forward_baggage: bool) -> None:
        self.method = method
        self.context = context
        self.start = time.perf_counter()
        self.stats = RpcStats()
        self.stats_token = current_rpc.set(self.stats)
        self.span: Span = trace.INVALID_SPAN
        self.token: object = None
        tracing = tracing_enabled()
        if not tracing and not forward_baggage:
            return
        parent = propagate.extract(context.invocation_metadata() or (), getter=_GETTER)  # type: ignore[arg-type]
        if not forward_baggage:
            parent = baggage.clear(parent)  # the caller's baggage stays here: upstreams never see it
        if tracing:
            self.span = tracer.start_span(
                f"inference.v1.InferenceService/{method}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": "inference.v1.InferenceService", "rpc.method": method},
            )
            parent = trace.set_span_in_context(self.span, parent)
        self.token = otel_context.attach(parent)

    def split(self) -> tuple[float, float, float]:
        """(elapsed, overhead, wait) in seconds so far."""
        elapsed = time.perf_counter() - self.start
        stats = self.stats
        wait = stats.wait_s
        return elapsed, max(0.0, elapsed - stats.upstream_s - wait), wait

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """The overhead and wait trailers as of now."""
        _, overhead, wait = self.split()
        return ((OVERHEAD_METADATA_KEY, f"{overhead * 1000:.3f}"), (WAIT_METADATA_KEY, f"{wait * 1000:.3f}"))

    def set_trailer(self) -> None:
        """Adds the trailers to whatever the handler set (a successful end)."""
        context = self.context
        try:
            existing = tuple(context.trailing_metadata() or ())
        except Exception:  # an old grpcio without the getter
            existing = ()
        context.set_trailing_metadata((*existing, *self.trailers()))

    def finish(self, error: BaseException | None, content: dict[str, Any] | None = None) -> None:
        code = _status_code(self.context, error)
        elapsed, overhead, wait = self.split()
        stats = self.stats
        span = self.span
        tenant = current_tenant.get()
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if stats.provider:
                span.set_attribute("gateway.served_by", stats.provider)
            if code in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()
        ctx = span.get_span_context()
        metrics.record_rpc(self.method, code.value[0], tenant, overhead if code is grpc.StatusCode.OK else None, wait)
        if access_log.isEnabledFor(logging.INFO):
            fields = {
                **(content or {}),
                "event": "rpc",
                "method": self.method,
                "code": code.name,
                "latency_ms": round(elapsed * 1000, 3),
                "overhead_ms": round(overhead * 1000, 3),
                "wait_ms": round(wait * 1000, 3),
                "upstream_ms": round(stats.upstream_s * 1000, 3),
                "tenant": tenant,
                "provider": stats.provider,
                "attempts": stats.attempts,
                "prompt_tokens": stats.prompt_tokens,
                "completion_tokens": stats.completion_tokens,
                "usage_reported": stats.usage_reported,
                "trace_id": f"{ctx.trace_id:032x}" if ctx.is_valid else "",
                "span_id": f"{ctx.span_id:016x}" if ctx.is_valid else "",
            }
            line = orjson.dumps(fields).decode()
            sink = sole_handler(access_log)
            if sink is not None:
                sink.emit_line("INFO", access_log.name, line, fields)  # the same line, without a LogRecord
            else:
                access_log.info(line, extra={"fields": fields})
        try:
            current_rpc.reset(self.stats_token)
        except ValueError:
            pass  # a stream closed from another context (the generator's finalizer): nothing to restore
        if self.token is not None:
            otel_context.detach(self.token)  # type: ignore[arg-type]


def _content(request: Any, response_text: str | None) -> dict[str, Any]:
    """Message content for the access log, only when LOG_CONTENT=true."""
    messages = [{"role": int(m.role), "content": m.content} for m in getattr(request, "messages", ())]
    return {"request_messages": messages, "response_text": response_text}


def _wrap_unary(
    method: str, behavior: Callable[[Any, Any], Awaitable[Any]], log_content: bool, forward_baggage: bool
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(method, context, forward_baggage)
        error: BaseException | None = None
        response: Any = None
        try:
            response = await behavior(request, _Context(context, call))
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
    method: str, behavior: Callable[[Any, Any], AsyncIterator[Any]], log_content: bool, forward_baggage: bool
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = _Call(method, context, forward_baggage)
        stats = call.stats
        clock = time.perf_counter
        error: BaseException | None = None
        parts: list[str] = []
        try:
            async for message in behavior(request, _Context(context, call)):
                if log_content and message.HasField("delta"):
                    parts.append(message.delta.text)
                sent = clock()
                yield message
                # Until grpc asks for the next message the caller is reading (flow control): a wait.
                stats.wait_s += clock() - sent
            call.set_trailer()
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.finish(error, _content(request, "".join(parts)) if log_content else None)

    return stream


class TelemetryInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps InferenceService handlers; other services (health, reflection) pass through."""

    def __init__(self, log_content: bool = False, forward_baggage: bool = False) -> None:
        self._log_content = log_content
        self._forward_baggage = forward_baggage
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
                _wrap_unary(method, handler.unary_unary, self._log_content, self._forward_baggage),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream, self._log_content, self._forward_baggage),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            return handler
        self._cache[full] = (handler, wrapped)
        return wrapped
