"""The floor: a bare ``grpc.aio`` server of ``inference.v1.InferenceService`` answering from memory.

Same proto, same load, same core as the gateway, but no routing, no upstream, no interceptors, no
accounting: ``Chat`` returns a canned response of ``max_tokens`` tokens and ``ChatStream`` sends one
message per token, then the final message. Whatever the gateway costs beyond this is the gateway's
own code; what this costs is gRPC's (and Python's) price for one call or one message, which no
change in ``service/`` can remove. The benchmark measures it in every run beside the gateway and
states the per-core targets relative to it.

Models behave like the fake upstream's: ``bench-model-gap`` sends one token every 2 ms and
``bench-model-paced`` one every 100 ms (first token included), anything else answers at once.

``python -m bench.floor --port 50061 [--processes 2]`` prints ``READY <port>``; with
``--processes N`` it starts N servers on the port (``SO_REUSEPORT``), like ``WORKERS=N``.

Two switches add one of the gateway's per-call costs at a time, to price it on the floor itself:
``--initial-metadata`` sends initial metadata before the answer (as the gateway does to echo
``x-request-id``) and ``--interceptors N`` wraps every handler in N pass-through interceptors (the
gateway wraps Chat in two: telemetry and security).

``--relay URL`` makes it a relay instead: every call goes to an OpenAI-compatible upstream (the fake
upstream) and back, with nothing else of the gateway around it. ``--relay-client raw`` sends fixed
request bytes over kept-alive connections and only scans the answer for its end (no JSON, no SSE
parsing: the cheapest possible HTTP exchange in Python on this loop); ``--relay-client provider``
goes through the gateway's own provider (``OpenAICompatProvider``: request body, connection pool,
llhttp, SSE and JSON decoding) and builds each response from the answer. The two price the upstream
leg that the floor does not have and the gateway cannot avoid, so the report can say how much of
the gateway's cost is the leg and how much is everything else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from bench.scenarios import GAP_DELAY_MS, GAP_MODEL, PACED_DELAY_MS, PACED_MODEL

DEFAULT_MODEL = "bench-model"
_PACE_S = {GAP_MODEL: GAP_DELAY_MS / 1000.0, PACED_MODEL: PACED_DELAY_MS / 1000.0}


class _RawConnection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection that only looks for the end of a chunked answer (the fake
    upstream's 200 answers are chunked; anything else would never end: a benchmark tool, no client)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.tail = b""
        self.on_data: Any = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
        tail = self.tail + data
        if tail.endswith(b"0\r\n\r\n") and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
            tail = b""
        self.tail = tail[-5:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionError("upstream closed the connection"))


class RawRelay:
    """Fixed request bytes per (model, max_tokens), an idle-connection stack, no parsing."""

    def __init__(self, url: str) -> None:
        parts = url.removeprefix("http://").rstrip("/").split(":")
        self._host, self._port = parts[0], int(parts[1])
        self._idle: list[_RawConnection] = []
        self._requests: dict[tuple[str, int], bytes] = {}

    def _request(self, model: str, n: int) -> bytes:
        key = (model, n)
        raw = self._requests.get(key)
        if raw is None:
            body = json.dumps(
                {
                    "model": model,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": n,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            ).encode()
            raw = (
                f"POST /v1/chat/completions HTTP/1.1\r\nhost: {self._host}:{self._port}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode() + body
            self._requests[key] = raw
        return raw

    async def exchange(self, model: str, n: int, on_data: Any = None) -> None:
        """One request and its whole answer on a kept-alive connection."""
        conn = self._idle.pop() if self._idle else None
        while conn is not None and conn.closed:  # the upstream closed it while idle
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_RawConnection, self._host, self._port)
        conn.waiter = asyncio.get_running_loop().create_future()
        conn.on_data = on_data
        assert conn.transport is not None
        conn.transport.write(self._request(model, n))
        await conn.waiter
        conn.on_data = None
        self._idle.append(conn)


class ProviderRelay:
    """The gateway's own provider and nothing else of the gateway."""

    def __init__(self, url: str) -> None:
        # Imported here, once: the floor without --relay runs no gateway code at all.
        from service.providers.base import ChatMessage, ChatRequest, StreamEnd
        from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider

        self.message, self.request, self.end = ChatMessage, ChatRequest, StreamEnd
        self.provider = OpenAICompatProvider(
            OpenAICompatConfig(name="relay", base_url=url, model=DEFAULT_MODEL, max_connections=4096)
        )

    def stream(self, request: Any) -> Any:
        """The provider's stream for the proto request (as the servicer's translation would make it)."""
        message = self.message
        domain = self.request(
            messages=tuple(message(role="user", content=m.content) for m in request.messages),
            model=request.model or None,
            max_tokens=request.max_tokens if request.HasField("max_tokens") else 16,
        )
        return self.provider.stream(domain)


class FloorServicer(pb_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """Canned answers, built once per (model, length) and reused: the cheapest possible handler."""

    def __init__(self, initial_metadata: bool = False, relay: RawRelay | ProviderRelay | None = None) -> None:
        self._initial_metadata = initial_metadata
        self._relay = relay
        self._unary: dict[tuple[str, int], pb.ChatResponse] = {}
        self._stream: dict[tuple[str, int], tuple[pb.ChatStreamResponse, pb.ChatStreamResponse]] = {}

    def _unary_for(self, model: str, n: int) -> pb.ChatResponse:
        key = (model, n)
        resp = self._unary.get(key)
        if resp is None:
            resp = pb.ChatResponse(
                id="floor",
                model=model,
                message=pb.Message(role=pb.ROLE_ASSISTANT, content=" tok" * n),
                finish_reason=pb.FINISH_REASON_LENGTH,
                usage=pb.Usage(prompt_tokens=8, completion_tokens=n, total_tokens=8 + n),
                provider="floor",
            )
            self._unary[key] = resp
        return resp

    def _stream_for(self, model: str, n: int) -> tuple[pb.ChatStreamResponse, pb.ChatStreamResponse]:
        key = (model, n)
        pair = self._stream.get(key)
        if pair is None:
            delta = pb.ChatStreamResponse(delta=pb.ChatStreamDelta(text=" tok"))
            final = pb.ChatStreamResponse(
                final=pb.ChatStreamFinal(
                    id="floor",
                    model=model,
                    finish_reason=pb.FINISH_REASON_LENGTH,
                    usage=pb.Usage(prompt_tokens=8, completion_tokens=n, total_tokens=8 + n),
                    provider="floor",
                )
            )
            pair = (delta, final)
            self._stream[key] = pair
        return pair

    async def Chat(self, request: pb.ChatRequest, context: Any) -> pb.ChatResponse:
        """One canned response of ``max_tokens`` tokens (16 when unset)."""
        model = request.model or DEFAULT_MODEL
        n = request.max_tokens if request.HasField("max_tokens") else 16
        pace = _PACE_S.get(model)
        if self._initial_metadata:
            await context.send_initial_metadata((("x-request-id", "floor"),))
        if isinstance(self._relay, RawRelay):
            await self._relay.exchange(model, n)
        elif self._relay is not None:
            return await self._relay_unary(request)
        elif pace:
            await asyncio.sleep(pace * n)
        return self._unary_for(model, n)

    async def _relay_unary(self, request: pb.ChatRequest) -> pb.ChatResponse:
        assert isinstance(self._relay, ProviderRelay)
        stream_end = self._relay.end
        texts: list[str] = []
        end: Any = None
        async for item in self._relay.stream(request):
            if isinstance(item, stream_end):
                end = item
            elif isinstance(item, str):
                texts.append(item)
        return pb.ChatResponse(
            id=end.id,
            model=end.model,
            message=pb.Message(role=pb.ROLE_ASSISTANT, content="".join(texts)),
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(
                prompt_tokens=end.usage.prompt_tokens,
                completion_tokens=end.usage.completion_tokens,
                total_tokens=end.usage.prompt_tokens + end.usage.completion_tokens,
            ),
            provider="relay",
        )

    async def ChatStream(self, request: pb.ChatStreamRequest, context: Any) -> AsyncIterator[pb.ChatStreamResponse]:
        """One message per token (paced like the fake upstream's models), then the final message."""
        model = request.model or DEFAULT_MODEL
        n = request.max_tokens if request.HasField("max_tokens") else 16
        delta, final = self._stream_for(model, n)
        pace = _PACE_S.get(model)
        if self._initial_metadata:
            await context.send_initial_metadata((("x-request-id", "floor"),))
        if self._relay is not None:
            async for message in self._relay_stream(request, model, n, delta):
                yield message
            yield final
            return
        for _ in range(n):
            if pace:
                await asyncio.sleep(pace)
            yield delta
        yield final

    async def _relay_stream(
        self, request: pb.ChatStreamRequest, model: str, n: int, delta: pb.ChatStreamResponse
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        """One delta message per upstream token, as it arrives."""
        if isinstance(self._relay, RawRelay):
            # Tokens counted per read (an SSE event split across two reads may be missed: the stream
            # still ends, with the answer's end, not with a count).
            queue: asyncio.Queue[int] = asyncio.Queue()
            task = asyncio.ensure_future(
                self._relay.exchange(
                    model, n, lambda data: queue.put_nowait(data.count(b'"content":"') - data.count(b'"content":""'))
                )
            )
            task.add_done_callback(lambda _: queue.put_nowait(-1))
            while (got := await queue.get()) >= 0:
                for _ in range(got):
                    yield delta
            await task
            return
        assert self._relay is not None
        async for item in self._relay.stream(request):
            if isinstance(item, str):
                yield pb.ChatStreamResponse(delta=pb.ChatStreamDelta(text=item))


class PassThrough(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps each handler in one more coroutine or async generator, as the gateway's interceptors do."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        """The handler, wrapped in a layer that only awaits (or iterates) the inner one."""
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


async def serve(
    port: int,
    reuseport: bool,
    initial_metadata: bool = False,
    interceptors: int = 0,
    relay: str = "",
    client: str = "raw",
) -> None:
    """Serves until SIGTERM/SIGINT; prints ``READY <port>`` once bound."""
    options = [
        # As the gateway's server: let every call through gRPC core (the 2,000-stream scenario).
        ("grpc.server.max_pending_requests", 4096),
        ("grpc.server.max_pending_requests_hard_limit", 8192),
        ("grpc.so_reuseport", 1 if reuseport else 0),
    ]
    server = grpc.aio.server(options=options, interceptors=[PassThrough() for _ in range(interceptors)])
    upstream: RawRelay | ProviderRelay | None = None
    if relay:
        upstream = RawRelay(relay) if client == "raw" else ProviderRelay(relay)
        if isinstance(upstream, ProviderRelay):
            await upstream.provider.start()
    pb_grpc.add_InferenceServiceServicer_to_server(FloorServicer(initial_metadata, upstream), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"could not bind 127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def _run_one(port: int, reuseport: bool, initial_metadata: bool, interceptors: int, relay: str, client: str) -> None:
    main = serve(port, reuseport, initial_metadata, interceptors, relay, client)
    try:
        import uvloop  # the gateway runs on uvloop too: the floor must not be slower for lack of it
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _run_many(port: int, n: int, extra: list[str]) -> int:
    """N single servers on one port; stops them all on SIGTERM/SIGINT (``bench.procs`` kills the group)."""
    cmd = [sys.executable, "-m", "bench.floor", "--port", str(port), "--reuseport", *extra]
    children = [subprocess.Popen(cmd) for _ in range(n)]

    def stop(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return max(child.wait() for child in children)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.floor``."""
    p = argparse.ArgumentParser(description="bare grpc.aio InferenceService answering from memory")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--processes", type=int, default=1, help="servers on the port (SO_REUSEPORT), like WORKERS")
    p.add_argument("--reuseport", action="store_true", help="bind with SO_REUSEPORT (set by --processes)")
    p.add_argument("--initial-metadata", action="store_true", help="send initial metadata before each answer")
    p.add_argument("--interceptors", type=int, default=0, help="pass-through interceptors around each handler")
    p.add_argument("--relay", default="", metavar="URL", help="relay every call to this OpenAI-compatible upstream")
    p.add_argument("--relay-client", choices=["raw", "provider"], default="raw", help="how to talk to it (see above)")
    a = p.parse_args(argv)
    if a.processes > 1:
        extra = ["--interceptors", str(a.interceptors)] + (["--initial-metadata"] if a.initial_metadata else [])
        if a.relay:
            extra += ["--relay", a.relay, "--relay-client", a.relay_client]
        return _run_many(a.port, a.processes, extra)
    _run_one(a.port, a.reuseport, a.initial_metadata, a.interceptors, a.relay, a.relay_client)
    return 0


if __name__ == "__main__":
    sys.exit(main())
