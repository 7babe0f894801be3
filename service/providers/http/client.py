"""A small HTTP/1.1 client on asyncio Protocols, for the OpenAI-compatible hot path.

Why not httpx or aiohttp: inside a grpc.aio server every extra event-loop wake-up is expensive, and
the general clients spend most of their time in machinery this path never uses (redirects,
cookies, auth flows, multipart, decompression). Measured on one core with the bench fake upstream:
a unary call costs ~1,150 us CPU through httpx, ~240 us through aiohttp and ~55 us through a raw
Protocol; in the gateway process an aiohttp call added ~450 us per RPC over a bare grpc.aio server.

Scope, on purpose: one origin per pool (``http`` or ``https``), requests with a bytes body,
responses framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or connection close, keep-alive
with a bounded pool. A response not read to its end is closed with its connection, which is how a
cancelled call tells vLLM to stop generating.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

_MAX_HEAD_BYTES = 64 * 1024
_PAUSE_AT_BYTES = 1 << 20


class HTTPError(Exception):
    """Base of this module's errors."""


class ConnectFailed(HTTPError, OSError):
    """The TCP or TLS connection could not be made (refused, unreachable, timed out)."""


class Disconnected(HTTPError, ConnectionError):
    """The server closed or reset the connection before the response was complete."""


class ProtocolViolation(HTTPError):
    """The server's bytes are not a valid HTTP/1.1 response."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head = bytearray()
        self._reading_head = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._remaining = -1  # Content-Length bytes left; -1 when not length-framed
        self._chunked = False
        self._chunk_left = 0  # bytes left in the current chunk (+2 for its CRLF once known)
        self._chunk_state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailers
        self._chunk_line = bytearray()
        self.complete = False
        self.received_any = False
        self.keep_alive = True

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete:
            if not self._chunked and self._remaining < 0 and self.status and not self._reading_head:
                self.complete = True  # a body framed by connection close ends here
            elif self.lost is None:
                self.lost = exc or Disconnected("the server closed the connection")
        self.keep_alive = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if self._reading_head:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _MAX_HEAD_BYTES:
                    self._fail(ProtocolViolation("response head too large"))
                return
            rest = bytes(self._head[end + 4 :])
            try:
                self._parse_head(bytes(self._head[:end]))
            except ProtocolViolation as exc:
                self._fail(exc)
                return
            self._reading_head = False
            self._wake()
            if rest:
                self._feed_body(rest)
            elif self._remaining == 0:
                self._finish()
            return
        self._feed_body(data)

    # -- parsing --------------------------------------------------------------------------

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolViolation(f"bad status line {lines[0][:80]!r}")
        try:
            self.status = int(parts[1])
        except ValueError:
            raise ProtocolViolation(f"bad status line {lines[0][:80]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self.headers = headers
        if headers.get("connection", "").lower() == "close" or parts[0] == b"HTTP/1.0":
            self.keep_alive = False
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise ProtocolViolation("bad Content-Length") from None
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self._remaining = 0
        else:
            self.keep_alive = False  # framed by connection close

    def _feed_body(self, data: bytes) -> None:
        if self._chunked:
            self._feed_chunked(data)
            return
        if self._remaining >= 0:
            if len(data) >= self._remaining:
                if self._remaining:
                    self._push(data[: self._remaining])
                self._remaining = 0
                self._finish()
                return
            self._remaining -= len(data)
        self._push(data)

    def _feed_chunked(self, data: bytes) -> None:
        # Hot path for streams: one pass of bytes.find per frame, the payloads joined and pushed
        # once per read (one wake-up of the reader, not one per SSE event).
        if self._chunk_line:
            data = bytes(self._chunk_line) + data
            self._chunk_line.clear()
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            state = self._chunk_state
            if state == 1:  # chunk data
                end = i + self._chunk_left
                if end <= n:
                    out.append(data[i:end])
                    i = end
                    self._chunk_left = 0
                    self._chunk_state = 2
                else:
                    out.append(data[i:])
                    self._chunk_left = end - n
                    i = n
                continue
            if state == 2 and data.startswith(b"\r\n", i):  # the CRLF closing a chunk
                i += 2
                self._chunk_state = 0
                continue
            nl = data.find(b"\n", i)
            if nl < 0:
                self._chunk_line += data[i:]
                if len(self._chunk_line) > _MAX_HEAD_BYTES:
                    self._fail(ProtocolViolation("chunk header too large"))
                    return
                break
            line = data[i:nl]
            i = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if state == 2:
                if line:
                    self._fail(ProtocolViolation("missing CRLF after chunk"))
                    return
                self._chunk_state = 0
            elif state == 0:
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    self._fail(ProtocolViolation(f"bad chunk size {line[:40]!r}"))
                    return
                if size:
                    self._chunk_left = size
                    self._chunk_state = 1
                else:
                    self._chunk_state = 3
            elif not line:  # end of trailers: the response is complete
                if out:
                    self._push(b"".join(out))
                self._finish()
                return
        if out:
            self._push(out[0] if len(out) == 1 else b"".join(out))

    def _push(self, data: bytes) -> None:
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > _PAUSE_AT_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the pool and the response ------------------------------------------------

    def start(self, request: bytes) -> None:
        """Sends a request and resets the parser for its response."""
        self._head.clear()
        self._reading_head = True
        self.status = 0
        self.headers = {}
        self._body.clear()
        self._buffered = 0
        self._remaining = -1
        self._chunked = False
        self._chunk_state = 0
        self._chunk_left = 0
        self._chunk_line.clear()
        self.complete = False
        self.received_any = False
        assert self.transport is not None
        self.transport.write(request)

    async def wait(self) -> None:
        """Waits for the next parser event."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """Body bytes received so far, removed from the buffer."""
        if not self._body:
            return b""
        data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.transport is not None and not self.transport.is_closing()


class Response:
    """A response whose head has arrived; read the body with :meth:`read` or :meth:`iter_chunks`."""

    __slots__ = ("_conn", "_done", "_pool", "headers", "status")

    def __init__(self, pool: Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn = conn
        self._done = False
        self.status = conn.status
        self.headers = conn.headers

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        parts: list[bytes] = []
        async for piece in self.iter_chunks():
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive."""
        conn = self._conn
        try:
            while True:
                data = conn.take()
                if data:
                    yield data
                    continue
                if conn.complete:
                    break
                if conn.lost is not None:
                    if isinstance(conn.lost, HTTPError):
                        raise conn.lost
                    raise Disconnected(f"connection lost mid-body: {conn.lost}") from conn.lost
                await conn.wait()
        finally:
            self.close()

    async def drain(self, timeout_s: float) -> None:
        """Reads what is left of the body (e.g. the last chunk after SSE ``[DONE]``) for at most
        ``timeout_s`` so the connection can be reused; closes it otherwise."""
        conn = self._conn
        try:
            async with asyncio.timeout(timeout_s):
                while not conn.complete and conn.lost is None:
                    conn.take()
                    await conn.wait()
        except TimeoutError:
            pass
        self.close()

    def close(self) -> None:
        """Returns the connection when the body was read to its end, else closes it."""
        if self._done:
            return
        self._done = True
        self._pool._release(self._conn)


class Pool:
    """Keep-alive connections to one origin, at most ``max_connections`` at once."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 64,
        connect_timeout_s: float = 3.0,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        host_header = self.host if url.port is None else f"{self.host}:{url.port}"
        fixed = {"host": host_header, **{k.lower(): v for k, v in (headers or {}).items()}}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError as exc:
            raise ConnectFailed(f"connect to {self.host}:{self.port} timed out") from exc
        except OSError as exc:
            raise ConnectFailed(f"connect to {self.host}:{self.port} failed: {exc}") from exc
        return conn

    def _encode(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1") if headers else b""
        length = b"content-length: %d\r\n" % len(body) if body is not None else b""
        head = b"%s %s HTTP/1.1\r\n" % (method.encode(), (self.prefix + path).encode())
        return head + self._fixed + extra + length + b"\r\n" + (body or b"")

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        """Sends a request and waits for the response head (the body streams afterwards)."""
        if self._closed:
            raise HTTPError("pool is closed")
        data = self._encode(method, path, body, headers)
        await self._slots.acquire()
        try:
            for attempt in (0, 1):
                conn = self._idle.pop() if self._idle else None
                reused = conn is not None
                if conn is None or conn.transport is None or conn.transport.is_closing():
                    conn, reused = await self._connect(), False
                conn.start(data)
                try:
                    while conn._reading_head:
                        if conn.lost is not None:
                            raise conn.lost
                        await conn.wait()
                except BaseException as exc:
                    if conn.transport is not None:
                        conn.transport.abort()
                    # A kept-alive connection the server had already closed: the request never
                    # reached it, so sending it again on a fresh connection is safe.
                    if reused and attempt == 0 and not conn.received_any and isinstance(exc, (OSError, HTTPError)):
                        continue
                    if isinstance(exc, (asyncio.CancelledError, HTTPError)):
                        raise
                    raise Disconnected(f"connection to {self.host}:{self.port} lost: {exc}") from exc
                return Response(self, conn)
            raise Disconnected("unreachable")  # pragma: no cover - the loop returns or raises
        except BaseException:
            self._slots.release()
            raise

    def _release(self, conn: _Connection) -> None:
        if conn.reusable and not self._closed:
            self._idle.append(conn)
        elif conn.transport is not None:
            # Unread body, broken framing or Connection: close: drop it. For a generation this
            # closes the stream upstream, which is what aborts it there.
            conn.transport.close()
        self._slots.release()

    async def aclose(self) -> None:
        """Closes idle connections; responses in flight close theirs when released."""
        self._closed = True
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
