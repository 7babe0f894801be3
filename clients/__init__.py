"""Python client library for inference.v1.InferenceService (over the generated stubs)."""

from clients.client import AsyncInferenceClient, ChatStream, InferenceClient, SyncChatStream
from clients.errors import (
    AuthenticationError,
    CancelledError,
    DeadlineExceededError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    StreamInterruptedError,
    UnavailableError,
)
from clients.types import Attempt, ChatResult, Health, ProviderHealth, Usage

__all__ = [
    "AsyncInferenceClient",
    "Attempt",
    "AuthenticationError",
    "CancelledError",
    "ChatResult",
    "ChatStream",
    "DeadlineExceededError",
    "Health",
    "InferenceClient",
    "InferenceError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "ProviderHealth",
    "RateLimitedError",
    "StreamInterruptedError",
    "SyncChatStream",
    "UnavailableError",
    "Usage",
]
