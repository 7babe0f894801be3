"""Agent fields on the OpenAI-compatible side (issue 13): the wire format without I/O, then a real
gateway over two fake vLLM servers (modal -> vastai): tool-call streams as sent, tool results
round-tripped, structured output as ``response_format`` (never ``guided_json``) with schema
violations falling back (Chat) or ending the stream (ChatStream), images as content parts."""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import orjson
import pytest
import pytest_asyncio
from inference.v1 import inference_pb2 as pb

from service.errors import ProviderProtocolError
from service.providers.base import (
    ChatMessage,
    ChatRequest,
    FinishReason,
    ImagePart,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from service.providers.http.openai_wire import SSEDecoder, request_body
from tests.agent_helpers import PNG_DATA_URL, agent_call, json_schema, tool, user
from tests.conftest import RunningGateway, start_gateway, stop_gateway
from tests.routing_helpers import MODAL_MODEL, chain_settings
from tests.upstreams import FakeOpenAI, Ok
from tests.upstreams.behaviours import ToolCalls, ToolFragment

RPCS = ["Chat", "ChatStream"]

# ---- the wire format ----------------------------------------------------------------------------


def test_request_body_carries_every_agent_field_in_vllms_shape() -> None:
    units = {"type": "object", "properties": {"units": {"type": "array", "maxItems": 3}}}
    request = ChatRequest(
        messages=(
            ChatMessage("user", parts=(TextPart("What is this?"), ImagePart(PNG_DATA_URL))),
            ChatMessage("assistant", tool_calls=(ToolCall("c1", "get_weather", '{"city":"Paris"}'),)),
            ChatMessage("tool", "sunny", tool_call_id="c1"),
            ChatMessage("assistant", "Let me look.", tool_calls=(ToolCall("c2", "get_time", "{}"),)),
        ),
        tools=(Tool("get_weather", "Weather in a city", units, strict=True), Tool("get_time")),
        tool_choice=ToolChoice(function="get_weather"),
        response_format=ResponseFormat("json_schema", "answer", {"type": "object"}, strict=True),
    )
    body = request_body(request, "m", stream=True)
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": PNG_DATA_URL}},
            ],
        },
        {
            "role": "assistant",
            "content": None,  # a turn that only calls tools
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [{"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
        },
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": units,
                "description": "Weather in a city",
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": {}}},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    }
    wire = orjson.dumps(body)
    assert b'"maxItems":3}' in wire and b"guided" not in wire  # integers stay integers; no guided_json


@pytest.mark.parametrize(
    ("choice", "tools", "sent"),
    [
        (ToolChoice(mode="auto"), True, "auto"),
        (ToolChoice(mode="none"), True, "none"),
        (ToolChoice(mode="required"), True, "required"),
        (ToolChoice(function="f"), True, {"type": "function", "function": {"name": "f"}}),
        (ToolChoice(mode="none"), False, None),  # vLLM refuses tool_choice without tools
        (None, True, None),
    ],
)
def test_tool_choice_forms(choice: ToolChoice | None, tools: bool, sent: object) -> None:
    request = ChatRequest((ChatMessage("user", "hi"),), tools=(Tool("f"),) if tools else (), tool_choice=choice)
    assert request_body(request, "m", stream=True).get("tool_choice") == sent


def test_json_object_format() -> None:
    request = ChatRequest((ChatMessage("user", "hi"),), response_format=ResponseFormat("json_object"))
    assert request_body(request, "m", stream=True)["response_format"] == {"type": "json_object"}


def sse(delta: dict[str, Any] | None = None, finish: str | None = None) -> str:
    return (
        "data: "
        + json.dumps(
            {"id": "c", "model": "m", "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
        )
        + "\n\n"
    )


def frag(index: int | None, call_id: str = "", name: str = "", arguments: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {} if index is None else {"index": index}
    if call_id:
        out |= {"id": call_id, "type": "function"}
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None and v != ""}
    if function or arguments == "":
        out["function"] = function | ({"arguments": ""} if arguments == "" else {})
    return out


def calls(*fragments: dict[str, Any]) -> str:
    return sse({"tool_calls": list(fragments)})


DONE = "data: [DONE]\n\n"


def decode(*events: str, piece: int = 1 << 16) -> tuple[list[str | ToolCallDelta], SSEDecoder]:
    decoder = SSEDecoder("vastai", "m")
    data = "".join(events).encode()
    items: list[str | ToolCallDelta] = []
    for i in range(0, len(data), piece):
        items += decoder.feed(data[i : i + piece])
    return items, decoder


@pytest.mark.parametrize("piece", [1, 7, 1 << 16])
def test_tool_call_fragments_pass_as_they_arrive(piece: int) -> None:
    """Two calls interleaved; the second never gets arguments (the router makes them {})."""
    items, decoder = decode(
        sse({"role": "assistant", "content": ""}),
        calls(frag(0, "call_a", "get_weather")),
        calls(frag(1, "call_b", "get_time", "")),
        calls(frag(0, arguments='{"city":')),
        calls(frag(1, arguments="")),
        calls(frag(0, arguments='"Paris"}')),
        sse(finish="tool_calls"),
        DONE,
        piece=piece,
    )
    assert items == [
        ToolCallDelta(0, "call_a", "get_weather"),
        ToolCallDelta(1, "call_b", "get_time"),
        ToolCallDelta(0, arguments='{"city":'),
        ToolCallDelta(0, arguments='"Paris"}'),
    ]
    assert decoder.done and decoder.end().finish_reason is FinishReason.TOOL_CALLS


def test_text_and_tool_fragments_in_one_read_keep_their_order() -> None:
    items, _ = decode(
        sse({"content": "Let me "}),
        sse({"content": "check. "}),
        calls(frag(0, "c", "f"), frag(0, arguments="{}")),  # two fragments in one chunk
        sse({"content": "Done."}),
        sse(finish="tool_calls"),
    )
    assert items == ["Let me check. ", ToolCallDelta(0, "c", "f"), ToolCallDelta(0, arguments="{}"), "Done."]


def test_a_new_id_at_a_used_index_is_a_new_call_and_a_missing_index_continues() -> None:
    items, _ = decode(
        calls(frag(0, "a", "f", "{}")),
        calls(frag(0, "b", "g")),  # a server numbering every call 0
        calls(frag(None, arguments='{"x":1}')),  # no index: the last call goes on
        calls(frag(None, "c", "h", {"y": 2})),  # no index, a new id: a new call; arguments as an object
        sse(finish="tool_calls"),
    )
    assert items == [
        ToolCallDelta(0, "a", "f", "{}"),
        ToolCallDelta(1, "b", "g"),
        ToolCallDelta(1, arguments='{"x":1}'),
        ToolCallDelta(2, "c", "h", '{"y":2}'),
    ]


@pytest.mark.parametrize("bad", [{"index": "0"}, {"index": -1}, {"index": 0, "id": 5}, {"index": True}])
def test_a_tool_fragment_no_server_sends_is_a_protocol_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ProviderProtocolError, match="unexpected chunk shape"):
        decode(calls(bad))


# ---- through a real gateway over two fake vLLM servers -------------------------------------------


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    modal, vast = FakeOpenAI(models=[MODAL_MODEL]).start(), FakeOpenAI(models=[MODAL_MODEL]).start()
    yield modal, vast
    modal.stop()
    vast.stop()


@pytest_asyncio.fixture
async def chain(fakes: tuple[FakeOpenAI, FakeOpenAI]) -> AsyncIterator[tuple[RunningGateway, FakeOpenAI, FakeOpenAI]]:
    modal, vast = fakes
    for srv in fakes:
        srv.reset()
    modal.default, vast.default = Ok(tokens=["m1 ", "m2"]), Ok(tokens=["v1 ", "v2"])
    running = await start_gateway(chain_settings(modal, vast))
    yield running, modal, vast
    await stop_gateway(running)
    for srv in fakes:
        assert srv.errors == [], srv.errors


WEATHER = "What is the weather in Paris?"
INTERLEAVED = ToolCalls(
    [
        ToolFragment(0, "call_a", "get_weather"),
        ToolFragment(1, "call_b", "get_time"),
        ToolFragment(0, arguments='{"city":'),
        ToolFragment(1),  # the second call's arguments never come
        ToolFragment(0, arguments='"Paris"}'),
    ]
)


@pytest.mark.parametrize("rpc", RPCS)
async def test_tool_calls_reach_the_caller_as_sent_and_assembled(chain: Any, rpc: str) -> None:
    running, modal, _ = chain
    modal.default = INTERLEAVED
    out = await agent_call(running.stub, rpc, messages=[user(WEATHER)], tools=[tool("get_weather"), tool("get_time")])
    assert out.code is grpc.StatusCode.OK, out.details
    assert out.provider == "modal" and out.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert out.tool_calls == [("call_a", "get_weather", '{"city":"Paris"}'), ("call_b", "get_time", "{}")]
    assert out.message.content == "" and out.text == ""
    if rpc == "ChatStream":
        assert out.tool_deltas == [
            (0, "call_a", "get_weather", ""),
            (1, "call_b", "get_time", ""),
            (0, "", "", '{"city":'),
            (0, "", "", '"Paris"}'),
        ]
    sent = modal.received[-1]
    assert [t["function"]["name"] for t in sent.tools] == ["get_weather", "get_time"]
    maximum = sent.tools[0]["function"]["parameters"]["properties"]["units"]["maxItems"]
    assert maximum == 3 and type(maximum) is int  # the Struct's 3.0 went out as 3
    assert "tool_choice" not in sent.body  # none asked: vLLM's default (auto)


async def test_text_before_a_tool_call_stays_before_it(chain: Any) -> None:
    running, modal, _ = chain
    modal.default = ToolCalls.of(("c1", "get_weather", '{"city": "Paris"}'), piece=4, text="Checking. ")
    out = await agent_call(running.stub, "ChatStream", messages=[user(WEATHER)], tools=[tool("get_weather")])
    assert out.events[0] == "text" and set(out.events[1:]) == {"tool"}
    assert out.message.content == "Checking. " and out.tool_calls == [("c1", "get_weather", '{"city": "Paris"}')]
    assert "".join(d[3] for d in out.tool_deltas) == '{"city": "Paris"}'


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED), "required"),
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE), "none"),
        (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO), "auto"),
        (pb.ToolChoice(function_name="get_time"), {"type": "function", "function": {"name": "get_time"}}),
    ],
)
async def test_tool_choice_reaches_vllm(chain: Any, choice: pb.ToolChoice, sent: object) -> None:
    running, modal, _ = chain
    out = await agent_call(
        running.stub,
        "Chat",
        messages=[user(WEATHER)],
        tools=[tool("get_weather"), tool("get_time")],
        tool_choice=choice,
    )
    assert out.code is grpc.StatusCode.OK and out.provider == "modal", out.details
    assert modal.received[-1].tool_choice == sent


async def test_tool_results_round_trip(chain: Any) -> None:
    running, modal, _ = chain
    assistant = pb.Message(
        role=pb.ROLE_ASSISTANT,
        tool_calls=[
            pb.ToolCall(id="c1", name="get_weather", arguments='{"city":"Paris"}'),
            pb.ToolCall(id="c2", name="get_time", arguments=""),
        ],
    )
    results = [
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="c1", content='{"sky":"sunny","celsius":21}'),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="c2", content="12:00"),
    ]
    out = await agent_call(
        running.stub,
        "ChatStream",
        messages=[user(WEATHER), assistant, *results],
        tools=[tool("get_weather"), tool("get_time")],
    )
    assert out.code is grpc.StatusCode.OK and out.text == "m1 m2"
    sent = modal.received[-1]
    assert sent.body["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky":"sunny","celsius":21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
    ]
    assert sent.tool_results == [("c1", '{"sky":"sunny","celsius":21}'), ("c2", "12:00")]


SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "maxLength": 12}, "count": {"type": "integer", "maximum": 9}},
    "required": ["colour", "count"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("rpc", RPCS)
async def test_structured_output_is_sent_as_response_format(chain: Any, rpc: str) -> None:
    running, modal, _ = chain
    modal.default = Ok(tokens=['{"colour": ', '"red", "count": 3}'])
    out = await agent_call(
        running.stub, rpc, messages=[user("A colour and a count")], response_format=json_schema(SCHEMA)
    )
    assert out.code is grpc.StatusCode.OK and out.provider == "modal", out.details
    assert json.loads(out.text) == {"colour": "red", "count": 3}
    sent = modal.received[-1]
    assert sent.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
    }
    assert not any(key.startswith("guided") for key in sent.body)


async def test_a_schema_violating_answer_falls_back_for_chat(chain: Any) -> None:
    running, modal, vast = chain
    modal.default = Ok(tokens=['{"colour": "a colour far too long", "count": 3}'])
    vast.default = Ok(tokens=['{"colour": "red", ', '"count": 2}'])
    out = await agent_call(
        running.stub, "Chat", messages=[user("A colour and a count")], response_format=json_schema(SCHEMA)
    )
    assert out.code is grpc.StatusCode.OK and out.provider == "vastai", out.details
    assert json.loads(out.text) == {"colour": "red", "count": 2}
    assert out.attempts == [("modal", "SCHEMA_VIOLATION"), ("vastai", "")]
    assert len(modal.chat_requests) == 1  # not retried: the same model would answer the same way


async def test_a_schema_violating_stream_ends_with_schema_violation(chain: Any) -> None:
    running, modal, vast = chain
    modal.default = Ok(tokens=['{"colour": "red", ', '"count": 12}'])
    out = await agent_call(
        running.stub, "ChatStream", messages=[user("A colour and a count")], response_format=json_schema(SCHEMA)
    )
    assert out.code is grpc.StatusCode.UNAVAILABLE and out.reason == "SCHEMA_VIOLATION"
    assert out.finals == 0 and out.text == '{"colour": "red", "count": 12}'  # the text went out; no final
    assert "count" in out.details and "modal" in out.details
    assert vast.chat_requests == []  # text reached the caller: never spliced with another answer


async def test_images_reach_vllm_as_content_parts(chain: Any) -> None:
    running, modal, _ = chain
    url = "https://example.com/cat.png"
    out = await agent_call(running.stub, "ChatStream", messages=[user("What is this?", url, PNG_DATA_URL)])
    assert out.code is grpc.StatusCode.OK and out.provider == "modal", out.details
    sent = modal.received[-1]
    assert sent.images == [url, PNG_DATA_URL]
    assert sent.body["messages"][0]["content"][0] == {"type": "text", "text": "What is this?"}


# ---- the stand-in checks requests as vLLM does ----------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
        ({"tools": [{"name": "f", "input_schema": {}}]}, "tools.0.function: Field required"),
        ({"tool_choice": "required"}, "`tools` must be set"),
        (
            {"tools": [{"function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "does not match",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "json_schema.name"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ],
)
def test_the_fake_refuses_what_vllm_refuses(
    fakes: tuple[FakeOpenAI, FakeOpenAI], fields: dict[str, Any], message: str
) -> None:
    srv = fakes[1]
    srv.reset()
    body = {"model": MODAL_MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=5)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 400 and message in answer["error"]["message"]
