"""Python client library for inference.v1.InferenceService (over the generated stubs).

``AsyncInferenceClient`` (asyncio) and ``InferenceClient`` (blocking) offer the same calls and
options (:class:`ChatOptions`); the target, API key and CA default to ``INFERENCE_TARGET``,
``INFERENCE_API_KEY`` and ``INFERENCE_CA_FILE``; ``load_balancing="round_robin"`` (or
``INFERENCE_LOAD_BALANCING``) spreads calls over every replica a target such as
``dns:///name:port`` resolves to. Errors are this package's own
(:class:`InferenceError` and subclasses): callers never import grpc. ``python -m clients`` is
the command line.

Agents: ``tools=``, ``tool_choice=``, ``response_format=`` (a JSON Schema dict or a pydantic model
class; ``result.parsed``), ``images=`` (paths or URLs) and ``metadata=``; answers carry
``tool_calls`` (:class:`ToolCall`, ``.args()``), and a tool's result goes back as
``messages=[..., result.as_message(), call.result(output)]``. ``stream.events()`` yields
tool-call fragments as they arrive; ``list_models()`` shows the model catalogue.

Spend: ``usage(since=, until=, by=("tenant", "provider", "day"), tenant=)`` returns the ledger's
:class:`UsageRow` list (requests, tokens, cost in USD) for an admin key, or a tenant key's own.
"""

from importlib import metadata as _metadata

from clients.agent import ImageLike, ResponseFormatLike, ToolLike, image_url
from clients.base import StreamEvent
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
from clients.types import (
    Attempt,
    CatalogModel,
    ChatResult,
    Health,
    ModelRoute,
    ProviderHealth,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageRow,
)

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
    "CatalogModel",
    "ChatOptions",
    "ChatResult",
    "ChatStream",
    "ClientConfigError",
    "Connection",
    "DeadlineExceededError",
    "Health",
    "ImageLike",
    "InferenceClient",
    "InferenceError",
    "InvalidRequestError",
    "MessageLike",
    "ModelNotFoundError",
    "ModelRoute",
    "PermissionDeniedError",
    "ProviderHealth",
    "RateLimitedError",
    "ResponseFormatLike",
    "RetryPolicy",
    "StreamEvent",
    "StreamInterruptedError",
    "SyncChatStream",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolLike",
    "UnavailableError",
    "Usage",
    "UsageRow",
    "__version__",
    "image_url",
    "resolve_connection",
]
