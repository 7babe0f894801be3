"""Tests of the fake upstream servers themselves, with plain httpx and the real anthropic SDK."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
from anthropic.types import MessageParam

from tests.upstreams import (
    ContextTooLong,
    EndWithoutFinish,
    FakeAnthropic,
    FakeOpenAI,
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
)

MODEL = "Qwen/Qwen2.5-7B-Instruct"
CHAT = "/v1/chat/completions"
KEY = "sk-ant-test"
MSGS: list[MessageParam] = [{"role": "user", "content": "say hello to me"}]


@pytest.fixture
def oai() -> Iterator[FakeOpenAI]:
    """A started vLLM fake."""
    with FakeOpenAI() as srv:
        yield srv
    assert srv.errors == []


@pytest.fixture
def ant() -> Iterator[FakeAnthropic]:
    """A started Anthropic fake requiring ``KEY``."""
    with FakeAnthropic(api_key=KEY) as srv:
        yield srv
    assert srv.errors == []


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A pooled httpx client, as the gateway uses."""
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


def sdk(srv: FakeAnthropic, key: str = KEY) -> anthropic.AsyncAnthropic:
    """The real SDK pointed at the fake."""
    return anthropic.AsyncAnthropic(base_url=srv.base_url, api_key=key, max_retries=0, timeout=5)


@pytest.fixture
async def claude(ant: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The real SDK client for ``ant``, closed afterwards."""
    async with sdk(ant) as client:
        yield client


async def sse(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[str], Exception | None]:
    """POST a streaming request; returns the response, its non-empty lines and any error."""
    lines: list[str] = []
    async with client.stream("POST", url, json={**body, "stream": True}) as resp:
        try:
            async for line in resp.aiter_lines():
                if line:
                    lines.append(line)
        except httpx.HTTPError as exc:
            return resp, lines, exc
    return resp, lines, None


def payloads(lines: list[str]) -> list[Any]:
    """The JSON ``data:`` payloads (``[DONE]`` kept as a string)."""
    out = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return [x if x == "[DONE]" else json.loads(x) for x in out]


def contents(chunks: list[Any]) -> str:
    """Concatenate OpenAI content deltas."""
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if isinstance(c, dict) and c.get("choices")
    )


# ----------------------------------------------------------------------------- OpenAI / vLLM


async def test_openai_unary_ok_and_recording(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    r = await http.post(oai.base_url + CHAT, json={"messages": MSGS, "max_tokens": 50})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": expected_text(4),
        "tool_calls": [],
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    (rec,) = oai.chat_requests
    assert rec.method == "POST" and rec.json["max_tokens"] == 50
    assert rec.headers["content-type"] == "application/json" and rec.status == 200
    assert rec.completed and not rec.client_closed and not rec.server_aborted
    assert rec.first_byte_sent_at is not None and rec.closed_at is not None
    assert rec.received_at <= rec.first_byte_sent_at <= rec.closed_at
    assert rec.behaviour == Ok()


async def test_openai_stream_sequence(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    oai.enqueue(Ok(tokens=["Hel", "lo"], model="served-as"))
    body = {"messages": MSGS, "stream_options": {"include_usage": True}}
    resp, lines, err = await sse(http, oai.base_url + CHAT, body)
    assert err is None and resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["transfer-encoding"] == "chunked"
    chunks = payloads(lines)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[1:3]] == [
        {"content": "Hel"},
        {"content": "lo"},
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["completion_tokens"] == 2
    assert chunks[5] == "[DONE]" and len(chunks) == 6
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:5])
    assert {c["model"] for c in chunks[:5]} == {"served-as"}
    assert oai.chat_requests[0].completed and oai.chat_requests[0].events_sent == 6


async def test_openai_truncation_and_finish_in_last_chunk(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    oai.default = Ok(n_tokens=5, finish_in_last_chunk=True)
    _, lines, _ = await sse(http, oai.base_url + CHAT, {"messages": MSGS, "max_tokens": 3})
    chunks = payloads(lines)
    assert contents(chunks) == expected_text(3)
    assert chunks[3]["choices"][0] == {**chunks[3]["choices"][0], "finish_reason": "length"}
    assert chunks[3]["choices"][0]["delta"] == {"content": "tok2 "} and chunks[4] == "[DONE]"
    r = await http.post(oai.base_url + CHAT, json={"messages": MSGS, "max_tokens": 2})
    assert r.json()["choices"][0]["finish_reason"] == "length"


async def test_openai_validation(http: httpx.AsyncClient) -> None:
    with FakeOpenAI(models=["a", "b"]) as srv:
        url = srv.base_url + CHAT
        r = await http.post(url, json={"messages": MSGS, "stream_options": {"include_usage": True}})
        assert r.status_code == 400
        assert "`stream=True`" in r.json()["error"]["message"]
        r = await http.post(url, json={"model": "nope", "messages": MSGS})
        assert r.status_code == 404
        assert r.json() == {
            "error": {
                "message": "The model `nope` does not exist.",
                "type": "NotFoundError",
                "param": "model",
                "code": 404,
            }
        }
        r = await http.post(url, json={"model": "", "messages": MSGS})
        assert r.json()["model"] == "a"
        assert srv.pending_behaviours == 0
    with FakeOpenAI(models=["a"], strict_models=False) as srv:
        r = await http.post(srv.base_url + CHAT, json={"model": "zzz", "messages": MSGS})
        assert r.status_code == 200 and r.json()["model"] == "zzz"


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_scripted_statuses(oai: FakeOpenAI, http: httpx.AsyncClient, stream: bool) -> None:
    oai.enqueue(
        Status(500),
        Status(502),
        Status(503),
        Status(429, retry_after_s=2),
        Status(401),
        Status(403),
        Status(418, body="teapot", headers=(("X-Extra", "1"),)),
        UnknownModel(),
        ContextTooLong(),
        Overloaded(),
    )
    got = []
    for _ in range(11):
        r = await http.post(oai.base_url + CHAT, json={"messages": MSGS, "stream": stream})
        got.append(r)
    assert [r.status_code for r in got] == [500, 502, 503, 429, 401, 403, 418, 404, 400, 503, 200]
    assert got[0].json()["error"] == {
        "message": "Internal Server Error",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
    assert got[3].headers["retry-after"] == "2"
    assert got[6].text == "teapot" and got[6].headers["content-type"].startswith("text/plain")
    assert got[6].headers["x-extra"] == "1"
    assert got[7].json()["error"]["message"] == f"The model `{MODEL}` does not exist."
    msg = got[8].json()["error"]["message"]
    assert msg.startswith("This model's maximum context length is 4096 tokens. However, you")
    assert oai.connections_accepted == 1, "error answers keep the connection alive"


@pytest.mark.parametrize("rst", [True, False])
async def test_reset_before_response(oai: FakeOpenAI, http: httpx.AsyncClient, rst: bool) -> None:
    oai.enqueue(ResetBeforeResponse(rst=rst))
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        await http.post(oai.base_url + CHAT, json={"messages": MSGS})
    rec = oai.chat_requests[0]
    assert rec.server_aborted and rec.first_byte_sent_at is None and rec.status is None
    r = await http.post(oai.base_url + CHAT, json={"messages": MSGS})
    assert r.status_code == 200 and oai.connections_accepted == 2


@pytest.mark.parametrize("rst", [True, False])
async def test_reset_after_n_chunks(oai: FakeOpenAI, http: httpx.AsyncClient, rst: bool) -> None:
    oai.enqueue(ResetAfter(2, rst=rst), ResetAfter(rst=rst))
    _, lines, err = await sse(http, oai.base_url + CHAT, {"messages": MSGS})
    expected = httpx.ReadError if rst else httpx.RemoteProtocolError
    assert isinstance(err, expected)
    assert contents(payloads(lines)) == expected_text(2) and len(lines) == 3
    with pytest.raises(expected):
        await http.post(oai.base_url + CHAT, json={"messages": MSGS})
    assert [r.server_aborted for r in oai.chat_requests] == [True, True]


async def test_stall_before_first_token(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    oai.enqueue(StallBeforeFirstToken(0.25), StallBeforeFirstToken(0.25, send_headers=False))
    for headers_first in (True, False):
        t0 = time.monotonic()
        req = http.build_request("POST", oai.base_url + CHAT, json={"messages": MSGS, "stream": True})
        resp = await http.send(req, stream=True)
        t_head = time.monotonic() - t0
        text = (await resp.aread()).decode()
        t_body = time.monotonic() - t0
        assert (t_head < 0.2) is headers_first and t_body >= 0.25
        assert contents(payloads(text.splitlines())) == expected_text(4)
    oai.enqueue(StallBeforeFirstToken(0.2))
    t0 = time.monotonic()
    await http.post(oai.base_url + CHAT, json={"messages": MSGS})
    assert time.monotonic() - t0 >= 0.2


async def test_client_close_detected_during_stall(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    oai.enqueue(StallBeforeFirstToken(10), Ok(n_tokens=50, delay_s_between_tokens=5))
    body = {"messages": MSGS, "stream": True}
    resp = await http.send(http.build_request("POST", oai.base_url + CHAT, json=body), stream=True)
    await asyncio.sleep(0.05)
    closed = time.monotonic()
    await resp.aclose()
    rec = oai.chat_requests[0]
    assert await rec.wait_closed_async(1.0)
    assert rec.client_closed and not rec.completed and rec.closed_at is not None
    assert rec.closed_at - closed < 0.1
    # Between tokens: read two lines, then walk away.
    async with http.stream("POST", oai.base_url + CHAT, json=body) as resp:
        n = 0
        async for line in resp.aiter_lines():
            n += bool(line)
            if n == 2:
                break
        closed = time.monotonic()
    rec = oai.chat_requests[1]
    assert rec.wait_closed(1.0) and rec.client_closed
    assert rec.closed_at is not None and rec.closed_at - closed < 0.1


async def test_stall_after(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    oai.enqueue(StallAfter(2, 0.3))
    stamps: list[tuple[float, str]] = []
    async with http.stream("POST", oai.base_url + CHAT, json={"messages": MSGS, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line:
                stamps.append((time.monotonic(), line))
    chunks = payloads([line for _, line in stamps])
    assert contents(chunks) == expected_text(4) and chunks[-1] == "[DONE]"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(stamps)]
    assert gaps[2] >= 0.28 and max(gaps[:2] + gaps[3:]) < 0.2


async def test_stream_protocol_faults(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    oai.enqueue(MalformedSSE(1), InBandError(2, "boom"), EndWithoutFinish(2))
    url, body = oai.base_url + CHAT, {"messages": MSGS}
    _, lines, err = await sse(http, url, body)
    assert err is None and lines[2:] == ["data: {not json"]
    resp, lines, err = await sse(http, url, body)
    chunks = payloads(lines)
    assert resp.status_code == 200 and contents(chunks[:3]) == expected_text(2)
    assert chunks[3] == {"error": {"message": "boom", "type": "InternalServerError", "param": None, "code": 500}}
    assert chunks[4] == "[DONE]"
    _, lines, err = await sse(http, url, body)
    chunks = payloads(lines)
    assert contents(chunks) == expected_text(2) and chunks[-1] == "[DONE]" and len(chunks) == 4
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(r.completed for r in oai.chat_requests) and oai.connections_accepted == 1


async def test_unary_protocol_faults(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    oai.enqueue(MalformedSSE(), InBandError(message="boom"), EndWithoutFinish(2))
    url, body = oai.base_url + CHAT, {"messages": MSGS}
    r = await http.post(url, json=body)
    assert r.status_code == 200 and r.text == "{not json"
    r = await http.post(url, json=body)
    assert r.status_code == 500 and r.json()["error"]["message"] == "boom"
    r = await http.post(url, json=body)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] is None and choice["message"]["content"] == expected_text(2)


async def test_openai_health_models_metrics_and_auth(http: httpx.AsyncClient) -> None:
    with FakeOpenAI(models=["m1", "m2"], api_key="secret") as srv:
        assert (await http.get(srv.base_url + "/health")).status_code == 200
        r = await http.get(srv.base_url + "/v1/models")
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        r = await http.get(srv.base_url + "/v1/models", headers={"Authorization": "Bearer secret"})
        assert [m["id"] for m in r.json()["data"]] == ["m1", "m2"]
        assert r.json()["data"][0]["max_model_len"] == 4096 and r.json()["object"] == "list"
        assert "vllm:num_requests_running" in (await http.get(srv.base_url + "/metrics")).text
        assert len(srv.requests) == 4 and srv.chat_requests == []
    modal = {"Modal-Key": "k", "Modal-Secret": "s"}
    with FakeOpenAI(required_headers=modal) as srv:
        assert (await http.get(srv.base_url + "/health")).status_code == 401
        assert (await http.get(srv.base_url + "/health", headers=modal)).status_code == 200
        r = await http.post(srv.base_url + CHAT, json={"messages": MSGS}, headers=modal)
        assert r.status_code == 200


async def test_keep_alive_reuses_one_connection(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    await sse(http, oai.base_url + CHAT, {"messages": MSGS})
    await http.post(oai.base_url + CHAT, json={"messages": MSGS})
    assert oai.connections_accepted == 1 and oai.open_connections == 1
    assert len({r.connection_id for r in oai.requests}) == 1


async def test_stop_listening_refuses_and_keeps_port(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    port = oai.port
    assert (await http.get(oai.base_url + "/health")).status_code == 200
    oai.stop_listening()
    for _ in range(200):  # dropping the open connection completes on the server's thread (2 s at most)
        if not oai.open_connections:
            break
        await asyncio.sleep(0.01)
    assert not oai.listening and oai.open_connections == 0
    with pytest.raises(httpx.ConnectError):
        await http.get(oai.base_url + "/health")
    oai.start_listening()
    assert oai.port == port
    assert (await http.get(oai.base_url + "/health")).status_code == 200


async def test_stop_resets_streams_and_restart_keeps_port(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    oai.enqueue(StallBeforeFirstToken(10))
    body = {"messages": MSGS, "stream": True}
    resp = await http.send(http.build_request("POST", oai.base_url + CHAT, json=body), stream=True)
    port = oai.port
    oai.stop()
    with pytest.raises(httpx.ReadError):
        await resp.aread()
    assert oai.chat_requests[0].server_aborted
    oai.start()
    assert oai.port == port
    assert (await http.post(oai.base_url + CHAT, json={"messages": MSGS})).status_code == 200


async def test_cold_start_timeline(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    t0 = time.monotonic()
    oai.cold_start(not_listening_s=0.3, unavailable_s=0.3)
    phases: list[tuple[str, float]] = []
    while time.monotonic() - t0 < 2:
        try:
            code = str((await http.get(oai.base_url + "/health")).status_code)
        except httpx.ConnectError:
            code = "refused"
        if not phases or phases[-1][0] != code:
            phases.append((code, time.monotonic() - t0))
        if code == "200":
            break
        await asyncio.sleep(0.02)
    assert [p for p, _ in phases] == ["refused", "503", "200"]
    assert 0.3 <= phases[1][1] < 0.5 and 0.6 <= phases[2][1] < 0.8


async def test_cold_start_503_on_chat(oai: FakeOpenAI, http: httpx.AsyncClient) -> None:
    oai.enqueue(Status(500))
    oai.cold_start(0, 0.2)
    r = await http.post(oai.base_url + CHAT, json={"messages": MSGS})
    assert r.status_code == 503 and r.json()["error"]["code"] == 503
    assert oai.pending_behaviours == 1, "503s while loading do not consume behaviours"
    await asyncio.sleep(0.25)
    assert (await http.post(oai.base_url + CHAT, json={"messages": MSGS})).status_code == 500


async def test_serves_while_test_loop_blocked_and_waits(oai: FakeOpenAI) -> None:
    with httpx.Client() as client:  # blocks this event loop on purpose
        r = client.post(oai.base_url + CHAT, json={"messages": MSGS})  # noqa: ASYNC212
        assert r.status_code == 200
    assert len(oai.wait_for_requests(1, timeout=1)) == 1
    with pytest.raises(TimeoutError):
        await oai.wait_for_requests_async(2, timeout=0.05)
    oai.enqueue(Status(500))
    oai.reset()
    assert oai.requests == [] and oai.pending_behaviours == 0 and oai.connections_accepted == 0


# ----------------------------------------------------------------------------- Anthropic


async def test_anthropic_sdk_unary(ant: FakeAnthropic, claude: anthropic.AsyncAnthropic) -> None:
    msg = await claude.messages.create(model="claude-x", max_tokens=100, system="be brief", messages=MSGS)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text == expected_text(4)
    assert msg.model == "claude-x" and msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens == 6 and msg.usage.output_tokens == 4
    rec = ant.chat_requests[0]
    assert rec.headers["authorization"] == f"Bearer {KEY}"  # SDK 2.x: not x-api-key
    assert "anthropic-version" in rec.headers
    assert rec.json["system"] == "be brief" and rec.completed


async def test_anthropic_sdk_streams(ant: FakeAnthropic, claude: anthropic.AsyncAnthropic) -> None:
    client = claude
    ant.enqueue(Ok(tokens=["Hi", " there"]))
    async with client.messages.stream(model="m", max_tokens=2, messages=MSGS) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hi there" and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 2 and final.usage.input_tokens == 4
    events = await client.messages.create(model="m", max_tokens=2, messages=MSGS, stream=True)
    types = [e.type async for e in events]
    assert types == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


async def test_anthropic_raw_sse_and_stop_reasons(ant: FakeAnthropic) -> None:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(base_url=ant.base_url, headers=headers) as c:
        body = {"model": "m", "max_tokens": 10, "messages": MSGS}
        _, lines, err = await sse(c, "/v1/messages", body)
        names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        assert err is None and names[:3] == ["message_start", "content_block_start", "ping"]
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
        assert payloads(lines)[-2]["delta"]["stop_reason"] == "end_turn"
        r = await c.post("/v1/messages", json={**body, "max_tokens": 2})
        assert r.json()["stop_reason"] == "max_tokens" and r.headers["request-id"].startswith("req")
        ant.enqueue(EndWithoutFinish(1))
        _, lines, _ = await sse(c, "/v1/messages", body)
        names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        assert "message_delta" not in names and names[-1] == "message_stop"


async def test_anthropic_sdk_errors(ant: FakeAnthropic, claude: anthropic.AsyncAnthropic) -> None:
    client = claude
    ant.enqueue(Overloaded(), Status(429, retry_after_s=3), Status(500), UnknownModel(), ContextTooLong())

    async def call() -> Any:
        return await client.messages.create(model="m", max_tokens=5, messages=MSGS)

    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await call()
    assert isinstance(overloaded.value, anthropic.InternalServerError)
    assert overloaded.value.status_code == 529
    assert overloaded.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": overloaded.value.body["request_id"],  # type: ignore[index]
    }
    with pytest.raises(anthropic.RateLimitError) as limited:
        await call()
    assert limited.value.response.headers["retry-after"] == "3"
    with pytest.raises(anthropic.InternalServerError):
        await call()
    with pytest.raises(anthropic.NotFoundError):
        await call()
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        await call()
    assert ant.connections_accepted == 1, "the SDK's pool keeps one connection alive"
    async with sdk(ant, key="wrong") as wrong:
        with pytest.raises(anthropic.AuthenticationError):
            await wrong.messages.create(model="m", max_tokens=5, messages=MSGS)


async def test_anthropic_validation(ant: FakeAnthropic, claude: anthropic.AsyncAnthropic) -> None:
    client = claude
    bad: list[list[MessageParam]] = [
        [{"role": "system", "content": "x"}, *MSGS],
        [{"role": "assistant", "content": "x"}],
        [*MSGS, *MSGS],
    ]
    for messages in bad:
        with pytest.raises(anthropic.BadRequestError) as err:
            await client.messages.create(model="m", max_tokens=5, messages=messages)
        assert err.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(base_url=ant.base_url) as c:
        r = await c.post("/v1/messages", json={"model": "m", "messages": MSGS}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["message"] == "max_tokens: Field required"
        r = await c.post(
            "/v1/messages", json={"model": "m", "max_tokens": 1, "messages": MSGS}, headers={"x-api-key": KEY}
        )
        assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
    assert ant.pending_behaviours == 0 and len(ant.chat_requests) == 5


async def test_anthropic_mid_stream_faults(ant: FakeAnthropic, claude: anthropic.AsyncAnthropic) -> None:
    client = claude
    ant.enqueue(InBandError(1, "Overloaded"), ResetAfter(1))
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as err:
        async with client.messages.stream(model="m", max_tokens=5, messages=MSGS) as stream:
            async for text in stream.text_stream:
                seen.append(text)
    assert seen == ["tok0 "] and err.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    seen.clear()
    # Mid-stream transport errors escape the SDK unwrapped, as httpx2 (not httpx) exceptions.
    with pytest.raises(httpx2.ReadError) as reset:
        async with client.messages.stream(model="m", max_tokens=5, messages=MSGS) as stream:
            async for text in stream.text_stream:
                seen.append(text)
    assert seen == ["tok0 "] and not isinstance(reset.value, httpx.HTTPError | anthropic.APIError)
    assert ant.chat_requests[1].server_aborted
