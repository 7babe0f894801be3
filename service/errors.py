"""The gateway's error tree.

Every failure the service can report is one of these; lower-layer exceptions (httpx, the
anthropic SDK, asyncio timeouts) are translated into them in exactly one place per provider, with
``raise ... from exc`` so the cause survives in logs. The gRPC translation (status code, message,
google.rpc details) lives in :mod:`service.api.status`, so that providers, which raise these errors,
never import gRPC.

::

    GatewayError
    ├── InvalidRequestError          the caller's mistake; never retried, never sent elsewhere
    ├── ModelNotFoundError           no provider serves the requested model
    ├── ProviderError                one upstream failed (carries .provider)
    │   ├── ProviderUnavailableError     connect error, reset, 429, 5xx  (retryable)
    │   ├── ProviderTimeoutError         no first token / stalled stream in time
    │   ├── ProviderProtocolError        malformed SSE, in-band error, truncated stream
    │   ├── ProviderAuthError            the gateway's credentials were refused (opens the circuit)
    │   ├── ProviderModelNotFoundError   this upstream does not serve the model
    │   └── SchemaViolationError         the answer does not fit the caller's response_format
    ├── AllProvidersFailedError      every provider in the chain failed; carries {provider: error}
    ├── StreamInterruptedError       the upstream failed after tokens were sent; never spliced
    ├── ResourceExhaustedError       admission control or rate limit; carries retry_after_s
    ├── DeadlineExceededError        the caller's deadline left no time for an attempt
    ├── UnauthenticatedError         missing or wrong API key
    └── PermissionDeniedError        a valid key without the needed role
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error the gateway reports.

    Attributes:
        reason: A stable UPPER_SNAKE identifier, sent as google.rpc.ErrorInfo.reason.
        message: A sentence that says what happened and what to do about it.
    """

    reason = "GATEWAY_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, as in google.rpc.BadRequest."""

    field: str
    description: str


class InvalidRequestError(GatewayError):
    """The request cannot be served as written; the caller must change it."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.violations = violations or []

    @classmethod
    def upstream(cls, provider: str, text: str) -> InvalidRequestError:
        """An upstream's 400: names the request field its message points at, so callers get a
        google.rpc.BadRequest like for the gateway's own checks (``messages`` for context length)."""
        low = text.lower()
        field = next((f for f in ("max_tokens", "temperature", "top_p", "stop", "seed") if f in low), "")
        if not field:
            long_context = any(w in low for w in ("context", "too long", "prompt", "token"))
            field = "messages" if long_context else "request"
        message = f"{provider} rejected the request: {text}"
        return cls(message, [FieldViolation(field, text)])

    @classmethod
    def from_violations(cls, violations: list[FieldViolation]) -> InvalidRequestError:
        """Builds one error naming every bad field."""
        text = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(f"invalid request: {text}", violations)


class ModelNotFoundError(GatewayError):
    """No provider in the chain serves the requested model."""

    reason = "MODEL_NOT_FOUND"


class ProviderError(GatewayError):
    """One upstream provider failed.

    Attributes:
        provider: The provider's name in the chain (e.g. ``modal``).
        retryable: Whether trying the same provider again may succeed.
        retry_after_s: The upstream's Retry-After hint, if it gave one.
    """

    reason = "PROVIDER_ERROR"
    retryable = False

    def __init__(self, provider: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.retry_after_s = retry_after_s


class ProviderUnavailableError(ProviderError):
    """Connection refused or reset, 429 or 5xx: the upstream may answer if asked again.

    ``connect_failed`` marks a connection that could not even be made (host down or refusing):
    the router then falls back at once when another provider is left, instead of retrying.
    """

    reason = "PROVIDER_UNAVAILABLE"
    retryable = True

    def __init__(
        self, provider: str, message: str, *, retry_after_s: float | None = None, connect_failed: bool = False
    ) -> None:
        super().__init__(provider, message, retry_after_s=retry_after_s)
        self.connect_failed = connect_failed


class ProviderTimeoutError(ProviderError):
    """The upstream did not produce its first token, or the next one, in time."""

    reason = "PROVIDER_TIMEOUT"


class ProviderProtocolError(ProviderError):
    """The upstream answered but broke the protocol (bad SSE, in-band error, no finish)."""

    reason = "PROVIDER_PROTOCOL_ERROR"


class ProviderAuthError(ProviderError):
    """The upstream refused the gateway's credentials: an operator must fix configuration."""

    reason = "PROVIDER_AUTH"


class ProviderModelNotFoundError(ProviderError):
    """This upstream does not serve the model that was asked for."""

    reason = "PROVIDER_MODEL_NOT_FOUND"

    def __init__(self, provider: str, message: str, *, model: str, served: list[str]) -> None:
        super().__init__(provider, message)
        self.model = model
        self.served = served


class AllProvidersFailedError(GatewayError):
    """Every provider tried failed; ``errors`` maps each provider to its last error."""

    reason = "ALL_PROVIDERS_FAILED"

    def __init__(self, errors: dict[str, GatewayError], *, retry_after_s: float | None = None) -> None:
        parts = "; ".join(f"{name}: {err.reason}: {err.message}" for name, err in errors.items())
        super().__init__(f"all providers failed ({parts or 'no provider could be tried'})")
        self.errors = errors
        self.retry_after_s = retry_after_s  # the longest Retry-After an upstream sent, if any


class StreamInterruptedError(GatewayError):
    """The serving provider failed after tokens reached the caller.

    The stream is ended, never continued on another provider: splicing two models' output would
    corrupt the answer silently. The caller knows exactly how much it received.
    """

    reason = "STREAM_INTERRUPTED"

    def __init__(self, provider: str, cause: GatewayError, deltas_sent: int) -> None:
        super().__init__(
            f"provider {provider!r} failed after {deltas_sent} deltas were sent "
            f"({cause.reason}: {cause.message}); the partial answer is incomplete, retry the call"
        )
        self.provider = provider
        self.cause = cause
        self.deltas_sent = deltas_sent


class ResourceExhaustedError(GatewayError):
    """Too many calls in flight or a rate limit reached; retry after ``retry_after_s``."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        retry_after_s: float,
        *,
        reason: str | None = None,
        quota: tuple[str, str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.quota = quota  # (subject, quota id, description) for a google.rpc.QuotaFailure
        if reason:
            self.reason = reason


class DeadlineExceededError(GatewayError):
    """The caller's deadline passed, or left too little time to start another attempt."""

    reason = "DEADLINE_EXCEEDED"


class UnauthenticatedError(GatewayError):
    """The call carried no valid API key."""

    reason = "UNAUTHENTICATED"


class PermissionDeniedError(GatewayError):
    """The key is valid but lacks the role this call needs."""

    reason = "PERMISSION_DENIED"


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


class SchemaViolationError(ProviderError):
    """The provider's answer does not fit the caller's ``response_format``.

    For Chat it is that provider's failure and the call falls back (never retried on the same
    provider, never counted against its health: the model answered, just not as asked). For
    ChatStream, where text already reached the caller, it ends the stream (UNAVAILABLE).
    """

    reason = "SCHEMA_VIOLATION"
    retryable = False
