"""What a chat call can be asked to do, shared by the sync and async clients and the CLI.

:class:`ChatOptions` is the one list of per-call options: both clients take them as keyword
arguments (``client.chat("Hi", max_tokens=32)``), and :func:`build_request` is the one place they
become a request message. Adding an option means a key here and a line in :func:`build_request`;
every client and the CLI then carry it.

:class:`RetryPolicy` decides whether and when a failed call is tried again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar

from inference.v1 import inference_pb2 as pb

from clients import agent
from clients.agent import ImageLike, ResponseFormatLike, ToolLike
from clients.errors import InferenceError, RateLimitedError, UnavailableError

DEFAULT_TIMEOUT_S = 120.0

MessageLike = tuple[str, str] | Mapping[str, Any]
"""A conversation turn: ``("user", "Hi")`` or a dict with ``role`` and ``content``, plus
``images`` (user turns: paths or URLs), ``tool_calls`` (assistant turns: :class:`~clients.ToolCall`
or dicts; ``ChatResult.as_message()`` writes one) or ``tool_call_id`` (``"tool"`` turns, the result
of that call; ``ToolCall.result(...)`` writes one)."""

_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}
_MESSAGE_KEYS = frozenset({"role", "content", "images", "tool_calls", "tool_call_id"})

RequestT = TypeVar("RequestT", pb.ChatRequest, pb.ChatStreamRequest)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed call is tried again: never after text arrived, always inside its timeout.

    Attributes:
        max_retries: Retries after the first try (0 turns retrying off).
        initial_delay_s: First backoff; doubles per retry, with full jitter.
        max_delay_s: Largest backoff.
        retry_rate_limited: Also retry ``RESOURCE_EXHAUSTED`` (rate limits, admission control),
            but only when the server said how long to wait (``google.rpc.RetryInfo``), and after
            that delay. Off by default: a caller over its quota usually wants to know at once.
    """

    max_retries: int = 3
    initial_delay_s: float = 0.25
    max_delay_s: float = 4.0
    retry_rate_limited: bool = False

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.initial_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("RetryPolicy values must not be negative")

    def delay_s(self, err: InferenceError, retry: int, deadline: float) -> float | None:
        """Seconds to wait before retry number ``retry + 1``, or None to give up.

        Args:
            err: The failure.
            retry: Retries made so far.
            deadline: ``time.monotonic()`` at which the call's timeout ends.

        Returns:
            The delay, or None: not retryable, out of retries, or the delay would pass the deadline.
        """
        if retry >= self.max_retries:
            return None
        if type(err) is UnavailableError:  # not StreamInterruptedError: text already arrived
            delay = err.retry_after_s if err.retry_after_s is not None else self._backoff_s(retry)
        elif isinstance(err, RateLimitedError) and self.retry_rate_limited and err.retry_after_s is not None:
            # Without RetryInfo, RESOURCE_EXHAUSTED may be gRPC's own "message too large": no retry.
            delay = err.retry_after_s
        else:
            return None
        return None if time.monotonic() + delay >= deadline else delay

    def _backoff_s(self, retry: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.initial_delay_s * 2**retry))


class ChatOptions(TypedDict, total=False):
    """Per-call options of ``chat`` and ``chat_stream`` (all optional).

    Attributes:
        messages: Earlier turns, oldest first; the prompt (if any) is appended as a user turn.
        system: A system message put first.
        model: Model or catalogue name; the service's default when unset.
        temperature: Sampling temperature.
        top_p: Nucleus sampling.
        max_tokens: Cap on generated tokens.
        stop: Stop sequences.
        seed: Sampling seed (providers that support it).
        wait_for_cold_start: True waits for a cold provider within the timeout; False is served
            by the next provider at once; unset follows the service's COLD_START_POLICY.
        timeout_s: The whole call's timeout, retries included; the client's default when unset.
        retry: This call's retry policy; the client's when unset.
        tools: Functions the model may call: :class:`~clients.Tool` or dicts
            (``{"name", "description", "parameters"}``; OpenAI's shape works too).
        tool_choice: ``"auto"``, ``"none"``, ``"required"``, or the name of the function to call.
        response_format: Structured output: a JSON Schema dict, a pydantic model class (then
            ``result.parsed`` is an instance of it), or ``"json_object"``.
        images: Images sent with the prompt: file paths (inlined as base64 data URLs),
            ``https:`` URLs or ``data:`` URLs.
        metadata: The caller's tags, kept with the call's usage record (never sent to a model).
    """

    messages: Sequence[MessageLike]
    system: str | None
    model: str | None
    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    stop: Sequence[str] | None
    seed: int | None
    wait_for_cold_start: bool | None
    timeout_s: float | None
    retry: RetryPolicy | None
    tools: Sequence[ToolLike] | None
    tool_choice: str | None
    response_format: ResponseFormatLike | None
    images: Sequence[ImageLike] | None
    metadata: Mapping[str, str] | None


CHAT_OPTION_NAMES = frozenset(ChatOptions.__annotations__)


def check_options(options: Mapping[str, Any]) -> None:
    """Rejects unknown option names (a typo such as ``max_token=`` would otherwise be ignored).

    Raises:
        TypeError: An option is not one of :class:`ChatOptions`.
    """
    unknown = sorted(set(options) - CHAT_OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown chat option(s) {', '.join(unknown)}; known: {', '.join(sorted(CHAT_OPTION_NAMES))}")


def build_request(message_type: type[RequestT], prompt: str | None, options: ChatOptions) -> RequestT:
    """Turns a prompt and options into a ``ChatRequest`` or ``ChatStreamRequest``.

    Args:
        message_type: ``pb.ChatRequest`` or ``pb.ChatStreamRequest`` (same fields).
        prompt: The user's message, appended last; None when ``messages`` holds it all.
        options: The call's options.

    Returns:
        The request message.

    Raises:
        TypeError: An unknown option, or a tool or response format of the wrong kind.
        ValueError: A message with an unknown role or key, or an image that cannot be sent.
        OSError: An image file cannot be read.
    """
    check_options(options)
    fields: dict[str, Any] = {"messages": _messages(prompt, options), "model": options.get("model") or ""}
    for key in ("temperature", "top_p", "max_tokens", "seed"):
        value = options.get(key)
        if value is not None:
            fields[key] = value
    stop = options.get("stop")
    if stop:
        fields["stop"] = list(stop)
    wait = options.get("wait_for_cold_start")
    if wait is not None:
        fields["cold_start_policy"] = pb.COLD_START_POLICY_WAIT if wait else pb.COLD_START_POLICY_FALLBACK
    tools = options.get("tools")
    if tools:
        fields["tools"] = [agent.tool_message(t) for t in tools]
    choice = options.get("tool_choice")
    if choice:
        fields["tool_choice"] = agent.tool_choice_message(choice)
    fmt = options.get("response_format")
    if fmt is not None:
        fields["response_format"] = agent.response_format_message(fmt)
    tags = options.get("metadata")
    if tags:
        fields["metadata"] = dict(tags)
    return message_type(**fields)


def _messages(prompt: str | None, options: ChatOptions) -> list[pb.Message]:
    out: list[pb.Message] = []
    system = options.get("system")
    if system:
        out.append(pb.Message(role=pb.ROLE_SYSTEM, content=system))
    for m in options.get("messages") or ():
        out.append(_message(m) if isinstance(m, Mapping) else _message({"role": m[0], "content": m[1]}))
    images = options.get("images")
    if prompt is not None or images:
        out.append(_message({"role": "user", "content": prompt or "", "images": images or ()}))
    return out


def _message(m: Mapping[str, Any]) -> pb.Message:
    unknown = sorted(set(m) - _MESSAGE_KEYS)
    if unknown:
        raise ValueError(f"unknown message key(s) {', '.join(unknown)}; known: {', '.join(sorted(_MESSAGE_KEYS))}")
    role = m.get("role")
    if role not in _ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(_ROLES)}")
    content = m.get("content") or ""
    message = pb.Message(role=_ROLES[role], tool_call_id=m.get("tool_call_id") or "")
    images = m.get("images")
    if images:
        message.parts.extend(agent.image_parts(content, images))  # parts and content are exclusive
    else:
        message.content = content
    message.tool_calls.extend(agent.tool_call_message(c) for c in m.get("tool_calls") or ())
    return message
