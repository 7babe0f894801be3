"""Tracing helpers for routing decisions (OpenTelemetry API; exporters are set up in otel_setup).

Span tree per RPC::

    <gRPC server span>                       (server interceptor)
      route Chat | route ChatStream          INTERNAL: chain, policy, skips, fallbacks, outcome
        chat {model}                         CLIENT, one per provider attempt, GenAI semconv
        chat {model}                         ...

Spans of a stream live across ``yield``s, so they are never *attached* to the context there
(a context token cannot be detached in another context); the route span is the explicit parent
of each attempt span, and an attempt span is attached only around the awaits that send its
request, so outgoing HTTP carries its ``traceparent``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from service.guard.redaction import redact, strip_userinfo
from service.observe import metrics
from service.providers.base import ChatRequest, Provider, Usage

tracer = trace.get_tracer("inference-gateway")


def tracing_enabled() -> bool:
    """Whether an SDK tracer provider is installed. Without one every span would be a no-op, so
    the hot path skips building them (attribute dicts, context attach) altogether."""
    try:
        # The API's module state: get_tracer_provider() reads os.environ on every call until a
        # provider is installed (~1 us, several times per RPC on a gateway without tracing).
        provider = trace._TRACER_PROVIDER
    except AttributeError:  # a future API without the module global: the public, slower way
        provider = trace.get_tracer_provider()
    return provider is not None and not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


# gen_ai.provider.name: the semantic conventions' value where one exists (anthropic), else the
# server software, as the conventions ask for OpenAI-compatible servers that are not OpenAI.
_PROVIDER_KIND_TO_SEMCONV = {"vllm": "vllm", "llama.cpp": "llama.cpp", "anthropic": "anthropic"}
# Codes that are the caller's doing: the call is answered as designed, so no span says ERROR
# (OpenTelemetry's rule for gRPC servers).
CALLER_ERRORS = frozenset(
    {"InvalidRequestError", "ModelNotFoundError", "PermissionDeniedError", "UnauthenticatedError"}
)


def provider_system(provider: Provider) -> str:
    """The ``gen_ai.provider.name`` value for ``provider``."""
    return _PROVIDER_KIND_TO_SEMCONV.get(provider.kind, provider.kind)


@dataclass(slots=True)
class RpcStats:
    """Per-RPC figures filled in by the router and read by the server interceptor (access log,
    overhead metric and trailing metadata). gRPC-free, so the router can fill it."""

    upstream_s: float = 0.0  # time spent awaiting provider calls
    wait_s: float = 0.0  # time spent waiting on purpose: backoff, Retry-After, a cold start
    provider: str = ""
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False  # the serving provider reported usage (else the tokens are unknown)
    relayed_chars: int = 0  # characters of answer relayed to the caller (a cancelled call's consumption)
    started: int = 0  # attempts whose request went to a provider (0: no upstream saw the call)
    answer_began: bool = False  # some attempt received the first part of an answer
    cost_usd: float = 0.0  # estimated cost of every attempt (the ledger's record)
    served_model: str = ""  # the provider's model id that answered
    ttft_s: float | None = None  # time to the first token of the answer that was served
    attempt_outcomes: tuple[tuple[str, str], ...] = ()  # (provider, "ok" or the error reason) per attempt


current_rpc: ContextVar[RpcStats | None] = ContextVar("current_rpc", default=None)


_NOTHING = nullcontext()


class AttemptSpan:
    """The CLIENT span of one provider attempt, with GenAI semantic-convention attributes."""

    __slots__ = ("_model", "_provider", "_started", "_stats", "_system", "span")

    def __init__(
        self,
        parent: Span,
        provider: Provider,
        request: ChatRequest,
        retry: int,
        wait_cold: bool,
        stats: RpcStats | None = None,
    ) -> None:
        model = request.model or provider.default_model
        self._model = model
        self._provider = provider
        self._system = provider_system(provider)
        self._stats = stats
        self._started = time.perf_counter()
        if not parent.is_recording():
            self.span: Span = trace.INVALID_SPAN
            return
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._system,
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": request.max_tokens,
            "gateway.provider": provider.name,
            "gateway.retry": retry,
            "gateway.wait_cold": wait_cold,
        }
        if request.temperature is not None:
            attrs["gen_ai.request.temperature"] = request.temperature
        if request.top_p is not None:
            attrs["gen_ai.request.top_p"] = request.top_p
        if request.seed is not None:
            attrs["gen_ai.request.seed"] = request.seed
        host, port = _split_endpoint(provider.endpoint)
        if host:
            attrs["server.address"] = host
        if port:
            attrs["server.port"] = port
        ctx = trace.set_span_in_context(parent)
        self.span = tracer.start_span(f"chat {model}", context=ctx, kind=SpanKind.CLIENT, attributes=attrs)

    def current(self) -> AbstractContextManager[None]:
        """Attaches this span around awaits that send the upstream request (traceparent)."""
        if self.span is trace.INVALID_SPAN:
            return _NOTHING  # tracing off: no generator-based context manager per call
        return self._attached()

    @contextmanager
    def _attached(self) -> Iterator[None]:
        token = otel_context.attach(trace.set_span_in_context(self.span))
        try:
            yield
        finally:
            otel_context.detach(token)

    def first_chunk(self) -> None:
        """Marks the time to first chunk."""
        ttft = time.perf_counter() - self._started
        if self._stats is not None:
            self._stats.answer_began = True
        self.span.set_attribute("gen_ai.response.time_to_first_chunk", ttft)
        metrics.record_ttft(self._provider.name, self._system, self._model, ttft)

    def succeeded(self, response_id: str, model: str, finish_reason: str, usage: Usage) -> None:
        """Records the response attributes, and the usage when the upstream reported any."""
        reported = usage.total_tokens > 0  # an upstream that reports nothing leaves both at 0: unknown
        if self.span.is_recording():
            self._response_attributes(response_id, model, finish_reason, usage, reported)
        metrics.record_attempt(
            self._provider.name,
            self._system,
            self._model,
            time.perf_counter() - self._started,
            None,
            usage if reported else None,
        )

    def _response_attributes(
        self, response_id: str, model: str, finish_reason: str, usage: Usage, reported: bool
    ) -> None:
        attrs: dict[str, Any] = {
            "gen_ai.response.id": response_id,
            "gen_ai.response.model": model,
            "gen_ai.response.finish_reasons": [finish_reason],
        }
        if reported:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
        self.span.set_attributes(attrs)

    def failed(self, error: Exception | None) -> None:
        """Marks the attempt failed with ``error.type`` = the error's reason."""
        reason = getattr(error, "reason", type(error).__name__ if error else "unknown")
        self.span.set_attribute("error.type", reason)
        self.span.set_status(Status(StatusCode.ERROR, redact(str(error))[:300] if error else reason))
        metrics.record_attempt(
            self._provider.name, self._system, self._model, time.perf_counter() - self._started, reason, None
        )

    def end(self) -> None:
        """Ends the span (idempotent in the SDK)."""
        self.span.end()


class RouteTrace:
    """The routing span of one call: chain considered, skips, fallbacks, outcome."""

    __slots__ = ("_fallbacks", "_left", "_skips", "_stats", "span")

    def __init__(self, rpc: str, request: ChatRequest, chain: list[str], policy: str) -> None:
        self._skips: list[str] = []
        self._stats = current_rpc.get()
        self._fallbacks = 0
        self._left = ""  # the provider the last fallback left; counted when another one is tried
        if not tracing_enabled():
            self.span: Span = trace.INVALID_SPAN
            return
        self.span = tracer.start_span(
            f"route {rpc}",
            kind=SpanKind.INTERNAL,
            attributes={
                "gateway.chain": chain,
                "gateway.cold_start_policy": policy,
                "gen_ai.request.model": request.model or "",
            },
        )

    def __enter__(self) -> RouteTrace:
        """``with trace:`` ends the routing span when the call ends (never attached: see module docstring)."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.span.end()

    def attempt(self, provider: Provider, request: ChatRequest, retry: int, wait_cold: bool) -> AttemptSpan:
        """Starts an attempt span as a child of the routing span."""
        if self._stats is not None:
            self._stats.started += 1
        self._arrive(provider.name)
        return AttemptSpan(self.span, provider, request, retry, wait_cold, self._stats)

    def skip(self, provider: str, reason: str) -> None:
        """A provider was skipped (circuit open, unhealthy, cold)."""
        self._skips.append(f"{provider}:{reason}")
        self.span.set_attribute("gateway.skipped", self._skips)
        self.span.add_event("skip", {"provider": provider, "reason": reason})
        metrics.record_skip(provider, reason)

    def _arrive(self, provider: str) -> None:
        # A fallback is a change of provider, counted when the next one is really tried (an
        # attempt, or a wait for its cold start); retries of one provider are not fallbacks.
        if self._left and self._left != provider:
            self._fallbacks += 1
            metrics.record_fallback(self._left, provider)
        self._left = ""

    def event(self, name: str, **attrs: Any) -> None:
        """A routing decision: retry, fallback, wake_up, wait_cold_start, deadline_stop, last_resort."""
        if name == "fallback":
            self._left = str(attrs.get("provider", ""))
        elif name == "wait_cold_start":
            self._arrive(str(attrs.get("provider", "")))
        self.span.add_event(name, {k: v for k, v in attrs.items() if v is not None})

    def served(self, provider: str, attempts: int) -> None:
        """The call was served by ``provider`` after ``attempts`` tries."""
        self.span.set_attributes(
            {"gateway.served_by": provider, "gateway.attempts": attempts, "gateway.fallbacks": self._fallbacks}
        )

    def failed(self, error: Exception) -> None:
        """The call failed as a whole (ERROR status only when the failure is not the caller's)."""
        self.span.set_attributes(
            {"error.type": getattr(error, "reason", type(error).__name__), "gateway.fallbacks": self._fallbacks}
        )
        if type(error).__name__ not in CALLER_ERRORS:
            self.span.set_status(Status(StatusCode.ERROR, redact(str(error))[:300]))

    @staticmethod
    def note_circuit(provider: str, before: str, after: str, reason: str) -> None:
        """A circuit breaker changed state (recorded on the current span, if any; the state gauge
        reads the breakers themselves)."""
        trace.get_current_span().add_event(
            "circuit_transition", {"provider": provider, "from": before, "to": after, "reason": reason}
        )


_DEFAULT_PORTS = {"https": 443, "http": 80}


def _split_endpoint(endpoint: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` of a base URL: the host without credentials, and the
    port, the scheme's default when the URL names none (443 for https)."""
    try:
        parts = urlsplit(strip_userinfo(endpoint))
        port = parts.port
    except ValueError:
        return "", None
    return parts.hostname or "", port if port is not None else _DEFAULT_PORTS.get(parts.scheme.lower())
