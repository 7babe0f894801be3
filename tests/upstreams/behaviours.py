"""Behaviours the fake upstreams can be scripted with: one frozen dataclass per fault or answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# ----------------------------------------------------------------------------- behaviours


def token_text(i: int) -> str:
    """Text of generated token ``i`` (``"tok0 "``, ``"tok1 "``, ...), used by every behaviour."""
    return f"tok{i} "


def expected_text(n: int) -> str:
    """The content the fakes produce for ``n`` generated tokens."""
    return "".join(token_text(i) for i in range(n))


@dataclass(frozen=True)
class Ok:
    """A normal answer: ``tokens`` (or ``n_tokens`` generated ``tokN`` tokens), one per SSE delta.

    ``delay_s_between_tokens`` sleeps between deltas (unary: ``delay * n`` before answering).
    A request ``max_tokens`` below the token count truncates and reports ``length``.
    ``model`` overrides the model echoed in the response. ``finish_in_last_chunk`` (OpenAI only)
    puts ``finish_reason`` on the last content delta, as vLLM does, instead of a separate chunk.
    """

    tokens: Sequence[str] | None = None
    n_tokens: int = 4
    delay_s_between_tokens: float = 0.0
    finish_reason: str = "stop"
    model: str | None = None
    finish_in_last_chunk: bool = False

    def __post_init__(self) -> None:
        """Freeze ``tokens`` into a tuple so the behaviour stays hashable."""
        if self.tokens is not None:
            object.__setattr__(self, "tokens", tuple(self.tokens))

    def token_list(self) -> list[str]:
        """The content deltas this behaviour produces."""
        if self.tokens is not None:
            return list(self.tokens)
        return [token_text(i) for i in range(self.n_tokens)]


@dataclass(frozen=True)
class Status:
    """Answer ``code`` at once (500/502/503/429/401/403...).

    ``body``: dict -> JSON, str/bytes -> raw (``content_type`` defaults to text/plain); None -> the
    provider's own error body for that code. ``retry_after_s`` adds a ``Retry-After`` header;
    ``headers`` adds any others (e.g. ``(("location", "https://..."),)`` for Modal's 303).
    """

    code: int
    body: dict[str, Any] | str | bytes | None = None
    retry_after_s: float | None = None
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class UnknownModel:
    """404 for the requested model (vLLM ``The model `X` does not exist.``; Anthropic not_found)."""


@dataclass(frozen=True)
class ContextTooLong:
    """400 context overflow: vLLM's "maximum context length is ..." / "prompt is too long"."""


@dataclass(frozen=True)
class Overloaded:
    """Anthropic 529 ``overloaded_error``; on FakeOpenAI a 503 error."""


@dataclass(frozen=True)
class ResetBeforeResponse:
    """Read the request, then drop the connection without a byte (``rst``: TCP RST, else FIN)."""

    rst: bool = True


@dataclass(frozen=True)
class ResetAfter:
    """Stream: preamble + ``n_chunks`` content deltas, then drop the TCP connection.

    Unary: headers (full Content-Length) and half the body, then drop it.
    """

    n_chunks: int = 1
    rst: bool = True


@dataclass(frozen=True)
class StallBeforeFirstToken:
    """Wait ``seconds`` before the first token, then answer like ``then``.

    Streams send the response head first (as vLLM does) unless ``send_headers`` is False, in which
    case nothing at all is sent during the stall.
    """

    seconds: float
    send_headers: bool = True
    then: Ok = Ok()


@dataclass(frozen=True)
class StallAfter:
    """Stream: send ``n_chunks`` deltas, stall ``seconds``, then finish like ``then``.

    ``then`` defaults to ``Ok(n_tokens=n_chunks + 2)``. Unary: stall, then answer.
    """

    n_chunks: int
    seconds: float
    then: Ok | None = None


@dataclass(frozen=True)
class MalformedSSE:
    """Stream: ``after_n_chunks`` deltas, then ``data: {not json`` and a clean end of the body.

    Unary: HTTP 200 with a body that is not JSON.
    """

    after_n_chunks: int = 0


@dataclass(frozen=True)
class InBandError:
    """Stream: ``after_n_chunks`` deltas then an in-band error with HTTP 200.

    vLLM: ``data: {"error": {...}}`` + ``data: [DONE]``; Anthropic: ``event: error``. Unary: a 500
    error with ``message``. ``error_type`` defaults to the provider's internal-error type.
    """

    after_n_chunks: int = 0
    message: str = "internal engine error"
    error_type: str | None = None


@dataclass(frozen=True)
class EndWithoutFinish:
    """Stream: ``n_chunks`` deltas, then a clean end with no finish_reason / stop_reason.

    OpenAI: ``data: [DONE]`` without a finish chunk; Anthropic: content_block_stop + message_stop
    without message_delta. Unary: finish_reason / stop_reason null.
    """

    n_chunks: int = 1


@dataclass(frozen=True)
class ToolFragment:
    """One ``delta.tool_calls`` entry as vLLM streams it: ``index``, then ``id``/``name`` on a call's
    first fragment and ``arguments`` text after (empty strings are left out of the chunk)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class ToolCalls:
    """An answer that calls tools, streamed step by step (OpenAI fakes only).

    Each step is one SSE chunk: a ``str`` is a content delta, a :class:`ToolFragment` one tool-call
    fragment, a tuple of fragments one chunk carrying them all. The finish reason comes in its own
    chunk. Unary: the assembled message (content null when there is no text; arguments joined per
    call). Build the usual case with :meth:`of`.
    """

    steps: Sequence[str | ToolFragment | tuple[ToolFragment, ...]]
    finish_reason: str = "tool_calls"

    def __post_init__(self) -> None:
        """Freeze ``steps`` into a tuple so the behaviour stays hashable."""
        object.__setattr__(self, "steps", tuple(self.steps))

    @classmethod
    def of(cls, *calls: tuple[str, str, str], piece: int = 0, text: str = "") -> ToolCalls:
        """Calls ``(id, name, arguments)`` one after another: ``text`` first if any, then per call a
        fragment with id and name and the arguments in ``piece``-character fragments (0: whole)."""
        steps: list[str | ToolFragment | tuple[ToolFragment, ...]] = [text] if text else []
        for i, (call_id, name, arguments) in enumerate(calls):
            steps.append(ToolFragment(i, call_id, name))
            size = piece or len(arguments) or 1
            steps += [ToolFragment(i, arguments=arguments[j : j + size]) for j in range(0, len(arguments), size)]
        return cls(steps)

    def assembled(self) -> tuple[str, list[dict[str, str]]]:
        """(text, [{"id", "name", "arguments"}]) as a client assembles the stream (arguments as sent)."""
        text, calls = "", {}
        for step in self.steps:
            if isinstance(step, str):
                text += step
                continue
            for f in step if isinstance(step, tuple) else (step,):
                call = calls.setdefault(f.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = call["id"] or f.id
                call["name"] = call["name"] or f.name
                call["arguments"] += f.arguments
        return text, [calls[i] for i in sorted(calls)]


Behaviour = (
    Ok
    | Status
    | UnknownModel
    | ContextTooLong
    | Overloaded
    | ResetBeforeResponse
    | ResetAfter
    | StallBeforeFirstToken
    | StallAfter
    | MalformedSSE
    | InBandError
    | EndWithoutFinish
    | ToolCalls
)
