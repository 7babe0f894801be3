"""Agent fields on the embedded llama.cpp server (issue 13), end to end through the gateway.

The model is tiny: these tests assert what llama.cpp's grammars guarantee (JSON that fits the
schema, a tool call that parses and fits the tool's parameters), never what the answer says. The
reader that streams a forced call back is unit-tested first, without the model.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import jsonschema
import orjson
import pytest
import pytest_asyncio
from inference.v1 import inference_pb2 as pb

from service.providers.base import ChatMessage, ChatRequest, Tool, ToolCallDelta, ToolChoice
from service.providers.local import ForcedCallReader, LocalLlamaProvider, forced_call_schema
from tests.agent_helpers import PNG_DATA_URL, WEATHER_PARAMETERS, agent_call, json_schema, tool, user
from tests.conftest import RunningGateway, make_settings, start_gateway, stop_gateway

e2e = pytest.mark.e2e

RPCS = ["Chat", "ChatStream"]
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["colour", "count"],
    "additionalProperties": False,
}
# Small tools: on a busy 2-core machine every prompt token counts against the first-token timeout.
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
TOOLS = [tool("get_weather", CITY, "Weather in a city"), tool("get_time", CITY, "Time in a city")]
WEATHER = "What is the weather in Paris?"


@pytest_asyncio.fixture(scope="module")
async def agent_gateway() -> AsyncIterator[RunningGateway]:
    """The embedded model with a first-token timeout for a busy CI machine: a prompt that lists tools
    is ~200 tokens, which two shared cores can take more than the default 20 s to read."""
    running = await start_gateway(make_settings(local_parallel_slots=2, local_context_tokens=4096, ttft_timeout_s=120))
    yield running
    await stop_gateway(running)


def provider(running: RunningGateway) -> LocalLlamaProvider:
    p = running.gateway.router.slots[0].provider
    assert isinstance(p, LocalLlamaProvider)
    return p


# ---- the forced call, without the model ---------------------------------------------------------


def test_forced_call_schema() -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = (Tool("a", parameters=params), Tool("b"))
    one = {
        "type": "object",
        "properties": {"name": {"const": "b"}, "arguments": {}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    ask = ChatMessage("user", "hi")
    assert forced_call_schema(ChatRequest((ask,), tools=tools, tool_choice=ToolChoice(function="b"))) == one
    required = forced_call_schema(ChatRequest((ask,), tools=tools, tool_choice=ToolChoice(mode="required")))
    assert required is not None and [o["properties"]["name"] for o in required["anyOf"]] == [
        {"const": "a"},
        {"const": "b"},
    ]
    for choice in (None, ToolChoice(mode="auto"), ToolChoice(mode="none")):
        assert forced_call_schema(ChatRequest((ask,), tools=tools, tool_choice=choice)) is None


CALL = '{\n  "name": "get_weather",\n  "arguments": {\n    "city": "P}aris ", "x": {"y": [1]}\n  }\n}'


@pytest.mark.parametrize("piece", [1, 2, 5, 1000])
def test_a_forced_call_streams_back_as_one_tool_call(piece: int) -> None:
    reader = ForcedCallReader("call_1")
    fragments: list[ToolCallDelta] = []
    for i in range(0, len(CALL), piece):
        fragments += reader.feed(CALL[i : i + piece])
    fragments += reader.finish()
    assert fragments[0] == ToolCallDelta(0, "call_1", "get_weather")  # once the name is complete
    arguments = "".join(f.arguments for f in fragments)
    assert arguments == '{\n    "city": "P}aris ", "x": {"y": [1]}\n  }'  # the call's "}" never leaks in
    assert all(f.index == 0 and not f.id for f in fragments[1:])


@pytest.mark.parametrize("text", ['{"name": "f", "arguments": 3}', '{"name": "f"}', "[]", '{"name": "f", "argu'])
def test_a_forced_call_that_is_not_one_is_refused(text: str) -> None:
    reader = ForcedCallReader("c")
    reader.feed(text)
    with pytest.raises(ValueError):
        reader.finish()


def test_a_forced_call_spaced_unusually_still_parses() -> None:
    reader = ForcedCallReader("c")
    assert reader.feed('{ "arguments" : {"a": 1}, "name": "f" }') == []
    assert reader.finish() == [ToolCallDelta(0, "c", "f", '{"a":1}')]


# ---- the embedded model ---------------------------------------------------------------------------


@e2e
@pytest.mark.parametrize("rpc", RPCS)
async def test_a_json_schema_request_returns_json_that_fits(agent_gateway: RunningGateway, rpc: str) -> None:
    out = await agent_call(
        agent_gateway.stub,
        rpc,
        timeout=120,
        messages=[user("Name a colour and a number.")],
        response_format=json_schema(SCHEMA),
        max_tokens=64,
        temperature=0.0,
    )
    assert out.code is grpc.StatusCode.OK, out.details
    jsonschema.validate(json.loads(out.text), SCHEMA)
    assert out.attempts == [("local", "")] and out.finish_reason == pb.FINISH_REASON_STOP


@e2e
@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    ("choice", "names"),
    [
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED), {"get_weather", "get_time"}),
        (pb.ToolChoice(function_name="get_time"), {"get_time"}),
    ],
)
async def test_a_forced_tool_call_is_a_tool_call_that_parses(
    agent_gateway: RunningGateway, rpc: str, choice: pb.ToolChoice, names: set[str]
) -> None:
    out = await agent_call(
        agent_gateway.stub,
        rpc,
        timeout=120,
        messages=[user(WEATHER)],
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=96,
        temperature=0.0,
    )
    assert out.code is grpc.StatusCode.OK, out.details
    assert out.finish_reason == pb.FINISH_REASON_TOOL_CALLS and out.text == ""
    ((call_id, name, arguments),) = out.tool_calls
    assert call_id.startswith("call_") and name in names
    jsonschema.validate(json.loads(arguments), CITY)
    if rpc == "ChatStream":  # streamed: id and name first, then the arguments as they come
        assert out.tool_deltas[0] == (0, call_id, name, "")
        assert "".join(d[3] for d in out.tool_deltas) == arguments


@e2e
async def test_a_forced_call_cut_short_by_max_tokens_is_a_precise_error(agent_gateway: RunningGateway) -> None:
    out = await agent_call(
        agent_gateway.stub,
        "Chat",
        timeout=120,
        messages=[user(WEATHER)],
        tools=TOOLS,
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        max_tokens=3,
    )
    assert out.code is grpc.StatusCode.UNAVAILABLE
    assert "max_tokens=3 before its tool call was complete" in out.details


@e2e
async def test_tool_results_render_and_are_answered(agent_gateway: RunningGateway) -> None:
    assistant = pb.Message(
        role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="c1", name="get_weather", arguments='{"city":"Paris"}')]
    )
    result = pb.Message(role=pb.ROLE_TOOL, tool_call_id="c1", content="sunny, 21 C")
    out = await agent_call(
        agent_gateway.stub,
        "ChatStream",
        timeout=120,
        messages=[user(WEATHER), assistant, result],
        tools=TOOLS,
        max_tokens=16,
    )
    assert out.code is grpc.StatusCode.OK and out.finals == 1, out.details
    assert out.attempts == [("local", "")]


@e2e
async def test_the_template_renders_plain_chats_as_smollm2s_own_and_shows_tools(agent_gateway: RunningGateway) -> None:
    endpoint = provider(agent_gateway).endpoint
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": [{"role": "user", "content": "hi"}]}, system + "<|im_start|>user\nhi<|im_end|>\n"),
        (
            {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]},
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
        ),
    ]
    async with httpx.AsyncClient(timeout=30) as http:
        for body, expected in cases:
            prompt = (await http.post(f"{endpoint}/apply-template", json=body)).json()["prompt"]
            assert prompt == expected + "<|im_start|>assistant\n"
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}]
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
        prompt = (await http.post(f"{endpoint}/apply-template", json=body)).json()["prompt"]
        caps = (await http.get(f"{endpoint}/props")).json()["chat_template_caps"]
    # llama.cpp found the <tool_call> format in the template: it parses calls in auto mode too.
    assert caps["supports_tools"] and caps["supports_tool_calls"]
    assert "<tools>" in prompt and '"get_weather"' in prompt and "<tool_call>" in prompt


@e2e
async def test_no_connection_to_llama_cpp_is_reused_since_it_closes_each_after_a_stream(
    agent_gateway: RunningGateway,
) -> None:
    """llama.cpp's server closes the connection right after a streamed answer while its head says
    ``Keep-Alive``: a call sent at once on that connection found it closed (and was retried). Every
    call is a stream now, so the local provider's pool keeps nothing idle."""
    local = provider(agent_gateway)
    body = orjson.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True})
    host, port = local.endpoint.removeprefix("http://").split(":")

    def two_requests_on_one_connection() -> tuple[str | None, str]:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            first = conn.getresponse()
            first.read()
            try:
                conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
                second = str(conn.getresponse().status)
            except (http.client.HTTPException, OSError) as exc:
                second = type(exc).__name__
            return first.getheader("keep-alive"), second
        finally:
            conn.close()

    keep_alive, second = await asyncio.to_thread(two_requests_on_one_connection)
    assert keep_alive and second in ("RemoteDisconnected", "BrokenPipeError", "ConnectionResetError")
    assert local.pool.idle_timeout_s == 0


@e2e
async def test_an_image_request_on_the_local_only_chain_is_refused(agent_gateway: RunningGateway) -> None:
    out = await agent_call(agent_gateway.stub, "Chat", timeout=30, messages=[user("What is this?", PNG_DATA_URL)])
    assert out.code is not grpc.StatusCode.OK and out.attempts == []  # local is skipped: nothing asked


@e2e
async def test_an_image_request_no_provider_can_read_says_so(agent_gateway: RunningGateway) -> None:
    out = await agent_call(agent_gateway.stub, "Chat", timeout=30, messages=[user("What is this?", PNG_DATA_URL)])
    assert out.code is grpc.StatusCode.INVALID_ARGUMENT and "image" in out.details, (out.code, out.details)
