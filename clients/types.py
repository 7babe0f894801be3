"""Plain result types of the client library (no protobuf in callers' hands)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import date
from typing import Any

_UNPARSED: Any = object()


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Attempt:
    """One provider try; ``error_reason`` is empty for the one that served."""

    provider: str
    error_reason: str
    error_message: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call (``tools=[Tool(...)]``; a dict with the same keys works too).

    Attributes:
        name: 1 to 64 letters, digits, ``_`` or ``-``.
        description: What it does, for the model.
        parameters: Its arguments as a JSON Schema object, or a pydantic model class (its
            ``model_json_schema()``); no arguments when None.
        strict: Ask the provider to make the arguments fit the schema exactly, where it can.
    """

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | type[Any] | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made.

    Attributes:
        id: The call's id; the tool's result answers it (see :meth:`result`).
        name: The function called.
        arguments: The arguments as JSON text (``"{}"`` when there are none).
    """

    id: str
    name: str
    arguments: str

    def args(self) -> Any:
        """The arguments decoded from JSON (a dict for every call the gateway returns).

        Raises:
            json.JSONDecodeError: The arguments are not JSON (only for calls built by hand).
        """
        return json.loads(self.arguments or "{}")

    def result(self, content: Any) -> dict[str, str]:
        """The ``ROLE_TOOL`` message answering this call, for ``messages=``.

        Args:
            content: The tool's output; anything but a str is sent as its JSON text.
        """
        text = content if isinstance(content, str) else json.dumps(content)
        return {"role": "tool", "tool_call_id": self.id, "content": text}


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a streamed tool call, as it arrived.

    Attributes:
        index: Which call of the answer, from 0 (text never shifts it).
        id: The call's id; on the first fragment of a call only.
        name: The function's name; on the first fragment of a call only.
        arguments: The next piece of the arguments' JSON text.
    """

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A complete answer.

    ``tool_calls`` holds the calls the model made (``finish_reason`` is then ``tool_calls``).
    With ``response_format`` the text is JSON the gateway checked against the schema, and
    :attr:`parsed` decodes it.
    """

    id: str
    model: str
    text: str
    finish_reason: str
    usage: Usage
    provider: str
    attempts: list[Attempt] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    _parse: Callable[[str], Any] | None = field(default=None, repr=False, compare=False)
    _parsed: Any = field(default=_UNPARSED, init=False, repr=False, compare=False)

    @property
    def parsed(self) -> Any:
        """The structured answer: an instance of the pydantic model given as ``response_format``,
        or the decoded JSON for a schema dict or ``"json_object"``; None without a response format
        or when the model answered with tool calls instead of text. Decoded once, on first use.

        Raises:
            ValueError: The text does not decode or validate (pydantic's ``ValidationError`` is
                one); the gateway's own schema check makes this rare (pydantic-only validators).
        """
        if self._parse is None or not self.text:
            return None
        if self._parsed is _UNPARSED:
            object.__setattr__(self, "_parsed", self._parse(self.text))  # frozen: cache once
        return self._parsed

    def as_message(self) -> dict[str, Any]:
        """This answer as the assistant turn of a conversation, for ``messages=`` (with its calls)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = list(self.tool_calls)
        return message

    def to_dict(self) -> dict[str, Any]:
        """The public fields as plain JSON-ready values (what ``--json`` prints)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["usage"] = asdict(self.usage)
        out["attempts"] = [asdict(a) for a in self.attempts]
        out["tool_calls"] = [asdict(c) for c in self.tool_calls]
        return out


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One provider's own model id for a catalogue name."""

    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """A name a request's ``model`` may use, and where it is routed (in chain order)."""

    name: str
    routes: list[ModelRoute]


@dataclass(frozen=True, slots=True)
class ProviderHealth:
    """One provider's state as the service sees it."""

    name: str
    kind: str
    endpoint: str
    model: str
    state: str
    circuit_state: str
    warmth: str
    last_error: str
    last_latency_s: float | None


@dataclass(frozen=True, slots=True)
class Health:
    """The service's health."""

    status: str
    providers: list[ProviderHealth]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """The usage of one group, from the gateway's ledger (``client.usage(...)``).

    A dimension the rows were not grouped by is None. An empty ``tenant`` is cost booked to no
    tenant (a GPU provider's idle time until it scales down); an empty ``provider`` is calls
    that never reached one (refused or invalid requests).

    Attributes:
        tenant: The tenant, when grouped by tenant.
        provider: The provider, when grouped by provider.
        model: The served model, when grouped by model.
        day: The calendar day (UTC), when grouped by day.
        requests: Calls recorded (idle time adds cost, not requests).
        failed_requests: Calls that ended with a status other than OK.
        prompt_tokens: Prompt tokens.
        completion_tokens: Completion tokens.
        cost_usd: Estimated cost in US dollars (docs/cost.md).
    """

    tenant: str | None = None
    provider: str | None = None
    model: str | None = None
    day: date | None = None
    requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (what ``usage --json`` prints): the day as YYYY-MM-DD."""
        out = asdict(self)
        out["day"] = self.day.isoformat() if self.day is not None else None
        return out
