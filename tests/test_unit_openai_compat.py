"""Unit tests of the OpenAI-compatible provider's parsing and error mapping (httpx MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from service.errors import (
    InvalidRequestError,
    ProviderAuthError,
    ProviderModelNotFoundError,
    ProviderProtocolError,
    ProviderUnavailableError,
)
from service.providers.base import ChatMessage, ChatRequest, FinishReason, StreamEnd
from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider

REQ = ChatRequest(messages=(ChatMessage("user", "hi"),), max_tokens=8)


def _chunk(content: str | None = None, finish: str | None = None, role: str | None = None) -> str:
    delta: dict[str, str] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    body = {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


USAGE = (
    'data: {"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n'
)


def provider(handler: Callable[[httpx.Request], httpx.Response]) -> OpenAICompatProvider:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return OpenAICompatProvider(
        OpenAICompatConfig(name="modal", base_url="http://up", model="m", model_env_var="MODAL_MODEL"), client
    )


class Body(httpx.AsyncByteStream):
    """A response body delivered in pieces of ``size`` bytes, as a socket would."""

    def __init__(self, data: bytes, size: int = 1 << 16) -> None:
        self.data, self.size = data, size

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for i in range(0, len(self.data), self.size):
            yield self.data[i : i + self.size]


def sse(*events: str, status: int = 200) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, stream=Body("".join(events).encode()), headers={"content-type": "text/event-stream"}
        )

    return handler


async def collect(p: OpenAICompatProvider) -> list[object]:
    return [item async for item in p.stream(REQ)]


async def test_stream_yields_deltas_then_end_with_usage() -> None:
    items = await collect(
        provider(
            sse(_chunk(role="assistant"), _chunk("Hel"), _chunk("lo"), _chunk(finish="stop"), USAGE, "data: [DONE]\n\n")
        )
    )
    assert items[:2] == ["Hel", "lo"]
    end = items[2]
    assert isinstance(end, StreamEnd) and len(items) == 3
    assert end.finish_reason is FinishReason.STOP
    assert (end.usage.prompt_tokens, end.usage.completion_tokens) == (5, 2)


async def test_stream_request_asks_for_usage() -> None:
    seen: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return sse(_chunk("a"), _chunk(finish="length"), "data: [DONE]\n\n")(request)

    await collect(provider(handler))
    assert seen["stream"] is True and seen["stream_options"] == {"include_usage": True}
    assert seen["model"] == "m" and seen["max_tokens"] == 8


async def test_stream_handles_events_split_across_reads() -> None:
    body = (_chunk("ab") + _chunk(finish="stop") + "data: [DONE]\n\n").encode()
    items = await collect(provider(lambda r: httpx.Response(200, stream=Body(body, size=7))))
    assert items[0] == "ab" and isinstance(items[1], StreamEnd)


async def test_in_band_error_chunk_is_a_failure() -> None:
    err = 'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n'
    with pytest.raises(ProviderProtocolError, match="engine died"):
        await collect(provider(sse(_chunk("a"), err, "data: [DONE]\n\n")))


async def test_stream_without_finish_reason_is_a_failure() -> None:
    with pytest.raises(ProviderProtocolError, match="without a finish reason"):
        await collect(provider(sse(_chunk("a"), "data: [DONE]\n\n")))


async def test_truncated_stream_is_a_failure() -> None:
    with pytest.raises(ProviderProtocolError, match="connection closed early"):
        await collect(provider(sse(_chunk("a"), _chunk("b"))))


async def test_malformed_sse_is_a_failure() -> None:
    with pytest.raises(ProviderProtocolError, match="malformed"):
        await collect(provider(sse(_chunk("a"), "data: {not json\n\n")))


async def test_unary_parses_completion() -> None:
    body = {
        "id": "x",
        "model": "m",
        "choices": [{"message": {"role": "assistant", "content": "yo"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    result = await provider(lambda r: httpx.Response(200, json=body)).chat(REQ)
    assert (result.content, result.finish_reason, result.usage.total_tokens) == ("yo", FinishReason.LENGTH, 4)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, InvalidRequestError),
        (422, InvalidRequestError),
        (401, ProviderAuthError),
        (403, ProviderAuthError),
        (429, ProviderUnavailableError),
        (500, ProviderUnavailableError),
        (502, ProviderUnavailableError),
        (503, ProviderUnavailableError),
    ],
)
async def test_http_errors_map_to_domain_errors(status: int, error: type[Exception]) -> None:
    body = {"error": {"message": f"upstream says {status}", "type": "X", "code": status}}
    p = provider(lambda r: httpx.Response(status, json=body))
    with pytest.raises(error, match=f"upstream says {status}"):
        await p.chat(REQ)
    with pytest.raises(error):
        await collect(p)


async def test_429_carries_retry_after() -> None:
    p = provider(lambda r: httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"retry-after": "2"}))
    with pytest.raises(ProviderUnavailableError) as info:
        await p.chat(REQ)
    assert info.value.retry_after_s == 2.0 and info.value.retryable


async def test_404_names_the_variable_and_served_models() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "Qwen/Qwen2.5-7B-Instruct"}]})
        return httpx.Response(404, json={"error": {"message": "The model `m` does not exist."}})

    with pytest.raises(ProviderModelNotFoundError) as info:
        await provider(handler).chat(REQ)
    assert "MODAL_MODEL='m'" in info.value.message
    assert info.value.served == ["Qwen/Qwen2.5-7B-Instruct"]


async def test_connect_error_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ProviderUnavailableError, match="connection failed"):
        await provider(handler).chat(REQ)
    with pytest.raises(ProviderUnavailableError):
        await collect(provider(handler))


async def test_health_reports_model_mismatch() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, json={"data": [{"id": "other"}]})

    report = await provider(handler).check_health(1.0)
    assert not report.ok and "MODAL_MODEL='m'" in report.error and report.served_models == ["other"]
