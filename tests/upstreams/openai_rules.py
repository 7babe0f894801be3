"""vLLM's request rules for the agent fields, as the OpenAI-compatible stand-in enforces them.

``problem(body)`` returns the reason for a 400 or None. The rules follow vLLM 0.11's request model
(``ChatCompletionRequest`` and its ``check_tool_usage`` validator): where its wording is known it is
used, elsewhere the wording is ours and says the same.

- tools: a list of ``{"type": "function", "function": {"name", "description"?, "parameters"?}}``
  with a non-empty string name and an object as parameters.
- tool_choice: ``none``/``auto``/``required`` or ``{"type": "function", "function": {"name"}}``
  naming one of the tools; any tool_choice but ``none`` needs ``tools`` ("When using
  `tool_choice`, `tools` must be set.").
- response_format: ``type`` text/json_object/json_schema/structural_tag; ``json_schema`` needs
  ``{"name", "schema"?, "strict"?}``. ``guided_json`` is accepted and ignored, as vLLM 0.12 does:
  which is why a gateway must never rely on it.
- messages: ``tool`` turns carry ``tool_call_id`` and content; assistant ``tool_calls`` carry
  ``id``, ``type: function`` and ``function: {name, arguments}`` with arguments as JSON text;
  content is a string, null (assistant turns with tool calls) or a list of ``text`` and
  ``image_url`` parts.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")
FORMATS = ("text", "json_object", "json_schema", "structural_tag")


def _tools(tools: Any) -> tuple[str | None, set[str]]:
    if not isinstance(tools, list):
        return "tools: Input should be a valid list", set()
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            return f"{where}.type: Input should be 'function'", names
        function = tool.get("function")
        if not isinstance(function, dict):
            return f"{where}.function: Field required", names
        name = function.get("name")
        if not isinstance(name, str) or not name:
            return f"{where}.function.name: Field required", names
        if not isinstance(function.get("parameters", {}), dict):
            return f"{where}.function.parameters: Input should be a valid dictionary", names
        if not isinstance(function.get("description", ""), str | None):
            return f"{where}.function.description: Input should be a valid string", names
        names.add(name)
    return None, names


def _tool_choice(choice: Any, has_tools: bool, names: set[str]) -> str | None:
    if choice == "none":
        return None  # vLLM checks nothing else then
    if not has_tools:
        return "When using `tool_choice`, `tools` must be set."
    if choice in ("auto", "required"):
        return None
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return f"Invalid value for `tool_choice`: {choice!r}"
    name = (choice.get("function") or {}).get("name")
    if not isinstance(name, str) or not name:
        return "Expected field `name` in `function` in `tool_choice`!"
    if name not in names:
        return "The tool specified in `tool_choice` does not match any of the specified `tools`"
    return None


def _response_format(fmt: Any) -> str | None:
    if not isinstance(fmt, dict) or fmt.get("type") not in FORMATS:
        return f"response_format.type: Input should be one of {FORMATS}"
    if fmt["type"] != "json_schema":
        return None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return "response_format.json_schema.name: Field required"
    if not isinstance(spec.get("schema", {}), dict):
        return "response_format.json_schema.schema: Input should be a valid dictionary"
    return None


def _content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"{where}.content: Input should be a valid string or list"
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind == "image_url" and isinstance((part.get("image_url") or {}).get("url"), str):
            continue
        return f"{where}.content.{j}: expected {{type: text, text}} or {{type: image_url, image_url: {{url}}}}"
    return None


def _message(m: Any, i: int) -> str | None:
    where = f"messages.{i}"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        return f"{where}.role: Input should be one of {ROLES}"
    if m["role"] == "tool" and (not isinstance(m.get("tool_call_id"), str) or "content" not in m):
        return f"{where}: a tool message needs tool_call_id and content"
    for j, call in enumerate(m.get("tool_calls") or []):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("id"), str)
            or call.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            return f"{where}.tool_calls.{j}: expected {{id, type: function, function: {{name, arguments: str}}}}"
    if m.get("content") is None and not m.get("tool_calls"):
        return f"{where}.content: Field required"
    return _content(m.get("content"), where)


def problem(body: dict[str, Any]) -> str | None:
    """Why vLLM would answer 400 to this chat body's agent fields and messages (None: it would not)."""
    names: set[str] = set()
    if body.get("tools") is not None:
        bad, names = _tools(body["tools"])
        if bad:
            return bad
    if body.get("tool_choice") is not None:
        bad = _tool_choice(body["tool_choice"], body.get("tools") is not None, names)
        if bad:
            return bad
    if body.get("response_format") is not None:
        bad = _response_format(body["response_format"])
        if bad:
            return bad
    for i, m in enumerate(body.get("messages") or []):
        bad = _message(m, i)
        if bad:
            return bad
    return None
