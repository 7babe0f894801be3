"""The fakes' recording and their small hand-written HTTP/1.1 layer (exact resets, stalls, disconnects)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from tests.upstreams.behaviours import (
    Behaviour,
)

# ----------------------------------------------------------------------------- recording


@dataclass(eq=False)
class RecordedRequest:
    """One HTTP request as the server saw it, plus what happened to its response.

    Times are ``time.monotonic()``. ``closed_at`` is set when the response completed normally
    (``completed``), when the client closed the connection / abandoned the response
    (``client_closed``, seen as EOF on read or a write error, even during stalls), or when a
    behaviour reset the connection (``server_aborted``).
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any
    received_at: float
    connection_id: int
    first_byte_sent_at: float | None = None
    closed_at: float | None = None
    completed: bool = False
    client_closed: bool = False
    server_aborted: bool = False
    status: int | None = None
    behaviour: Behaviour | None = None
    events_sent: int = 0
    _closed: threading.Event = field(default_factory=threading.Event, repr=False)

    def _finish(self, *, completed: bool = False, client_closed: bool = False, aborted: bool = False) -> None:
        """Record how the exchange ended; only the first call counts."""
        if self._closed.is_set():
            return
        self.closed_at = time.monotonic()
        self.completed, self.client_closed, self.server_aborted = completed, client_closed, aborted
        self._closed.set()

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Block until ``closed_at`` is set; False on timeout."""
        return self._closed.wait(timeout)

    async def wait_closed_async(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Like ``wait_closed`` without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while not self._closed.is_set():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)
        return True


@dataclass
class ChatContext:
    """A validated chat request, handed to the provider hooks."""

    record: RecordedRequest
    body: dict[str, Any]
    model: str
    stream: bool
    prompt_tokens: int
    max_tokens: int | None
    response_id: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def count_words(content: Any) -> int:
    """Whitespace words in a message content (string or list of ``{"text": ...}`` parts)."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(count_words(p.get("text", "")) for p in content if isinstance(p, dict))
    return 0


def dumps(obj: Any) -> bytes:
    """Compact JSON, as vLLM and Anthropic send it."""
    return json.dumps(obj, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------- HTTP layer


class ClientGone(Exception):
    """The client closed the connection (EOF on read, or a write failed)."""


class _Aborted(Exception):
    """A behaviour reset the connection on purpose."""


class _Connection:
    """One accepted TCP connection; a pump task reads ahead so EOF is seen at any moment."""

    def __init__(self, cid: int, writer: asyncio.StreamWriter) -> None:
        self.cid = cid
        self.writer = writer
        self.buf = asyncio.StreamReader(limit=1 << 20)
        self.eof = asyncio.Event()
        self.active: RecordedRequest | None = None

    async def pump(self, reader: asyncio.StreamReader) -> None:
        """Copy socket bytes into ``buf``; on EOF mark the in-flight request client-closed."""
        try:
            while data := await reader.read(65536):
                self.buf.feed_data(data)
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof.set()
            self.buf.feed_eof()
            if self.active is not None:
                self.active._finish(client_closed=True)

    def abort(self, rst: bool = True) -> None:
        """Drop the connection: RST (``SO_LINGER`` 0 + abort) or a plain FIN after flushing."""
        if self.active is not None:
            self.active._finish(aborted=True)
        transport = self.writer.transport
        if not rst:
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


class Exchange:
    """Writes one response on a connection and watches for the client going away."""

    def __init__(self, conn: _Connection, record: RecordedRequest, extra_headers: dict[str, str]):
        self.conn, self.record, self.extra_headers = conn, record, extra_headers
        self.head_sent = False

    async def _write(self, data: bytes, final: bool = False) -> None:
        """Write and drain; ``final`` marks the exchange completed before the bytes leave, so
        a client that has read the whole response always sees ``completed`` already set."""
        if self.conn.eof.is_set():
            raise ClientGone
        if self.record.first_byte_sent_at is None:
            self.record.first_byte_sent_at = time.monotonic()
        if final:
            self.record._finish(completed=True)
        try:
            self.conn.writer.write(data)
            await self.conn.writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            self.record._finish(client_closed=True)
            raise ClientGone from exc

    def _head(self, status: int, headers: dict[str, str]) -> bytes:
        self.record.status, self.head_sent = status, True
        lines = [f"HTTP/1.1 {status} {_phrase(status)}", "server: fake-upstream"]
        lines += [f"{k}: {v}" for k, v in {**self.extra_headers, **headers}.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send a complete Content-Length response."""
        hdrs = {"content-type": content_type, "content-length": str(len(body)), **(headers or {})}
        await self._write(self._head(status, hdrs) + body, final=True)

    async def respond_partial(self, status: int, body: bytes, rst: bool = True) -> None:
        """Announce the full body, send half of it, then reset the connection."""
        hdrs = {"content-type": "application/json", "content-length": str(len(body))}
        await self._write(self._head(status, hdrs) + body[: len(body) // 2])
        await self.abort(rst)

    async def start_stream(self, headers: dict[str, str] | None = None) -> None:
        """Send a 200 ``text/event-stream`` head with chunked transfer encoding."""
        hdrs = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        hdrs["transfer-encoding"] = "chunked"
        await self._write(self._head(200, {**hdrs, **(headers or {})}))

    async def send_event(self, data: bytes) -> None:
        """Send one SSE event (already framed, ending in a blank line) as one HTTP chunk."""
        await self._write(b"%x\r\n%s\r\n" % (len(data), data))
        self.record.events_sent += 1

    async def end_stream(self) -> None:
        """Send the last (empty) chunk; the connection stays usable."""
        await self._write(b"0\r\n\r\n", final=True)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but raise ``ClientGone`` as soon as the client closes the connection."""
        if self.conn.eof.is_set():
            raise ClientGone
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.conn.eof.wait(), seconds)
            raise ClientGone

    async def abort(self, rst: bool = True) -> None:
        """Let written bytes leave the socket buffer, then drop the connection."""
        self.conn.writer.transport.set_write_buffer_limits(0)  # drain() now waits for empty
        with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
            await asyncio.wait_for(self.conn.writer.drain(), 1.0)
        self.conn.abort(rst)
        raise _Aborted


def _phrase(status: int) -> str:
    if status == 529:
        return "Overloaded"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _read_request(conn: _Connection) -> tuple[str, str, dict[str, str], bytes] | None:
    """Parse one request (line, headers, Content-Length or chunked body); None at EOF."""
    buf = conn.buf
    try:
        line = b"\r\n"
        while line in (b"\r\n", b"\n"):
            line = await buf.readuntil(b"\n")
        method, target, _version = line.decode("latin-1").strip().split(" ", 2)
        headers: dict[str, str] = {}
        while (raw := await buf.readuntil(b"\n")) not in (b"\r\n", b"\n"):
            name, _, value = raw.decode("latin-1").partition(":")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while size := int((await buf.readuntil(b"\n")).split(b";")[0].strip(), 16):
                body += await buf.readexactly(size)
                await buf.readuntil(b"\n")
            while (await buf.readuntil(b"\n")) not in (b"\r\n", b"\n"):
                pass
        else:
            body = await buf.readexactly(int(headers.get("content-length", "0")))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        return None
    return method, target, headers, body
