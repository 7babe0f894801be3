"""Request validation: proto request -> domain ChatRequest, or one INVALID_ARGUMENT naming every
bad field. Runs before any provider is touched, so a caller's mistake costs no upstream call.

Every field is checked: message count, each role (proto3 enums are open, so any int can arrive)
and content (non-empty, no NUL, at most MAX_CONTENT_CHARS), the model id's length and alphabet,
temperature and top_p ranges (NaN and infinities included), max_tokens against MAX_TOKENS_CAP,
stop sequences, the seed, the cold-start policy, and the request's encoded size against
MAX_REQUEST_BYTES (gRPC enforces the same limit on the wire; this keeps the rule true however the
request arrived). Descriptions never quote the caller's text back, and at most
``MAX_VIOLATIONS`` are reported, so the error always fits in gRPC's trailing metadata.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any

from inference.v1 import inference_pb2 as pb

from service.api import agent_fields
from service.config import Settings
from service.errors import FieldViolation, InvalidRequestError
from service.providers.base import ChatMessage, ChatRequest, Role

_ROLES: dict[int, Role] = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}
_POLICIES = {
    pb.COLD_START_POLICY_UNSPECIFIED: None,
    pb.COLD_START_POLICY_FALLBACK: "fallback",
    pb.COLD_START_POLICY_WAIT: "wait",
}
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 200
MAX_MODEL_CHARS = 256
# Model ids travel in upstream URLs and JSON bodies: "Qwen/Qwen2.5-7B-Instruct", "claude-sonnet-4-5",
# "org/model:tag@rev". Anything else is far more likely a mistake (or an injection) than a model.
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]*")
# The range every upstream accepts: llama.cpp takes a uint32 seed, vLLM and OpenAI an int64.
MAX_SEED = 2**32 - 1
# A status travels in trailing metadata, which clients cap (8 KiB by default): keep it well inside.
MAX_VIOLATIONS = 20


def shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32 as ``value``.

    Proto ``float`` fields arrive widened to double (0.7 -> 0.699999988079071); upstreams should
    see what the caller wrote (0.7).
    """
    if not math.isfinite(value):
        return value
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.pack("<f", candidate) == packed:
                return candidate
        except OverflowError:  # rounding up past float32's largest value: try more digits
            continue
    return value


def _check_messages(request: Any, settings: Settings, bad: list[FieldViolation]) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    count = len(request.messages)
    if not count:
        bad.append(FieldViolation("messages", "at least one message is required"))
        return messages
    if count > settings.max_messages:
        bad.append(FieldViolation("messages", f"at most {settings.max_messages} messages are allowed, got {count}"))
        return messages
    call_ids: set[str] = set()
    for i, m in enumerate(request.messages):
        # Each proto field read is a C call that may build a wrapper object: read each once.
        role = _ROLES.get(m.role)
        if role is None:
            name = pb.Role.Name(m.role) if m.role in pb.Role.values() else str(m.role)
            bad.append(
                FieldViolation(
                    f"messages[{i}].role", f"must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL, got {name}"
                )
            )
        content = m.content
        has_parts = bool(m.parts)
        has_calls = bool(m.tool_calls)
        tool_call_id = m.tool_call_id
        message_parts = agent_fields.parts(m, i, role or "", bad) if has_parts else ()
        calls = agent_fields.tool_calls(m, i, bad) if has_calls else ()
        if has_calls:
            if role != "assistant":
                bad.append(FieldViolation(f"messages[{i}].tool_calls", "only ROLE_ASSISTANT messages carry tool calls"))
            call_ids.update(c.id for c in calls)
        if role == "tool":
            if not tool_call_id:
                bad.append(
                    FieldViolation(f"messages[{i}].tool_call_id", "ROLE_TOOL messages must name the call they answer")
                )
            elif tool_call_id not in call_ids:
                bad.append(
                    FieldViolation(
                        f"messages[{i}].tool_call_id",
                        f"{tool_call_id!r} answers no tool call of an earlier ROLE_ASSISTANT message",
                    )
                )
        elif tool_call_id:
            bad.append(FieldViolation(f"messages[{i}].tool_call_id", "only ROLE_TOOL messages answer a tool call"))
        if len(content) > settings.max_content_chars:
            bad.append(
                FieldViolation(
                    f"messages[{i}].content", f"at most {settings.max_content_chars} characters, got {len(content)}"
                )
            )
        elif "\x00" in content:
            bad.append(FieldViolation(f"messages[{i}].content", "must not contain NUL characters"))
        elif not content.strip() and not has_parts and not calls and role != "tool":
            bad.append(FieldViolation(f"messages[{i}].content", "must not be empty or only whitespace"))
        if role is not None:
            messages.append(ChatMessage(role, content, calls, tool_call_id, message_parts))
    if messages and all(m.role == "system" for m in messages):
        bad.append(FieldViolation("messages", "needs at least one ROLE_USER or ROLE_ASSISTANT message"))
    return messages


def _check_sampling(request: Any, bad: list[FieldViolation]) -> tuple[float | None, float | None]:
    temperature = top_p = None
    if request.HasField("temperature"):
        temperature = shortest_float32(request.temperature)
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            bad.append(FieldViolation("temperature", f"must be in [0, 2], got {temperature}"))
    if request.HasField("top_p"):
        top_p = shortest_float32(request.top_p)
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            bad.append(FieldViolation("top_p", f"must be in (0, 1], got {top_p}"))
    return temperature, top_p


def _check_rest(request: Any, settings: Settings, bad: list[FieldViolation]) -> None:
    model = request.model
    if len(model) > MAX_MODEL_CHARS:
        bad.append(FieldViolation("model", f"at most {MAX_MODEL_CHARS} characters, got {len(model)}"))
    elif model and not _MODEL.fullmatch(model):
        bad.append(
            FieldViolation(
                "model", "must start with a letter or digit and use only letters, digits and . _ : / @ + = -"
            )
        )
    if request.HasField("max_tokens") and not 1 <= request.max_tokens <= settings.max_tokens_cap:
        bad.append(
            FieldViolation(
                "max_tokens",
                f"must be in [1, {settings.max_tokens_cap}] (MAX_TOKENS_CAP), got {request.max_tokens}",
            )
        )
    stops = request.stop
    if len(stops) > MAX_STOP_SEQUENCES:
        bad.append(FieldViolation("stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}"))
    else:
        for i, s in enumerate(stops):
            if not s or len(s) > MAX_STOP_CHARS:
                bad.append(FieldViolation(f"stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters, got {len(s)}"))
            elif "\x00" in s:
                bad.append(FieldViolation(f"stop[{i}]", "must not contain NUL characters"))
    if request.HasField("seed") and not 0 <= request.seed <= MAX_SEED:
        bad.append(FieldViolation("seed", f"must be in [0, {MAX_SEED}], got {request.seed}"))
    if request.cold_start_policy not in _POLICIES:
        bad.append(
            FieldViolation(
                "cold_start_policy",
                "must be COLD_START_POLICY_UNSPECIFIED, COLD_START_POLICY_FALLBACK or COLD_START_POLICY_WAIT, "
                f"got {request.cold_start_policy}",
            )
        )


def to_domain(request: Any, settings: Settings) -> tuple[ChatRequest, str | None]:
    """Validates a ChatRequest or ChatStreamRequest; returns (domain request, cold-start policy).

    Raises:
        InvalidRequestError: with one FieldViolation per bad field (at most ``MAX_VIOLATIONS``).
    """
    size = request.ByteSize()
    if size > settings.max_request_bytes:
        # Checked first and alone: walking an oversize request field by field is wasted work.
        raise InvalidRequestError(
            f"invalid request: it is {size} bytes, at most {settings.max_request_bytes} are allowed (MAX_REQUEST_BYTES)"
        )
    bad: list[FieldViolation] = []
    # The handful of scalar fields first, so that truncation only ever drops per-message violations.
    temperature, top_p = _check_sampling(request, bad)
    _check_rest(request, settings, bad)
    tools = agent_fields.tools(request, bad)
    choice = agent_fields.tool_choice(request, {t.name for t in tools}, bad)
    fmt = agent_fields.response_format(request, bad)
    tags = agent_fields.metadata(request, bad)
    messages = _check_messages(request, settings, bad)
    if bad:
        if len(bad) > MAX_VIOLATIONS:
            more = len(bad) - MAX_VIOLATIONS + 1
            bad = [*bad[: MAX_VIOLATIONS - 1], FieldViolation("messages", f"{more} more violations are not listed")]
        raise InvalidRequestError.from_violations(bad)
    return (
        ChatRequest(
            messages=tuple(messages),
            model=request.model or None,
            temperature=temperature,
            top_p=top_p,
            max_tokens=request.max_tokens if request.HasField("max_tokens") else settings.default_max_tokens,
            stop=tuple(request.stop),
            seed=request.seed if request.HasField("seed") else None,
            tools=tools,
            tool_choice=choice,
            response_format=fmt,
            metadata=tags,
        ),
        _POLICIES[request.cold_start_policy],
    )
