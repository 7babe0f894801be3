"""OpenAI-API load clients: a raw asyncio HTTP/1.1 client and an aiohttp one.

Both speak ``POST /v1/chat/completions`` unary and SSE (with ``stream_options.include_usage``), keep
connections alive, and report the arrival time of each text chunk. The same client is used for the
direct baseline and for the LiteLLM proxy, so any client cost cancels out of "added latency";
``bench.run`` measures both clients on the direct baseline and records which one adds less.

The raw client exists because the client shares a core with the fake upstream: it parses only the
status line, ``Content-Length``/``Transfer-Encoding``, chunk frames and ``data:`` lines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import orjson

OnText = Callable[[float], None]


class HTTPStatusError(Exception):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


class BadResponseError(Exception):
    """The answer was not a well-formed completion (no text, no finish reason, no [DONE])."""


def request_body(model: str, prompt: str, max_tokens: int, stream: bool) -> bytes:
    """The JSON body the benchmark sends (the same fields the gateway sends upstream)."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def check_unary(body: bytes) -> None:
    """Raises BadResponseError unless ``body`` is a completion with text."""
    try:
        data = orjson.loads(body)
        content = data["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise BadResponseError(f"not a completion: {body[:200]!r}") from exc
    if not content:
        raise BadResponseError("completion without text")


class SSEState:
    """Follows one SSE completion stream: text chunks, finish reason, [DONE]."""

    __slots__ = ("completion_tokens", "done", "error", "finished", "on_text")

    def __init__(self, on_text: OnText) -> None:
        self.on_text = on_text
        self.done = False
        self.finished = False
        self.completion_tokens = 0
        self.error: str | None = None

    def data(self, payload: bytes, t: float) -> None:
        """Handles one ``data:`` payload received at ``t``."""
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.error = f"malformed SSE data {payload[:80]!r}"
            return
        if "error" in chunk:
            self.error = f"error in stream: {payload[:200]!r}"
            return
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            if (choice.get("delta") or {}).get("content"):
                self.on_text(t)
            if choice.get("finish_reason"):
                self.finished = True
        usage = chunk.get("usage")
        if usage:
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def check(self) -> None:
        """Raises BadResponseError unless the stream ended properly."""
        if self.error:
            raise BadResponseError(self.error)
        if not (self.done and self.finished):
            raise BadResponseError(f"stream ended early (finish={self.finished}, [DONE]={self.done})")


class LoadClient(Protocol):
    """What the load generator needs from an HTTP client."""

    async def unary(self) -> None:
        """One unary completion; raises on any failure."""

    async def stream(self, on_text: OnText) -> int:
        """One streamed completion; calls ``on_text(t)`` per text chunk; returns the completion
        tokens of the final usage; raises on any failure."""

    async def aclose(self) -> None:
        """Closes every connection."""


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.sse = bytearray()
        self.body = bytearray()
        self.future: asyncio.Future[int] | None = None
        self.usable = True
        self._head = True
        self._status = 0
        self._length: int | None = None
        self._chunked = False
        self._keep_alive = True
        self._stream: SSEState | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keeps the transport."""
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Completes an EOF-delimited body, fails any other pending request."""
        self.usable = False
        fut = self.future
        if fut is not None and not fut.done():
            if not self._head and self._length is None and not self._chunked:
                fut.set_result(self._status)
            else:
                fut.set_exception(ConnectionError(f"connection closed mid-response: {exc}"))

    def send(self, payload: bytes, stream: SSEState | None) -> asyncio.Future[int]:
        """Sends one request; the future resolves to the status once the body is complete."""
        assert self.transport is not None
        self.future = asyncio.get_running_loop().create_future()
        self._head = True
        self._stream = stream
        self.body.clear()
        self.sse.clear()
        self.transport.write(payload)
        return self.future

    def data_received(self, data: bytes) -> None:
        """Parses what arrived; every chunk of one read shares one timestamp."""
        self.buf += data
        try:
            self._parse(time.perf_counter())
        except Exception as exc:  # a parse error fails the request, never the loop
            self.usable = False
            if self.future is not None and not self.future.done():
                self.future.set_exception(exc)
            if self.transport is not None:
                self.transport.close()

    def _parse(self, t: float) -> None:
        buf = self.buf
        if self._head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            self._status = int(lines[0].split(b" ", 2)[1])
            self._length = None
            self._chunked = False
            self._keep_alive = not lines[0].startswith(b"HTTP/1.0")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self._length = int(value)
                elif name == b"transfer-encoding":
                    self._chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    self._keep_alive = value.strip().lower() != b"close"
            del buf[: end + 4]
            self._head = False
        if self._chunked:
            while True:
                nl = buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(bytes(buf[:nl]).split(b";", 1)[0], 16)
                if size == 0:
                    if buf.find(b"\r\n\r\n", nl) < 0:
                        return
                    buf.clear()
                    self._complete()
                    return
                if len(buf) < nl + 2 + size + 2:
                    return
                self._feed(bytes(buf[nl + 2 : nl + 2 + size]), t)
                del buf[: nl + 2 + size + 2]
        elif self._length is not None:
            take = min(len(buf), self._length)
            if take:
                self._feed(bytes(buf[:take]), t)
                del buf[:take]
                self._length -= take
            if self._length == 0:
                self._complete()
        elif buf:
            self._feed(bytes(buf), t)
            buf.clear()

    def _feed(self, payload: bytes, t: float) -> None:
        stream = self._stream
        if stream is None or self._status != 200:
            self.body += payload
            return
        sse = self.sse
        sse += payload
        while True:
            nl = sse.find(b"\n")
            if nl < 0:
                return
            line = bytes(sse[:nl]).rstrip(b"\r")
            del sse[: nl + 1]
            if line.startswith(b"data:"):
                stream.data(line[5:].strip(), t)

    def _complete(self) -> None:
        if not self._keep_alive:
            self.usable = False
            if self.transport is not None:
                self.transport.close()
        fut = self.future
        if fut is not None and not fut.done():
            fut.set_result(self._status)


class RawHTTPClient:
    """Raw asyncio client with a LIFO pool of keep-alive connections."""

    def __init__(self, base_url: str, model: str, prompt: str, max_tokens: int, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        path = parts.path.rstrip("/") + "/v1/chat/completions"
        self.timeout_s = timeout_s
        self._idle: list[_Conn] = []
        self._all: set[_Conn] = set()
        self._unary = self._request(path, request_body(model, prompt, max_tokens, stream=False))
        self._stream = self._request(path, request_body(model, prompt, max_tokens, stream=True))

    def _request(self, path: str, body: bytes) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer sk-bench\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def _acquire(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                return conn
            self._all.discard(conn)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, self.host, self.port)
        self._all.add(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        if conn.usable:
            self._idle.append(conn)
        else:
            self._all.discard(conn)

    async def _call(self, payload: bytes, stream: SSEState | None) -> _Conn:
        conn = await self._acquire()
        try:
            async with asyncio.timeout(self.timeout_s):
                status = await conn.send(payload, stream)
        except BaseException:
            conn.usable = False
            if conn.transport is not None:
                conn.transport.close()
            self._all.discard(conn)
            raise
        if status != 200:
            self._release(conn)
            raise HTTPStatusError(status, bytes(conn.body))
        return conn

    async def unary(self) -> None:
        """One unary completion."""
        conn = await self._call(self._unary, None)
        body = bytes(conn.body)
        self._release(conn)
        check_unary(body)

    async def stream(self, on_text: OnText) -> int:
        """One streamed completion; returns its completion tokens."""
        state = SSEState(on_text)
        conn = await self._call(self._stream, state)
        self._release(conn)
        state.check()
        return state.completion_tokens

    async def aclose(self) -> None:
        """Closes every connection."""
        for conn in self._all:
            if conn.transport is not None:
                conn.transport.close()
        self._all.clear()
        self._idle.clear()


class AiohttpClient:
    """The same calls over one ``aiohttp.ClientSession`` (unlimited pool, keep-alive)."""

    def __init__(self, base_url: str, model: str, prompt: str, max_tokens: int, timeout_s: float) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self._unary_body = request_body(model, prompt, max_tokens, stream=False)
        self._stream_body = request_body(model, prompt, max_tokens, stream=True)
        self._headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: Any = None

    def _get_session(self) -> Any:
        if self._session is None:
            connector = self._aiohttp.TCPConnector(limit=0, limit_per_host=0)
            self._session = self._aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def unary(self) -> None:
        """One unary completion."""
        session = self._get_session()
        async with session.post(self.url, data=self._unary_body, headers=self._headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise HTTPStatusError(resp.status, body)
        check_unary(body)

    async def stream(self, on_text: OnText) -> int:
        """One streamed completion; returns its completion tokens."""
        session = self._get_session()
        state = SSEState(on_text)
        async with session.post(self.url, data=self._stream_body, headers=self._headers) as resp:
            if resp.status != 200:
                raise HTTPStatusError(resp.status, await resp.read())
            async for raw in resp.content:
                t = time.perf_counter()
                line = raw.strip()
                if line.startswith(b"data:"):
                    state.data(line[5:].strip(), t)
        state.check()
        return state.completion_tokens

    async def aclose(self) -> None:
        """Closes the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def make_client(
    kind: str, base_url: str, model: str, prompt: str, max_tokens: int, timeout_s: float
) -> RawHTTPClient | AiohttpClient:
    """``kind`` is ``raw`` or ``aiohttp``."""
    if kind == "raw":
        return RawHTTPClient(base_url, model, prompt, max_tokens, timeout_s)
    if kind == "aiohttp":
        return AiohttpClient(base_url, model, prompt, max_tokens, timeout_s)
    raise ValueError(f"unknown HTTP client {kind!r} (raw or aiohttp)")
