"""Real, scriptable fake upstream HTTP servers for fault-injection tests.

``FakeOpenAI`` speaks vLLM's OpenAI-compatible API, ``FakeAnthropic`` the Messages API. Both run
on 127.0.0.1 in a background thread; script them with ``enqueue(...)`` / ``default`` and inspect
``requests`` / ``chat_requests``. See ``tests.upstreams.behaviours`` for the behaviours.
"""

from tests.upstreams.anthropic_server import FakeAnthropic
from tests.upstreams.base import (
    FakeUpstream,
)
from tests.upstreams.behaviours import (
    Behaviour,
    ContextTooLong,
    EndWithoutFinish,
    InBandError,
    MalformedSSE,
    Ok,
    Overloaded,
    ResetAfter,
    ResetBeforeResponse,
    StallAfter,
    StallBeforeFirstToken,
    Status,
    UnknownModel,
    expected_text,
    token_text,
)
from tests.upstreams.openai_server import FakeOpenAI
from tests.upstreams.wire import (
    RecordedRequest,
)

__all__ = [
    "Behaviour",
    "ContextTooLong",
    "EndWithoutFinish",
    "FakeAnthropic",
    "FakeOpenAI",
    "FakeUpstream",
    "InBandError",
    "MalformedSSE",
    "Ok",
    "Overloaded",
    "RecordedRequest",
    "ResetAfter",
    "ResetBeforeResponse",
    "StallAfter",
    "StallBeforeFirstToken",
    "Status",
    "UnknownModel",
    "expected_text",
    "token_text",
]
