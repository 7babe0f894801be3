"""The client library's own error tree: callers never import grpc to catch errors.

::

    InferenceError                 .code (gRPC code name), .reason, .metadata, .retry_after_s
    ├── InvalidRequestError        INVALID_ARGUMENT; .field_violations {field: description}
    ├── ModelNotFoundError         NOT_FOUND
    ├── UnavailableError           UNAVAILABLE (every provider failed; retried by the client)
    │   └── StreamInterruptedError UNAVAILABLE after text was received; .deltas_sent
    ├── RateLimitedError           RESOURCE_EXHAUSTED
    ├── DeadlineExceededError      DEADLINE_EXCEEDED
    ├── AuthenticationError        UNAUTHENTICATED
    ├── PermissionDeniedError      PERMISSION_DENIED
    └── CancelledError             CANCELLED

    ClientConfigError (ValueError) the client cannot be set up (e.g. an unreadable CA file); no call made
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class ClientConfigError(ValueError):
    """The client's own configuration is unusable (raised before any call; not an InferenceError)."""


class InferenceError(Exception):
    """Any failed call."""

    def __init__(
        self,
        code: str,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
        field_violations: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.retry_after_s = retry_after_s
        self.field_violations = field_violations or {}


class InvalidRequestError(InferenceError):
    """The request must be changed; see ``field_violations``."""


class ModelNotFoundError(InferenceError):
    """No provider serves the requested model."""


class UnavailableError(InferenceError):
    """The service could not reach any provider; safe to retry."""


class StreamInterruptedError(UnavailableError):
    """The stream broke after text was received; the partial text is incomplete."""

    @property
    def deltas_sent(self) -> int:
        """How many deltas the server sent before the failure."""
        return int(self.metadata.get("deltas_sent", "0"))


class RateLimitedError(InferenceError):
    """Too many calls; wait ``retry_after_s``."""


class DeadlineExceededError(InferenceError):
    """The call's timeout passed."""


class AuthenticationError(InferenceError):
    """Missing or wrong API key."""


class PermissionDeniedError(InferenceError):
    """The key lacks the needed role."""


class CancelledError(InferenceError):
    """The call was cancelled."""


_BY_CODE: dict[grpc.StatusCode, type[InferenceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def from_rpc_error(exc: grpc.RpcError) -> InferenceError:
    """Translates a gRPC error (with google.rpc details when present) into the tree."""
    code = exc.code()
    message = exc.details() or ""
    reason, metadata, retry_after, violations = "", {}, None, {}
    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = {v.field: v.description for v in bad.field_violations}
    cls = _BY_CODE.get(code, InferenceError)
    if reason == "STREAM_INTERRUPTED":
        cls = StreamInterruptedError
    return cls(code.name, message, reason, metadata, retry_after, violations)
