"""Python client library for inference.v1.InferenceService (over the generated stubs).

``AsyncInferenceClient`` (asyncio) and ``InferenceClient`` (blocking) offer the same calls and
options (:class:`ChatOptions`); the target, API key and CA default to ``INFERENCE_TARGET``,
``INFERENCE_API_KEY`` and ``INFERENCE_CA_FILE``. Errors are this package's own
(:class:`InferenceError` and subclasses): callers never import grpc. ``python -m clients`` is
the command line.
"""

from importlib import metadata as _metadata

from clients.client import AsyncInferenceClient, ChatStream
from clients.connection import DEFAULT_TARGET, Connection, resolve_connection
from clients.errors import (
    AuthenticationError,
    CancelledError,
    ClientConfigError,
    DeadlineExceededError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    StreamInterruptedError,
    UnavailableError,
)
from clients.options import ChatOptions, MessageLike, RetryPolicy
from clients.sync_client import InferenceClient, SyncChatStream
from clients.types import Attempt, ChatResult, Health, ProviderHealth, Usage

try:
    __version__ = _metadata.version("inference-gateway")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_TARGET",
    "AsyncInferenceClient",
    "Attempt",
    "AuthenticationError",
    "CancelledError",
    "ChatOptions",
    "ChatResult",
    "ChatStream",
    "ClientConfigError",
    "Connection",
    "DeadlineExceededError",
    "Health",
    "InferenceClient",
    "InferenceError",
    "InvalidRequestError",
    "MessageLike",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "ProviderHealth",
    "RateLimitedError",
    "RetryPolicy",
    "StreamInterruptedError",
    "SyncChatStream",
    "UnavailableError",
    "Usage",
    "__version__",
    "resolve_connection",
]
