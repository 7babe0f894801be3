"""Unit tests of the OpenAI/vLLM wire format (pure functions), then the provider's I/O against a
real fake upstream: normal streams, usage, in-band errors, truncation, HTTP error mapping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from service.errors import (
    InvalidRequestError,
    ProviderAuthError,
    ProviderModelNotFoundError,
    ProviderProtocolError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from service.providers.base import ChatMessage, ChatRequest, FinishReason, StreamEnd
from service.providers.http.openai_wire import SSEDecoder, error_for_status, request_body
from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider
from tests.rawserver import until
from tests.upstreams import (
    EndWithoutFinish,
    FakeOpenAI,
    InBandError,
    MalformedSSE,
    Ok,
    ResetAfter,
    StallBeforeFirstToken,
    Status,
)

REQ = ChatRequest(messages=(ChatMessage("user", "hi"),), max_tokens=8)


def chunk(content: str | None = None, finish: str | None = None, role: str | None = None) -> str:
    delta: dict[str, str] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    body = {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


USAGE = 'data: {"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
DONE = "data: [DONE]\n\n"


def decode(*events: str, piece: int = 1 << 16) -> tuple[list[str], SSEDecoder]:
    decoder = SSEDecoder("modal", "m")
    data = "".join(events).encode()
    deltas: list[str] = []
    for i in range(0, len(data), piece):
        deltas += decoder.feed(data[i : i + piece])
        if decoder.done:
            break
    return deltas, decoder


def test_sse_deltas_then_end_with_usage() -> None:
    deltas, decoder = decode(chunk(role="assistant"), chunk("Hel"), chunk("lo"), chunk(finish="stop"), USAGE, DONE)
    assert deltas == ["Hello"] and decoder.done  # one read, one delta
    end = decoder.end()
    assert end.finish_reason is FinishReason.STOP and (end.usage.prompt_tokens, end.usage.completion_tokens) == (5, 2)
    assert end.id == "c1" and end.model == "m"


@pytest.mark.parametrize("piece", [1, 3, 7, 64])
def test_sse_events_split_across_reads(piece: int) -> None:
    deltas, decoder = decode(chunk("ab"), chunk("c\u00e9"), chunk(finish="length"), DONE, piece=piece)
    assert "".join(deltas) == "abc\u00e9" and decoder.end().finish_reason is FinishReason.LENGTH


def test_sse_ignores_comments_and_crlf() -> None:
    deltas, decoder = decode(": keepalive\r\n\r\n", chunk("x").replace("\n\n", "\r\n\r\n"), chunk(finish="stop"), DONE)
    assert deltas == ["x"] and decoder.end().finish_reason is FinishReason.STOP


def test_sse_in_band_error_is_a_failure_after_the_deltas_before_it() -> None:
    err = 'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n'
    decoder = SSEDecoder("modal", "m")
    # One read holding a delta and the error: the delta is delivered, then the error stands.
    assert decoder.feed((chunk("a") + err + DONE).encode()) == ["a"]
    assert decoder.error is not None and "engine died" in decoder.error.message
    with pytest.raises(ProviderProtocolError, match="engine died"):
        decoder.end()
    with pytest.raises(ProviderProtocolError, match="engine died"):
        decode(err, DONE)  # nothing before it: raised at once


def test_sse_without_finish_reason_is_a_failure() -> None:
    _, decoder = decode(chunk("a"), DONE)
    with pytest.raises(ProviderProtocolError, match=r"without a finish reason \(\[DONE\] received\)"):
        decoder.end()
    _, truncated = decode(chunk("a"), chunk("b"))
    with pytest.raises(ProviderProtocolError, match="connection closed early"):
        truncated.end()


def test_sse_malformed_data_is_a_failure() -> None:
    with pytest.raises(ProviderProtocolError, match="malformed"):
        decode(chunk("a"), "data: {not json\n\n", piece=1)


def feed_all(data: bytes, cuts: list[int]) -> tuple[str, SSEDecoder, str | None]:
    """Feeds ``data`` cut at ``cuts`` as the provider does (stops at [DONE] or an error); returns
    the text delivered, the decoder and the error message, if any."""
    decoder = SSEDecoder("modal", "m")
    text: list[str] = []
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
        try:
            text += [i for i in decoder.feed(data[start:stop]) if isinstance(i, str)]
        except ProviderProtocolError as exc:
            return "".join(text), decoder, exc.message
        if decoder.error is not None:
            return "".join(text), decoder, decoder.error.message
        if decoder.done:
            break
    return "".join(text), decoder, None


def every_cut(data: bytes) -> Iterator[list[int]]:
    """No cut, each single cut, and one byte per read."""
    yield []
    for i in range(1, len(data)):
        yield [i]
    yield list(range(1, len(data)))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("data: {not json\n\n", "modal sent malformed SSE data: b'{not json'"),
        ("data:  [1, 2]\r\n\r\n", "modal sent SSE data that is not a JSON object: b'  [1, 2]\\r'"),
        ('data: {"error": {"message": "engine died"}}\n\n', "modal reported an error mid-stream: engine died"),
        ('data: {"choices": [{"delta": 1}]}\n\n', "modal sent an unexpected chunk shape"),
        ("data: [DONE]x\n\n", "modal sent malformed SSE data: b'[DONE]x'"),
    ],
)
def test_sse_bad_event_in_the_middle_split_at_every_byte(bad: str, message: str) -> None:
    # The text before the bad event is delivered, the one after it never is, and the error reads
    # the same however TCP cut the bytes.
    data = (chunk("a") + chunk("b") + bad + chunk("c") + chunk(finish="stop") + DONE).encode()
    for cuts in every_cut(data):
        text, decoder, error = feed_all(data, cuts)
        assert text == "ab" and error is not None and error.startswith(message), (cuts, text, error)
        assert not decoder.done
        with pytest.raises(ProviderProtocolError):
            decoder.end()


@pytest.mark.parametrize("done", ["data: [DONE]", "data:[DONE]", "data:  [DONE] ", "data: [DONE]\r", "data:\t[DONE]\r"])
def test_sse_done_in_any_spacing_ends_the_stream_and_what_follows_is_ignored(done: str) -> None:
    data = (chunk("a") + chunk(finish="stop") + done + "\n\ndata: {not json\n\n").encode()
    for cuts in every_cut(data):
        text, decoder, error = feed_all(data, cuts)
        assert (text, error, decoder.done) == ("a", None, True), cuts
        assert decoder.end().finish_reason is FinishReason.STOP


def test_sse_only_lines_that_start_with_data_are_events() -> None:
    # "data:" inside a payload, or after other characters, starts no event; text that reads
    # [DONE] is text.
    events = ["event: message\n", "id: 7\n", " data: {not json\n", chunk("data: [DONE]"), chunk("[DONE]")]
    data = ("".join(events) + chunk(finish="stop") + DONE).encode()
    for cuts in every_cut(data):
        text, decoder, error = feed_all(data, cuts)
        assert (text, error, decoder.done) == ("data: [DONE][DONE]", None, True), cuts


def test_request_body() -> None:
    req = ChatRequest(
        messages=(ChatMessage("system", "s"), ChatMessage("user", "u")),
        temperature=0.0,
        top_p=0.5,
        max_tokens=9,
        stop=("x",),
        seed=0,
    )
    body = request_body(req, "default", stream=True)
    assert body == {
        "model": "default",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "max_tokens": 9,
        "temperature": 0.0,
        "top_p": 0.5,
        "stop": ["x"],
        "seed": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "stream" not in request_body(REQ, "d", stream=False) and "temperature" not in request_body(REQ, "d", False)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, InvalidRequestError),
        (413, InvalidRequestError),
        (422, InvalidRequestError),
        (401, ProviderAuthError),
        (403, ProviderAuthError),
        (408, ProviderUnavailableError),
        (429, ProviderUnavailableError),
        (500, ProviderUnavailableError),
        (502, ProviderUnavailableError),
        (503, ProviderUnavailableError),
        (504, ProviderUnavailableError),
    ],
)
def test_status_mapping(status: int, error: type[Exception]) -> None:
    body = json.dumps({"error": {"message": f"upstream says {status}"}}).encode()
    err = error_for_status(
        "modal", "http://m", status, body, "2", model="m", default_model="m", model_env_var="MODAL_MODEL", served=[]
    )
    assert isinstance(err, error) and f"upstream says {status}" in err.message
    if isinstance(err, ProviderUnavailableError):
        assert err.retryable and err.retry_after_s == 2.0


def test_404_names_the_variable_and_served_models() -> None:
    err = error_for_status(
        "modal",
        "http://m",
        404,
        b"{}",
        None,
        model="m",
        default_model="m",
        model_env_var="MODAL_MODEL",
        served=["Qwen/Qwen2.5-7B-Instruct"],
    )
    assert isinstance(err, ProviderModelNotFoundError)
    assert "MODAL_MODEL='m'" in err.message and "Qwen/Qwen2.5-7B-Instruct" in err.message
    other = error_for_status(
        "modal", "http://m", 404, b"{}", None, model="x", default_model="m", model_env_var="MODAL_MODEL", served=[]
    )
    assert "model 'x'" in other.message


# ---- the provider's I/O against a real upstream --------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    srv = FakeOpenAI(models=["m"]).start()
    yield srv
    srv.stop()


@pytest_asyncio.fixture
async def provider(upstream: FakeOpenAI) -> AsyncIterator[OpenAICompatProvider]:
    upstream.reset()
    p = OpenAICompatProvider(
        OpenAICompatConfig(name="modal", base_url=upstream.base_url, model="m", model_env_var="MODAL_MODEL")
    )
    await p.start()
    yield p
    await p.aclose()


async def collect(p: OpenAICompatProvider, request: ChatRequest = REQ) -> list[object]:
    return [item async for item in p.stream(request)]


async def test_stream_over_http(upstream: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    upstream.default = Ok(tokens=["a", "b", "c"])
    items = await collect(provider)
    assert "".join(i for i in items if isinstance(i, str)) == "abc" and isinstance(items[-1], StreamEnd)
    assert items[-1].usage.completion_tokens == 3
    sent = upstream.chat_requests[-1].json
    assert sent["stream_options"] == {"include_usage": True} and sent["model"] == "m" and sent["max_tokens"] == 8


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (InBandError(1), ProviderProtocolError),
        (EndWithoutFinish(1), ProviderProtocolError),
        (MalformedSSE(1), ProviderProtocolError),
        (ResetAfter(1), ProviderUnavailableError),
    ],
)
async def test_broken_streams_fail(
    upstream: FakeOpenAI, provider: OpenAICompatProvider, behaviour: object, error: type[Exception]
) -> None:
    upstream.default = behaviour
    with pytest.raises(error):
        await collect(provider)


async def test_http_errors_over_http(upstream: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    upstream.default = Status(429, retry_after_s=3)
    with pytest.raises(ProviderUnavailableError) as info:
        await collect(provider)
    assert info.value.retry_after_s == 3.0
    with pytest.raises(ProviderModelNotFoundError) as nf:
        await collect(provider, ChatRequest(messages=REQ.messages, model="nope"))
    assert nf.value.served == ["m"]


async def test_refused_connection_is_unavailable() -> None:
    p = OpenAICompatProvider(OpenAICompatConfig(name="vastai", base_url="http://127.0.0.1:9", model="m"))
    await p.start()
    try:
        with pytest.raises(ProviderUnavailableError, match="connection failed"):
            await collect(p)
        report = await p.check_health(1.0)
        assert not report.ok and not report.reachable
    finally:
        await p.aclose()


async def test_health_reports_model_mismatch(upstream: FakeOpenAI) -> None:
    p = OpenAICompatProvider(
        OpenAICompatConfig(name="modal", base_url=upstream.base_url, model="other", model_env_var="MODAL_MODEL")
    )
    await p.start()
    try:
        report = await p.check_health(1.0)
        assert not report.ok and report.reachable and "MODAL_MODEL='other'" in report.error
        assert report.served_models == ["m"]
    finally:
        await p.aclose()


@pytest.mark.parametrize(
    "payload", ["[1, 2]", '"error"', "null", "5", '{"choices": "x"}', '{"choices": [{"delta": 1}]}']
)
def test_sse_data_that_is_not_a_chunk_object_is_a_protocol_error(payload: str) -> None:
    with pytest.raises(ProviderProtocolError, match=r"not a JSON object|unexpected chunk shape"):
        decode(chunk("a"), f"data: {payload}\n\n", DONE, piece=1)


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/V1"])
async def test_base_url_with_or_without_v1(upstream: FakeOpenAI, suffix: str, caplog: pytest.LogCaptureFixture) -> None:
    upstream.reset()
    upstream.default = Ok(tokens=["a"])
    caplog.set_level("INFO", logger="service.providers.openai_compat")
    p = OpenAICompatProvider(OpenAICompatConfig(name="vastai", base_url=upstream.base_url + suffix, model="m"))
    assert p.endpoint == upstream.base_url
    assert ("used as" in caplog.text) == ("1" in suffix.lower())
    await p.start()
    try:
        assert isinstance((await collect(p))[-1], StreamEnd)
        assert (await p.check_health(1.0)).ok
    finally:
        await p.aclose()


async def test_a_busy_traffic_pool_never_fails_a_probe_and_its_timeout_names_the_pool(upstream: FakeOpenAI) -> None:
    upstream.reset()
    upstream.default = StallBeforeFirstToken(5.0)
    p = OpenAICompatProvider(
        OpenAICompatConfig(name="vastai", base_url=upstream.base_url, model="m", max_connections=1, pool_timeout_s=0.2)
    )
    await p.start()
    held = p.stream(REQ)
    first = asyncio.ensure_future(anext(held))
    try:
        await until(lambda: bool(upstream.chat_requests))
        report = await p.check_health(2.0)  # the only traffic connection is busy
        assert report.ok, report.error
        with pytest.raises(ProviderUnavailableError, match=r"vastai \(.*\) connection pool exhausted") as info:
            await collect(p)
        assert info.value.retryable and not isinstance(info.value, ProviderTimeoutError)
        assert len(upstream.chat_requests) == 1  # nothing was sent for the call that found the pool full
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await held.aclose()
        await p.aclose()
