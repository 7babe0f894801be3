"""One keep-alive HTTP/1.1 connection: an asyncio Protocol whose every byte goes through llhttp.

``httptools.HttpResponseParser`` (llhttp, the parser of Node.js and uvicorn) does all the framing:
status line, headers, ``Content-Length``, chunked bodies, bodies framed by connection close, and
1xx interim responses (each completes as a message of its own: skipped here). What is left here is
the policy around it:

* A response is complete only when llhttp says so, or, for a body framed by connection close,
  when the server closed cleanly. A reset (or our own abort) in such a body is an error, never a
  short body. httptools does not expose ``llhttp_finish()``, so which bodies end at EOF is read
  from the head with llhttp's own rule (``llhttp_message_needs_eof``): no ``Content-Length`` and no
  final ``chunked`` coding, and a status that has a body.
* Bytes the caller did not ask for (after the response, or while idle, a second response, junk)
  make the connection ``dirty``: it is closed, never reused, so no answer reaches the wrong caller.
* ``101 Switching Protocols`` is a protocol violation (this client never asks to upgrade); a head
  over 64 KiB (interim heads included) is too.
* ``Keep-Alive: timeout=N`` shortens how long the connection may idle; TCP keepalive is on, so a
  peer that vanished (a NAT that dropped the flow) is found even mid-response.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import httptools

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
_PAUSE_AT_BYTES = 1 << 20
# A peer that stops answering is declared dead after IDLE + INTERVAL * COUNT seconds of silence.
KEEPALIVE_IDLE_S = 15
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


class HTTPError(Exception):
    """Base of this package's errors."""


class ConnectFailed(HTTPError, OSError):
    """The TCP, TLS or proxy tunnel connection could not be made (refused, unreachable, timed out)."""


class Disconnected(HTTPError, ConnectionError):
    """The server closed or reset the connection before the response was complete."""


class ProtocolViolation(HTTPError):
    """The server's bytes are not a valid HTTP/1.1 response (or not one this client accepts)."""


class PoolTimeout(HTTPError):
    """Every connection of the pool stayed busy for the pool's timeout; no request was sent."""


def keep_alive_timeout_s(value: str) -> float | None:
    """``timeout`` of a ``Keep-Alive: timeout=5, max=100`` header, when valid."""
    for param in value.split(","):
        name, _, number = param.partition("=")
        if name.strip().lower() == "timeout":
            try:
                seconds = float(number.strip())
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


def _set_tcp_keepalive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ):
            if hasattr(socket, option):  # Linux has all three; macOS lacks TCP_KEEPIDLE by that name
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:
        log.debug("TCP keepalive options refused by this platform", exc_info=True)


class Connection(asyncio.Protocol):
    """A keep-alive connection; one request at a time, its response parsed by llhttp."""

    __slots__ = (
        "_body",
        "_buffered",
        "_closing",
        "_expecting",
        "_head_bytes",
        "_interim",
        "_needs_eof",
        "_parser",
        "_paused",
        "_stray_from",
        "_waiter",
        "closed",
        "complete",
        "dirty",
        "error",
        "head_complete",
        "headers",
        "idle_deadline",
        "keep_alive",
        "keep_alive_s",
        "on_body",
        "received_any",
        "status",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # llhttp hands over the body once per HTTP chunk (one per SSE event from vLLM): straight
        # into the list, with no Python frame per chunk. Bytes of a response nobody asked for are
        # cut off again in data_received (see _stray_from).
        self._body: list[bytes] = []
        self.on_body = self._body.append
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._expecting = False  # a request is out and its final response not yet complete
        self._closing = False  # we closed it: an EOF that follows ends nothing
        self.closed = False
        self.dirty = False
        self.error: BaseException | None = None
        self.received_any = False
        self.keep_alive_s: float | None = None  # the server's Keep-Alive timeout, if it sent one
        self.idle_deadline = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_complete = False
        self.complete = False
        self.keep_alive = False
        self._interim = False
        self._needs_eof = False
        self._head_bytes = 0
        self._body.clear()
        self._buffered = 0
        self._stray_from: int | None = None  # where the body of an unasked-for response starts
        self._paused = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _set_tcp_keepalive(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep_alive = False
        if self._expecting:
            self._expecting = False
            if self.head_complete and self._needs_eof and exc is None and not self._closing:
                self.complete = True  # the server's clean close ends a body framed by it
            elif self.error is None:
                if exc is not None:
                    self.error = Disconnected(f"connection reset: {exc}")
                elif self.head_complete:
                    self.error = Disconnected("the server closed the connection mid-body")
                else:
                    self.error = Disconnected("the server closed the connection before a complete response head")
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if not self._expecting:
            self._drop_dirty()  # nobody asked: never let these bytes reach a later caller
            return
        body = self._body
        before = len(body)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.error = self.error or ProtocolViolation("the server switched protocols; this client never asks to")
        except httptools.HttpParserError as exc:
            if self.complete and self.error is None:
                self._drop_dirty()  # the answer is whole; what followed it is not ours to read
            else:
                self.error = self.error or ProtocolViolation(f"invalid HTTP response: {exc}")
        if self._stray_from is not None:
            del body[self._stray_from :]  # a response after ours, in the same read: never ours
        if len(body) > before:
            self._buffered += sum(map(len, body[before:]))
        if self.error is not None:
            self._fail(self.error)
        elif not self.head_complete:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(ProtocolViolation(f"response head larger than {MAX_HEAD_BYTES // 1024} KiB"))
        elif self._buffered > _PAUSE_AT_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost decides what the EOF meant

    # -- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self._expecting:
            self.dirty = True  # a second response after the one asked for
            if self._stray_from is None:
                self._stray_from = len(self._body)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._expecting:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        if not self._expecting:
            return
        parser = self._parser
        status = parser.get_status_code()
        if status == 101:
            self.error = ProtocolViolation("the server switched protocols (101), which this client never asks for")
            return
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints...: the real answer follows
            return
        self.status = status
        self.head_complete = True
        headers = self.headers
        if not parser.should_keep_alive():
            coding = headers.get("transfer-encoding", "").rsplit(",", 1)[-1].strip().lower()
            self._needs_eof = status not in (204, 304) and "content-length" not in headers and coding != "chunked"
        if "keep-alive" in headers:
            self.keep_alive_s = keep_alive_timeout_s(headers["keep-alive"])

    def on_message_complete(self) -> None:
        if not self._expecting or self.error is not None:
            return
        if self._interim:
            self._interim = False
            self.headers = {}
            return
        self._expecting = False
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()

    # -- state changes ------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._expecting = False
        self.close(abort=True)

    def _drop_dirty(self) -> None:
        self.dirty = True
        self.close(abort=True)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # a waiter that was cancelled is done
                waiter.set_result(None)

    # -- used by the pool and the response ----------------------------------------------------

    def start(self, request: bytes) -> None:
        """Sends a request; parsing of its response starts."""
        self._reset()
        self.received_any = False  # of this answer: the pool retries once on a kept-alive one without any
        if self.closed or self.transport is None:
            self.error = Disconnected("the connection was already closed")
            return
        self._expecting = True
        self.transport.write(request)

    def wait(self) -> asyncio.Future[None]:
        """A future done at the next event (bytes parsed, connection lost), to await: a future,
        not a coroutine, so each wait for bytes costs one frame less."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    async def wait_head(self) -> None:
        """Waits until the final response's head has been parsed; raises what broke it."""
        while not self.head_complete:
            if self.error is not None:
                raise self.error
            await self.wait()

    def take(self) -> bytes:
        """Body bytes parsed so far, removed from the buffer."""
        body = self._body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def tunnel_established(self, transport: asyncio.Transport) -> None:
        """After a CONNECT and TLS inside it: a fresh parser for the origin's responses."""
        self.transport = transport
        self._parser = httptools.HttpResponseParser(self)
        self._expecting = False
        self._reset()

    @property
    def reusable(self) -> bool:
        """True when the last response was read to its end and nothing else arrived."""
        return (
            self.complete
            and self.keep_alive
            and not self.dirty
            and not self.closed
            and not self._body
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def close(self, abort: bool = False) -> None:
        """Closes the connection (``abort``: at once, dropping unsent bytes)."""
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
