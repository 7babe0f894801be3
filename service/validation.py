"""Request validation: proto request -> domain ChatRequest, or one INVALID_ARGUMENT naming every
bad field. Runs before any provider is touched, so a caller's mistake costs no upstream call."""

from __future__ import annotations

import math
from typing import Any

from inference.v1 import inference_pb2 as pb

from service.config import Settings
from service.errors import FieldViolation, InvalidRequestError
from service.providers.base import ChatMessage, ChatRequest, Role

_ROLES: dict[int, Role] = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
_POLICIES = {
    pb.COLD_START_POLICY_UNSPECIFIED: None,
    pb.COLD_START_POLICY_FALLBACK: "fallback",
    pb.COLD_START_POLICY_WAIT: "wait",
}
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 200
MAX_MODEL_CHARS = 256


def to_domain(request: Any, settings: Settings) -> tuple[ChatRequest, str | None]:
    """Validates a ChatRequest or ChatStreamRequest; returns (domain request, cold-start policy).

    Raises:
        InvalidRequestError: with one FieldViolation per bad field.
    """
    bad: list[FieldViolation] = []
    messages: list[ChatMessage] = []
    if not request.messages:
        bad.append(FieldViolation("messages", "at least one message is required"))
    elif len(request.messages) > settings.max_messages:
        bad.append(
            FieldViolation(
                "messages", f"at most {settings.max_messages} messages are allowed, got {len(request.messages)}"
            )
        )
    else:
        for i, m in enumerate(request.messages):
            role = _ROLES.get(m.role)
            if role is None:
                name = pb.Role.Name(m.role) if m.role in pb.Role.values() else str(m.role)
                bad.append(
                    FieldViolation(
                        f"messages[{i}].role", f"must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT, got {name}"
                    )
                )
            if not m.content.strip():
                bad.append(FieldViolation(f"messages[{i}].content", "must not be empty"))
            elif len(m.content) > settings.max_content_chars:
                bad.append(
                    FieldViolation(
                        f"messages[{i}].content",
                        f"at most {settings.max_content_chars} characters, got {len(m.content)}",
                    )
                )
            if role is not None:
                messages.append(ChatMessage(role, m.content))
        if messages and all(m.role == "system" for m in messages):
            bad.append(FieldViolation("messages", "needs at least one ROLE_USER or ROLE_ASSISTANT message"))
    if len(request.model) > MAX_MODEL_CHARS:
        bad.append(FieldViolation("model", f"at most {MAX_MODEL_CHARS} characters"))
    temperature = top_p = None
    if request.HasField("temperature"):
        temperature = request.temperature
        if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
            bad.append(FieldViolation("temperature", f"must be in [0, 2], got {temperature}"))
    if request.HasField("top_p"):
        top_p = request.top_p
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            bad.append(FieldViolation("top_p", f"must be in (0, 1], got {top_p}"))
    max_tokens = settings.default_max_tokens
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if not 1 <= max_tokens <= settings.max_tokens_cap:
            bad.append(
                FieldViolation(
                    "max_tokens", f"must be in [1, {settings.max_tokens_cap}] (MAX_TOKENS_CAP), got {max_tokens}"
                )
            )
    if len(request.stop) > MAX_STOP_SEQUENCES:
        bad.append(FieldViolation("stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(request.stop)}"))
    for i, s in enumerate(request.stop):
        if not s or len(s) > MAX_STOP_CHARS:
            bad.append(FieldViolation(f"stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters"))
    if request.cold_start_policy not in _POLICIES:
        bad.append(FieldViolation("cold_start_policy", f"unknown value {request.cold_start_policy}"))
    if bad:
        raise InvalidRequestError.from_violations(bad)
    return (
        ChatRequest(
            messages=tuple(messages),
            model=request.model or None,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=tuple(request.stop),
            seed=request.seed if request.HasField("seed") else None,
        ),
        _POLICIES[request.cold_start_policy],
    )
