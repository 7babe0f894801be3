"""The one table from domain errors to gRPC status codes, with google.rpc rich details.

Kept apart from :mod:`service.errors` so that providers, which raise those errors, never import
gRPC. Every status carries an ``ErrorInfo`` (stable reason, domain ``inference.v1``, metadata);
caller mistakes add ``BadRequest`` field violations; retryable conditions add ``RetryInfo``.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.errors import (
    AllProvidersFailedError,
    DeadlineExceededError,
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    ProviderError,
    ResourceExhaustedError,
    StreamInterruptedError,
    UnauthenticatedError,
)
from service.guard.redaction import redact

ERROR_DOMAIN = "inference.v1"

# Most specific first: the first matching class decides the code.
STATUS_TABLE: list[tuple[type[GatewayError], grpc.StatusCode]] = [
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (StreamInterruptedError, grpc.StatusCode.UNAVAILABLE),
    (AllProvidersFailedError, grpc.StatusCode.UNAVAILABLE),
    (ProviderError, grpc.StatusCode.UNAVAILABLE),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
]

# Seconds a caller should wait before retrying after every provider failed, when no upstream said;
# an upstream's Retry-After (the longest seen) replaces it, up to the cap.
ALL_FAILED_RETRY_S = 1.0
RETRY_INFO_MAX_S = 300.0


def _retry_delay_s(hint: float | None) -> float:
    return ALL_FAILED_RETRY_S if hint is None else min(max(hint, ALL_FAILED_RETRY_S), RETRY_INFO_MAX_S)


def code_for(error: GatewayError) -> grpc.StatusCode:
    """The gRPC code for a domain error."""
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _retry_info(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return _pack(error_details_pb2.RetryInfo(retry_delay=delay))


def to_rpc_status(error: GatewayError) -> status_pb2.Status:
    """Builds the google.rpc.Status (code, message, details) for ``error``."""
    code = code_for(error)
    metadata: dict[str, str] = {}
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidRequestError) and error.violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=redact(v.description))
                        for v in error.violations
                    ]
                )
            )
        )
    if isinstance(error, AllProvidersFailedError):
        metadata = {name: err.reason for name, err in error.errors.items()}
        details.append(_retry_info(_retry_delay_s(error.retry_after_s)))
    elif isinstance(error, StreamInterruptedError):
        metadata = {"provider": error.provider, "cause": error.cause.reason, "deltas_sent": str(error.deltas_sent)}
        hint = error.cause.retry_after_s if isinstance(error.cause, ProviderError) else None
        details.append(_retry_info(_retry_delay_s(hint)))
    elif isinstance(error, ProviderError):
        metadata = {"provider": error.provider}
    if isinstance(error, ResourceExhaustedError):
        details.append(_retry_info(error.retry_after_s))
        if error.quota is not None:
            subject, quota_id, description = error.quota
            violation = error_details_pb2.QuotaFailure.Violation(
                subject=subject, quota_id=quota_id, description=description
            )
            details.append(_pack(error_details_pb2.QuotaFailure(violations=[violation])))
    details.insert(0, _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)))
    # An upstream may echo a credential in its error text; callers never see one.
    return status_pb2.Status(code=getattr(code_pb2, code.name), message=redact(error.message), details=details)


def to_grpc_status(error: GatewayError) -> grpc.Status:
    """The status object ``context.abort_with_status`` takes."""
    return rpc_status.to_status(to_rpc_status(error))
