"""A scripted InferenceService on 127.0.0.1 for the client library and CLI tests.

It runs grpc.aio in a thread of its own, so blocking clients, asyncio clients and CLI subprocesses
can all talk to it. Each call pops the next scripted failure (if any), records what it received,
and otherwise answers ``"whole"`` (unary) or the scripted deltas then a final message (stream).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Failure:
    """A scripted gRPC error: code name, message, optional RetryInfo delay and ErrorInfo reason."""

    code: str
    message: str = "scripted failure"
    retry_after_s: float | None = None
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def status(self) -> Any:
        details = []
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(packed)
        if self.reason:
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain="test", metadata=self.metadata))
            details.append(packed)
        code = getattr(code_pb2, self.code)
        return rpc_status.to_status(status_pb2.Status(code=code, message=self.message, details=details))


@dataclass
class Received:
    """One call as the server saw it."""

    method: str
    request: Any
    metadata: dict[str, str]
    at: float


class Scripted(pb_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """The servicer; tests change its fields between calls."""

    def __init__(self) -> None:
        self.failures: deque[Failure] = deque()
        self.deltas: list[str] = ["who", "le"]
        self.delay_between_s = 0.0
        self.interrupt_after_text = False
        self.tool_deltas: list[pb.ToolCallDelta] = []  # sent as one delta before the text deltas
        self.fail_after_deltas: Failure | None = None  # ends the stream with this instead of a final
        self.received: list[Received] = []
        self.cancelled = threading.Event()
        self.first_delta_sent = threading.Event()
        self._lock = threading.Lock()

    def calls(self, method: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if method is None or r.method == method]

    async def _begin(self, method: str, request: Any, context: Any) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            self.received.append(Received(method, request, dict(context.invocation_metadata()), loop.time()))
            failure = self.failures.popleft() if self.failures else None
        if failure is not None:
            await context.abort_with_status(failure.status())

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.ChatResponse:
        await self._begin("Chat", request, context)
        return pb.ChatResponse(
            id="r1",
            model="m",
            message=pb.Message(role=pb.ROLE_ASSISTANT, content="whole"),
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4),
            provider="p",
        )

    async def ChatStream(self, request: pb.ChatStreamRequest, context: Any) -> AsyncIterator[pb.ChatStreamResponse]:
        await self._begin("ChatStream", request, context)
        try:
            if self.tool_deltas:
                yield pb.ChatStreamResponse(delta=pb.ChatStreamDelta(tool_calls=self.tool_deltas))
            for i, text in enumerate(self.deltas):
                if i and self.delay_between_s:
                    await asyncio.sleep(self.delay_between_s)
                yield pb.ChatStreamResponse(delta=pb.ChatStreamDelta(text=text))
                self.first_delta_sent.set()
                if self.interrupt_after_text:
                    failure = Failure(
                        "UNAVAILABLE", "reset", reason="STREAM_INTERRUPTED", metadata={"deltas_sent": "1"}
                    )
                    await context.abort_with_status(failure.status())
            if self.fail_after_deltas is not None:
                await context.abort_with_status(self.fail_after_deltas.status())
            yield pb.ChatStreamResponse(
                final=pb.ChatStreamFinal(
                    id="s1",
                    model="m",
                    finish_reason=pb.FINISH_REASON_STOP,
                    usage=pb.Usage(prompt_tokens=3, completion_tokens=len(self.deltas)),
                    provider="p",
                )
            )
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:
        await self._begin("Health", request, context)
        return pb.HealthResponse(
            status=pb.SERVING_STATUS_SERVING,
            providers=[pb.ProviderHealth(name="p", kind="vllm", state=pb.PROVIDER_STATE_HEALTHY)],
        )


class ScriptedServer:
    """``with ScriptedServer() as server: ... server.target ... server.servicer``."""

    def __init__(self) -> None:
        self.servicer = Scripted()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scripted-grpc", daemon=True)
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
