"""The client library's retries: UNAVAILABLE is retried inside the caller's timeout, never after text
arrived and never for other codes; errors come out as the library's own exceptions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from clients import AsyncInferenceClient, InvalidRequestError, StreamInterruptedError, UnavailableError
from service.api.status import to_grpc_status
from service.errors import AllProvidersFailedError, ProviderUnavailableError
from service.errors import InvalidRequestError as DomainInvalid
from service.errors import StreamInterruptedError as DomainInterrupted


class Scripted(pb_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """Fails the first ``failures`` calls with ``error``, then answers; counts calls."""

    def __init__(self) -> None:
        self.failures = 0
        self.error: Any = None
        self.calls = 0
        self.interrupt_after_text = False

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.ChatResponse:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort_with_status(to_grpc_status(self.error))
        return pb.ChatResponse(message=pb.Message(role=pb.ROLE_ASSISTANT, content="fine"), provider="p")

    async def ChatStream(self, request: pb.ChatStreamRequest, context: Any) -> AsyncIterator[pb.ChatStreamResponse]:
        self.calls += 1
        if self.interrupt_after_text:
            yield pb.ChatStreamResponse(delta=pb.ChatStreamDelta(text="half"))
            err = DomainInterrupted("p", ProviderUnavailableError("p", "reset"), 1)
            await context.abort_with_status(to_grpc_status(err))
        if self.calls <= self.failures:
            await context.abort_with_status(to_grpc_status(self.error))
        yield pb.ChatStreamResponse(delta=pb.ChatStreamDelta(text="whole"))
        yield pb.ChatStreamResponse(final=pb.ChatStreamFinal(provider="p"))


@pytest_asyncio.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


UNAVAILABLE = AllProvidersFailedError({"p": ProviderUnavailableError("p", "down")})


async def test_unavailable_is_retried_until_it_succeeds(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.failures, servicer.error = 2, UNAVAILABLE
    async with AsyncInferenceClient(target) as client:
        result = await client.chat("hi", timeout_s=10)
        assert result.text == "fine" and servicer.calls == 3
        servicer.calls = 0
        async with client.chat_stream("hi", timeout_s=10) as stream:
            assert [t async for t in stream] == ["whole"]
        assert servicer.calls == 3


async def test_retries_stop_at_the_callers_timeout(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.failures, servicer.error = 1000, UNAVAILABLE  # RetryInfo says 1 s between tries
    started = time.monotonic()
    async with AsyncInferenceClient(target) as client:
        with pytest.raises(UnavailableError) as info:
            await client.chat("hi", timeout_s=1.5)
    assert time.monotonic() - started < 1.5
    assert servicer.calls == 2 and info.value.metadata == {"p": "PROVIDER_UNAVAILABLE"}


async def test_caller_mistakes_are_not_retried(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.failures, servicer.error = 5, DomainInvalid("bad temperature")
    async with AsyncInferenceClient(target) as client:
        with pytest.raises(InvalidRequestError):
            await client.chat("hi")
    assert servicer.calls == 1


async def test_an_interrupted_stream_is_never_retried(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.interrupt_after_text = True
    async with AsyncInferenceClient(target) as client:
        async with client.chat_stream("hi") as stream:
            received = []
            with pytest.raises(StreamInterruptedError) as info:
                async for text in stream:
                    received.append(text)
    assert received == ["half"] and info.value.deltas_sent == 1 and servicer.calls == 1
