"""A fast fake OpenAI-compatible upstream (vLLM's wire format) for benchmarks.

Run it in its own process::

    python -m bench.fake_upstream --port 0 --delay-ms 0     # prints "READY <port>" when listening

Why raw asyncio Protocols and not aiohttp/uvicorn: the upstream must never be the bottleneck. Every
response is pre-rendered bytes (one per completion length), the HTTP/1.1 parser only looks for the
header terminator and ``Content-Length``, and a paced stream is a chain of ``loop.call_later``
callbacks writing pre-rendered chunks, so 2,000+ concurrent slow streams cost a timer each and no
task or coroutine.

What it serves (vLLM's exact shapes):

* ``POST /v1/chat/completions`` unary: ``chat.completion`` JSON with ``usage``, Content-Length framing.
* ``POST /v1/chat/completions`` with ``"stream": true``: ``text/event-stream`` in chunked framing;
  first chunk ``delta.role="assistant"`` with empty content, one chunk per token, the last one with
  ``finish_reason``; with ``stream_options.include_usage`` a final ``choices: []`` chunk with
  ``usage``; then ``data: [DONE]``.
* ``GET /health`` (200, empty body) and ``GET /v1/models``.

The completion length is the request's ``max_tokens`` (``--tokens`` when absent), so one upstream
serves every scenario; ``finish_reason`` is ``length``. ``--delay-ms`` paces tokens (the first one
after ``--ttft-ms``); a unary answer then arrives after ``ttft + (n - 1) * delay``.
``--paced bench-model-paced=100`` serves a second model at one token per 100 ms, so slow and fast
scenarios share one upstream (and one gateway, which passes the request's model through). An
unknown model gets vLLM's 404.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import orjson

CREATED = 1_700_000_000
RESPONSE_ID = "chatcmpl-bench0000000000000000000000000"
TOKEN_TEXT = " tok"
PROMPT_TOKENS = 12
MAX_TOKENS_LIMIT = 100_000
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Behaviour of the fake upstream.

    Attributes:
        model: The served model id (``/v1/models`` and responses).
        default_tokens: Completion length when a request has no ``max_tokens``.
        delay_s: Pause between two tokens of one completion of ``model`` (0 = all at once).
        ttft_s: Pause before the first token of ``model``.
        paced: Extra models ``(name, delay_s)`` paced at one token per ``delay_s`` (first token
            after ``delay_s`` too), so one upstream serves fast and slow scenarios.
    """

    model: str = "bench-model"
    default_tokens: int = 16
    delay_s: float = 0.0
    ttft_s: float = 0.0
    paced: tuple[tuple[str, float], ...] = ()

    def timing(self) -> dict[str, tuple[float, float]]:
        """Model -> (delay between tokens, time to first token), seconds."""
        out = {self.model: (self.delay_s, self.ttft_s)}
        out.update({name: (delay, delay) for name, delay in self.paced})
        return out


@dataclass(frozen=True, slots=True)
class StreamParts:
    """Pre-rendered pieces of one streamed completion (HTTP chunked framing included)."""

    head: bytes  # status line, headers, and the role chunk
    middle: bytes  # a token chunk without finish reason
    last: bytes  # the token chunk carrying finish_reason
    tail: bytes  # usage chunk (when asked), [DONE], and the terminating zero-size chunk
    tail_no_usage: bytes


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk holding one SSE event."""
    event = b"data: " + payload + b"\n\n"
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


def _headers(status: str, content_type: bytes, extra: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\nserver: bench-fake-upstream\r\n"
        + extra
        + b"\r\n"
    )


class Renderer:
    """Builds and caches the byte responses for each completion length."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.timing = config.timing()
        self._unary: dict[tuple[str, int], bytes] = {}
        self._stream: dict[tuple[str, int], StreamParts] = {}
        models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": CREATED,
                        "owned_by": "vllm",
                        "root": name,
                        "parent": None,
                        "max_model_len": 32768,
                        "permission": [],
                    }
                    for name in self.timing
                ],
            }
        )
        self.models = self._full(b"200 OK", b"application/json", models)
        self.health = self._full(b"200 OK", b"application/json", b"")
        self.not_found = self._full(
            b"404 Not Found",
            b"application/json",
            orjson.dumps({"error": {"message": "Not Found", "type": "NotFoundError", "param": None, "code": 404}}),
        )
        self.model_not_found = self._full(
            b"404 Not Found",
            b"application/json",
            orjson.dumps(
                {"error": {"message": "model not served", "type": "NotFoundError", "param": None, "code": 404}}
            ),
        )
        self.bad_request = self._full(
            b"400 Bad Request",
            b"application/json",
            orjson.dumps(
                {"error": {"message": "malformed request", "type": "BadRequestError", "param": None, "code": 400}}
            ),
        )

    @staticmethod
    def _full(status: bytes, content_type: bytes, body: bytes) -> bytes:
        return _headers(status.decode(), content_type, b"content-length: %d\r\n" % len(body)) + body

    def unary(self, model: str, n: int) -> bytes:
        """The whole HTTP response of a unary completion of ``n`` tokens."""
        cached = self._unary.get((model, n))
        if cached is None:
            body = orjson.dumps(
                {
                    "id": RESPONSE_ID,
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "reasoning_content": None,
                                "content": TOKEN_TEXT * n,
                                "tool_calls": [],
                            },
                            "logprobs": None,
                            "finish_reason": "length",
                            "stop_reason": None,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": PROMPT_TOKENS,
                        "total_tokens": PROMPT_TOKENS + n,
                        "completion_tokens": n,
                        "prompt_tokens_details": None,
                    },
                    "prompt_logprobs": None,
                }
            )
            cached = self._full(b"200 OK", b"application/json", body)
            self._unary[(model, n)] = cached
        return cached

    def stream(self, model: str, n: int) -> StreamParts:
        """The pieces of a streamed completion of ``n`` tokens."""
        cached = self._stream.get((model, n))
        if cached is not None:
            return cached

        def chunk(delta: dict[str, object], finish: str | None) -> bytes:
            choice: dict[str, object] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = None
            return _chunk(
                orjson.dumps(
                    {
                        "id": RESPONSE_ID,
                        "object": "chat.completion.chunk",
                        "created": CREATED,
                        "model": model,
                        "choices": [choice],
                    }
                )
            )

        usage = _chunk(
            orjson.dumps(
                {
                    "id": RESPONSE_ID,
                    "object": "chat.completion.chunk",
                    "created": CREATED,
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": PROMPT_TOKENS,
                        "total_tokens": PROMPT_TOKENS + n,
                        "completion_tokens": n,
                    },
                }
            )
        )
        done = _chunk(b"[DONE]") + b"0\r\n\r\n"
        head = _headers(
            "200 OK", b"text/event-stream; charset=utf-8", b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n"
        ) + chunk({"role": "assistant", "content": ""}, None)
        token = chunk({"content": TOKEN_TEXT}, None)
        cached = StreamParts(
            head=head,
            middle=token,
            last=chunk({"content": TOKEN_TEXT}, "length"),
            tail=usage + done,
            tail_no_usage=done,
        )
        self._stream[(model, n)] = cached
        return cached


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are served one at a time, in order."""

    __slots__ = ("_buf", "_busy", "_close_after", "_closed", "_handle", "_renderer", "_stats", "_transport")

    def __init__(self, renderer: Renderer, stats: Stats) -> None:
        self._renderer = renderer
        self._stats = stats
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False
        self._closed = False
        self._close_after = False
        self._handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keeps the transport (asyncio and uvloop both set TCP_NODELAY on TCP sockets)."""
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._stats.connections += 1
        self._stats.open_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        """Stops any paced stream (a client that closes aborts the generation, as in vLLM)."""
        self._closed = True
        self._stats.open_connections -= 1
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._stats.active_streams -= 1
            self._stats.aborted += 1

    def data_received(self, data: bytes) -> None:
        """Buffers bytes and serves every complete request, unless a response is in progress."""
        self._buf += data
        if not self._busy:
            self._process()

    def _process(self) -> None:
        while not self._busy and not self._closed:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    self._fail()
                return
            head = bytes(buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                self._fail()
                return
            method, target, version = parts
            length = 0
            chunked = False
            close = version == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                lname = name.strip().lower()
                if lname == "content-length":
                    length = int(value.strip())
                elif lname == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
                elif lname == "connection":
                    v = value.strip().lower()
                    close = v == "close" or (close and v != "keep-alive")
            start = end + 4
            if chunked:
                decoded = _dechunk(buf, start)
                if decoded is None:
                    return  # wait for the rest
                body, consumed = decoded
                del buf[:consumed]
            else:
                if len(buf) - start < length:
                    return
                body = bytes(buf[start : start + length])
                del buf[: start + length]
            self._close_after = close
            self._dispatch(method, target.split("?", 1)[0], body)

    def _fail(self) -> None:
        if self._transport is not None:
            self._transport.write(self._renderer.bad_request)
            self._transport.close()
        self._closed = True

    def _finish(self, data: bytes) -> None:
        """Writes the end of a response and serves any request that arrived meanwhile."""
        transport = self._transport
        assert transport is not None
        transport.write(data)
        self._stats.requests += 1
        if self._close_after:
            transport.close()
            return
        self._busy = False
        if self._buf:
            self._process()

    def _dispatch(self, method: str, path: str, body: bytes) -> None:
        r = self._renderer
        if method == "POST" and path.endswith("/chat/completions"):
            try:
                req = orjson.loads(body)
                n = int(req.get("max_tokens") or req.get("max_completion_tokens") or r.config.default_tokens)
                n = max(1, min(n, MAX_TOKENS_LIMIT))
                stream = bool(req.get("stream"))
                usage = bool((req.get("stream_options") or {}).get("include_usage"))
                model = str(req.get("model") or r.config.model)
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                self._busy = True
                self._finish(r.bad_request)
                return
            self._busy = True
            timing = r.timing.get(model)
            if timing is None:
                self._finish(r.model_not_found)
            elif stream:
                self._start_stream(model, n, usage, *timing)
            else:
                self._unary(model, n, *timing)
        elif method == "GET" and path == "/health":
            self._busy = True
            self._finish(r.health)
        elif method == "GET" and path.endswith("/models"):
            self._busy = True
            self._finish(r.models)
        else:
            self._busy = True
            self._finish(r.not_found)

    def _unary(self, model: str, n: int, delay_s: float, ttft_s: float) -> None:
        wait = ttft_s + max(0, n - 1) * delay_s
        data = self._renderer.unary(model, n)
        if wait <= 0:
            self._finish(data)
            return
        loop = asyncio.get_running_loop()
        self._stats.active_streams += 1

        def fire() -> None:
            self._handle = None
            self._stats.active_streams -= 1
            if not self._closed:
                self._finish(data)

        self._handle = loop.call_later(wait, fire)

    def _start_stream(self, model: str, n: int, usage: bool, delay_s: float, ttft_s: float) -> None:
        parts = self._renderer.stream(model, n)
        transport = self._transport
        assert transport is not None
        tail = parts.tail if usage else parts.tail_no_usage
        self._stats.streams += 1
        if delay_s <= 0 and ttft_s <= 0:
            # Unpaced: the whole stream in one write, as an engine with a full buffer would.
            self._finish(parts.head + parts.middle * (n - 1) + parts.last + tail)
            return
        loop = asyncio.get_running_loop()
        self._stats.active_streams += 1
        sent = 0

        def tick() -> None:
            nonlocal sent
            self._handle = None
            if self._closed:
                return
            sent += 1
            if sent < n:
                transport.write((parts.head if sent == 1 else b"") + parts.middle)
                self._handle = loop.call_later(delay_s, tick)
            else:
                self._stats.active_streams -= 1
                self._finish((parts.head if sent == 1 else b"") + parts.last + tail)

        self._handle = loop.call_later(ttft_s, tick) if ttft_s > 0 else None
        if self._handle is None:
            tick()


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """Decodes a chunked request body from ``buf[start:]``; None while incomplete."""
    out = bytearray()
    pos = start
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        size = int(bytes(buf[pos:nl]).split(b";", 1)[0], 16)
        pos = nl + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                return None
            return bytes(out), end + 4
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


@dataclass(slots=True)
class Stats:
    """Counters, printed on SIGUSR1 and at exit (cheap: plain integer fields)."""

    connections: int = 0
    open_connections: int = 0
    requests: int = 0
    streams: int = 0
    active_streams: int = 0
    aborted: int = 0


async def serve(
    config: UpstreamConfig, host: str = "127.0.0.1", port: int = 0, ready: Callable[[int], None] | None = None
) -> None:
    """Serves until cancelled; calls ``ready(port)`` once listening."""
    renderer = Renderer(config)
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(renderer, stats), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print(f"stats {stats}", file=sys.stderr, flush=True))
    started = time.monotonic()
    try:
        await stop.wait()
    finally:
        server.close()
        print(f"fake upstream stopped after {time.monotonic() - started:.1f} s: {stats}", file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed as 'READY <port>')")
    p.add_argument("--model", default="bench-model")
    p.add_argument("--tokens", type=int, default=16, help="completion length when the request has no max_tokens")
    p.add_argument("--delay-ms", type=float, default=0.0, help="pause between tokens")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="pause before the first token")
    p.add_argument(
        "--paced",
        action="append",
        default=[],
        metavar="MODEL=DELAY_MS",
        help="also serve MODEL at one token per DELAY_MS (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m bench.fake_upstream``."""
    args = _parse(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("the fake upstream binds to loopback only", file=sys.stderr)
        return 2
    paced = []
    for item in args.paced:
        name, _, delay = item.partition("=")
        paced.append((name, float(delay) / 1000.0))
    config = UpstreamConfig(args.model, args.tokens, args.delay_ms / 1000.0, args.ttft_ms / 1000.0, tuple(paced))

    def ready(port: int) -> None:
        print(f"READY {port}", flush=True)

    try:
        import uvloop
    except ImportError:
        runner: Callable[..., object] = asyncio.run
    else:
        runner = uvloop.run
    runner(serve(config, args.host, args.port, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
