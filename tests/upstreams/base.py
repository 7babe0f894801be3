"""Shared machinery for the fake upstream servers: behaviours, recording and a tiny HTTP/1.1 server.

Each fake runs ``asyncio.start_server`` on 127.0.0.1 in a background thread with its own event
loop, so it keeps serving while the test's loop is blocked (and the other way round). The HTTP
layer is hand-written on purpose: resets (RST via ``SO_LINGER 0`` + ``transport.abort()``),
stalls, refused connections and client disconnects are then exact and observable.

One *behaviour* (a small frozen dataclass below) is consumed per request to the chat endpoint;
``FakeUpstream.run_chat`` turns it into bytes through provider hooks implemented by
``FakeOpenAI`` and ``FakeAnthropic``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, ClassVar, Self

# ----------------------------------------------------------------------------- behaviours


def token_text(i: int) -> str:
    """Text of generated token ``i`` (``"tok0 "``, ``"tok1 "``, ...), used by every behaviour."""
    return f"tok{i} "


def expected_text(n: int) -> str:
    """The content the fakes produce for ``n`` generated tokens."""
    return "".join(token_text(i) for i in range(n))


@dataclass(frozen=True)
class Ok:
    """A normal answer: ``tokens`` (or ``n_tokens`` generated ``tokN`` tokens), one per SSE delta.

    ``delay_s_between_tokens`` sleeps between deltas (unary: ``delay * n`` before answering).
    A request ``max_tokens`` below the token count truncates and reports ``length``.
    ``model`` overrides the model echoed in the response. ``finish_in_last_chunk`` (OpenAI only)
    puts ``finish_reason`` on the last content delta, as vLLM does, instead of a separate chunk.
    """

    tokens: Sequence[str] | None = None
    n_tokens: int = 4
    delay_s_between_tokens: float = 0.0
    finish_reason: str = "stop"
    model: str | None = None
    finish_in_last_chunk: bool = False

    def __post_init__(self) -> None:
        """Freeze ``tokens`` into a tuple so the behaviour stays hashable."""
        if self.tokens is not None:
            object.__setattr__(self, "tokens", tuple(self.tokens))

    def token_list(self) -> list[str]:
        """The content deltas this behaviour produces."""
        if self.tokens is not None:
            return list(self.tokens)
        return [token_text(i) for i in range(self.n_tokens)]


@dataclass(frozen=True)
class Status:
    """Answer ``code`` at once (500/502/503/429/401/403...).

    ``body``: dict -> JSON, str/bytes -> raw (``content_type`` defaults to text/plain); None -> the
    provider's own error body for that code. ``retry_after_s`` adds a ``Retry-After`` header;
    ``headers`` adds any others (e.g. ``(("location", "https://..."),)`` for Modal's 303).
    """

    code: int
    body: dict[str, Any] | str | bytes | None = None
    retry_after_s: float | None = None
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class UnknownModel:
    """404 for the requested model (vLLM ``The model `X` does not exist.``; Anthropic not_found)."""


@dataclass(frozen=True)
class ContextTooLong:
    """400 context overflow: vLLM's "maximum context length is ..." / "prompt is too long"."""


@dataclass(frozen=True)
class Overloaded:
    """Anthropic 529 ``overloaded_error``; on FakeOpenAI a 503 error."""


@dataclass(frozen=True)
class ResetBeforeResponse:
    """Read the request, then drop the connection without a byte (``rst``: TCP RST, else FIN)."""

    rst: bool = True


@dataclass(frozen=True)
class ResetAfter:
    """Stream: preamble + ``n_chunks`` content deltas, then drop the TCP connection.

    Unary: headers (full Content-Length) and half the body, then drop it.
    """

    n_chunks: int = 1
    rst: bool = True


@dataclass(frozen=True)
class StallBeforeFirstToken:
    """Wait ``seconds`` before the first token, then answer like ``then``.

    Streams send the response head first (as vLLM does) unless ``send_headers`` is False, in which
    case nothing at all is sent during the stall.
    """

    seconds: float
    send_headers: bool = True
    then: Ok = Ok()


@dataclass(frozen=True)
class StallAfter:
    """Stream: send ``n_chunks`` deltas, stall ``seconds``, then finish like ``then``.

    ``then`` defaults to ``Ok(n_tokens=n_chunks + 2)``. Unary: stall, then answer.
    """

    n_chunks: int
    seconds: float
    then: Ok | None = None


@dataclass(frozen=True)
class MalformedSSE:
    """Stream: ``after_n_chunks`` deltas, then ``data: {not json`` and a clean end of the body.

    Unary: HTTP 200 with a body that is not JSON.
    """

    after_n_chunks: int = 0


@dataclass(frozen=True)
class InBandError:
    """Stream: ``after_n_chunks`` deltas then an in-band error with HTTP 200.

    vLLM: ``data: {"error": {...}}`` + ``data: [DONE]``; Anthropic: ``event: error``. Unary: a 500
    error with ``message``. ``error_type`` defaults to the provider's internal-error type.
    """

    after_n_chunks: int = 0
    message: str = "internal engine error"
    error_type: str | None = None


@dataclass(frozen=True)
class EndWithoutFinish:
    """Stream: ``n_chunks`` deltas, then a clean end with no finish_reason / stop_reason.

    OpenAI: ``data: [DONE]`` without a finish chunk; Anthropic: content_block_stop + message_stop
    without message_delta. Unary: finish_reason / stop_reason null.
    """

    n_chunks: int = 1


Behaviour = (
    Ok
    | Status
    | UnknownModel
    | ContextTooLong
    | Overloaded
    | ResetBeforeResponse
    | ResetAfter
    | StallBeforeFirstToken
    | StallAfter
    | MalformedSSE
    | InBandError
    | EndWithoutFinish
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


# ----------------------------------------------------------------------------- server


class FakeUpstream:
    """Base class: threaded HTTP/1.1 server, behaviour queue, recording and cold starts.

    Subclasses set ``chat_path`` and implement ``handle`` plus the provider hooks used by
    ``run_chat`` (``sse_*``, ``unary_body``, ``error_body``, ``behaviour_error``).
    """

    chat_path: ClassVar[str] = "/v1/chat/completions"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """Configure (not start) the server; ``port=0`` picks a free port on ``start()``."""
        self.host, self._port = host, port
        self.default: Behaviour = Ok()
        self.errors: list[str] = []
        self._queue: deque[Behaviour] = deque()
        self._records: list[RecordedRequest] = []
        self._cond = threading.Condition()
        self._conn_ids = itertools.count(1)
        self._accepted = 0
        self._conns: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._unavailable_until = 0.0
        self._relisten: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        """Start the loop thread and listen; returns self."""
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Stop listening, reset every open connection and end the loop thread."""
        if self._thread is None or self._loop is None:
            return
        self._call(self._unlisten(drop_connections=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._thread = None

    def stop_listening(self, drop_connections: bool = True) -> None:
        """Close the listening socket (connections are refused); keeps the port for later."""
        self._call(self._unlisten(drop_connections))

    def start_listening(self) -> None:
        """Listen again on the same port."""
        self._call(self._listen())

    def cold_start(self, not_listening_s: float, unavailable_s: float = 0.0) -> None:
        """Refuse connections for ``not_listening_s``, then 503 everything for ``unavailable_s``.

        Timed from this call and driven by the server's own loop; open connections are reset.
        """
        t0 = time.monotonic()
        self._call(self._cold_start(t0, not_listening_s, unavailable_s))

    def __enter__(self) -> Self:
        """Start the server."""
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        """Stop the server."""
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (stable across stop_listening/start_listening)."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self._port}"

    @property
    def listening(self) -> bool:
        """Whether the listening socket is open."""
        return self._server is not None

    # -- scripting ---------------------------------------------------------------------

    def enqueue(self, *behaviours: Behaviour) -> None:
        """Queue behaviours, consumed one per valid chat request (then ``default``)."""
        with self._cond:
            self._queue.extend(behaviours)

    def reset(self) -> None:
        """Clear queue, recordings, counters, errors and cold start; ``default`` back to Ok()."""
        with self._cond:
            self._queue.clear()
            self._records.clear()
            self.errors.clear()
            self._accepted = 0
            self.default = Ok()
        if self._loop is not None and self._thread is not None:
            self._call(self._cold_start(time.monotonic(), 0.0, 0.0))

    def next_behaviour(self) -> Behaviour:
        """Pop the next queued behaviour, or return ``default``."""
        with self._cond:
            return self._queue.popleft() if self._queue else self.default

    @property
    def pending_behaviours(self) -> int:
        """How many queued behaviours are left."""
        with self._cond:
            return len(self._queue)

    # -- recording ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every recorded request, oldest first."""
        with self._cond:
            return list(self._records)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """Recorded requests to the chat endpoint only."""
        return [r for r in self.requests if r.path == self.chat_path]

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since start (or ``reset()``)."""
        return self._accepted

    @property
    def open_connections(self) -> int:
        """TCP connections currently open."""
        return len(self._conns)

    def _matching(self, chat_only: bool) -> list[RecordedRequest]:
        return [r for r in self._records if not chat_only or r.path == self.chat_path]

    def wait_for_requests(self, n: int, timeout: float = 5.0, *, chat_only: bool = True) -> list[RecordedRequest]:
        """Block until ``n`` (chat) requests were recorded; raises ``TimeoutError``."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._matching(chat_only)) >= n, timeout):
                raise TimeoutError(f"{len(self._matching(chat_only))} of {n} requests arrived")
            return self._matching(chat_only)

    async def wait_for_requests_async(
        self,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109 (polls state owned by another thread)
        *,
        chat_only: bool = True,
    ) -> list[RecordedRequest]:
        """Like ``wait_for_requests`` without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                found = self._matching(chat_only)
            if len(found) >= n:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(found)} of {n} requests arrived")
            await asyncio.sleep(0.002)

    # -- loop-thread internals -------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None, "server not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        if self._relisten is not None:
            self._relisten.cancel()
            self._relisten = None
        if self._server is None:
            self._server = await asyncio.start_server(self._on_connection, self.host, self._port, reuse_address=True)
            self._port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self, drop_connections: bool) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if drop_connections:
            for conn in list(self._conns):
                conn.abort(rst=True)

    async def _cold_start(self, t0: float, down_s: float, unavailable_s: float) -> None:
        self._unavailable_until = t0 + down_s + unavailable_s
        if down_s <= 0:
            await self._listen()
            return
        await self._unlisten(drop_connections=True)
        assert self._loop is not None
        delay = max(0.0, t0 + down_s - time.monotonic())
        self._relisten = self._loop.call_later(delay, lambda: asyncio.ensure_future(self._listen()))

    async def _on_connection(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = _Connection(next(self._conn_ids), w)
        self._accepted += 1
        self._conns.add(conn)
        pump = asyncio.create_task(conn.pump(reader))
        try:
            while (parsed := await _read_request(conn)) is not None:
                if not await self._exchange(conn, *parsed):
                    break
        finally:
            pump.cancel()
            self._conns.discard(conn)
            if not w.transport.is_closing():
                w.close()

    async def _exchange(
        self, conn: _Connection, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> bool:
        """Serve one request; returns whether the connection may be reused."""
        path, _, query = target.partition("?")
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        rec = RecordedRequest(method, path, query, headers, body, parsed, time.monotonic(), conn.cid)
        with self._cond:
            self._records.append(rec)
            self._cond.notify_all()
        conn.active = rec
        ex = Exchange(conn, rec, self.response_headers())
        try:
            if time.monotonic() < self._unavailable_until:
                await self.send_error(ex, 503, "Service Unavailable: the model is loading")
            else:
                await self.handle(rec, ex)
            if not rec.completed:
                raise RuntimeError(f"handler for {method} {path} did not finish its response")
        except ClientGone:
            rec._finish(client_closed=True)
            return False
        except _Aborted:
            return False
        except Exception:
            self.errors.append(traceback.format_exc())
            if not ex.head_sent and not conn.eof.is_set():
                with contextlib.suppress(ClientGone):
                    await self.send_error(ex, 500, "fake upstream crashed")
            conn.abort(rst=True)
            return False
        finally:
            conn.active = None
        return "close" not in headers.get("connection", "").lower() and not conn.eof.is_set()

    # -- chat driver -------------------------------------------------------------------

    async def run_chat(self, ctx: ChatContext, ex: Exchange) -> None:
        """Consume one behaviour and answer the chat request with it."""
        beh = ctx.record.behaviour = self.next_behaviour()
        if isinstance(beh, Status):
            await self._send_status(ctx, beh, ex)
        elif isinstance(beh, UnknownModel | ContextTooLong | Overloaded):
            status, body = self.behaviour_error(ctx, beh)
            await ex.respond(status, body)
        elif isinstance(beh, ResetBeforeResponse):
            await ex.abort(beh.rst)
        elif ctx.stream:
            await self._run_stream(ctx, beh, ex)
        else:
            await self._run_unary(ctx, beh, ex)

    async def _send_status(self, ctx: ChatContext, beh: Status, ex: Exchange) -> None:
        headers = {k.lower(): v for k, v in beh.headers}
        if beh.retry_after_s is not None:
            headers["retry-after"] = f"{beh.retry_after_s:g}"
        if beh.body is None:
            body, ctype = self.error_body(beh.code, _phrase(beh.code)), "application/json"
        elif isinstance(beh.body, dict):
            body, ctype = dumps(beh.body), "application/json"
        else:
            raw = beh.body.encode() if isinstance(beh.body, str) else beh.body
            body, ctype = raw, "text/plain; charset=utf-8"
        await ex.respond(beh.code, body, beh.content_type or ctype, headers)

    def _plan(self, ctx: ChatContext, beh: Behaviour) -> tuple[Ok, int | None]:
        """The answer to produce and the token index where the fault fires (None: no fault)."""
        if isinstance(beh, Ok):
            ok, fault_at = beh, None
        elif isinstance(beh, StallBeforeFirstToken):
            ok, fault_at = beh.then, None
        elif isinstance(beh, StallAfter):
            ok, fault_at = beh.then or Ok(n_tokens=beh.n_chunks + 2), beh.n_chunks
        elif isinstance(beh, ResetAfter | EndWithoutFinish):
            ok, fault_at = Ok(n_tokens=beh.n_chunks), beh.n_chunks
        elif isinstance(beh, MalformedSSE | InBandError):
            ok, fault_at = Ok(n_tokens=beh.after_n_chunks), beh.after_n_chunks
        else:
            raise TypeError(f"unsupported behaviour {beh!r}")
        ctx.model = ok.model or ctx.model
        return ok, fault_at

    @staticmethod
    def _truncate(ctx: ChatContext, ok: Ok) -> tuple[list[str], str]:
        tokens, finish = ok.token_list(), ok.finish_reason
        if ctx.max_tokens is not None and 0 <= ctx.max_tokens < len(tokens):
            tokens, finish = tokens[: ctx.max_tokens], "length"
        return tokens, finish

    async def _run_stream(self, ctx: ChatContext, beh: Behaviour, ex: Exchange) -> None:
        ok, fault_at = self._plan(ctx, beh)
        tokens, finish = self._truncate(ctx, ok)
        stall = beh if isinstance(beh, StallBeforeFirstToken) else None
        if stall is not None and not stall.send_headers:
            await ex.sleep(stall.seconds)
        await ex.start_stream()
        if stall is not None and stall.send_headers:
            await ex.sleep(stall.seconds)
        for event in self.sse_preamble(ctx):
            await ex.send_event(event)
        for i, text in enumerate(tokens):
            if i == fault_at and await self._stream_fault(ctx, beh, ex, i):
                return
            if i > 0:
                await ex.sleep(ok.delay_s_between_tokens)
            last = i == len(tokens) - 1 and ok.finish_in_last_chunk
            await ex.send_event(self.sse_token(ctx, i, text, finish if last else None))
        if fault_at is not None and fault_at >= len(tokens):
            if await self._stream_fault(ctx, beh, ex, len(tokens)):
                return
        for event in self.sse_finish(ctx, finish, len(tokens), ok.finish_in_last_chunk):
            await ex.send_event(event)
        await ex.end_stream()

    async def _stream_fault(self, ctx: ChatContext, beh: Behaviour, ex: Exchange, n: int) -> bool:
        """Apply the fault after ``n`` deltas; True when the stream is over."""
        if isinstance(beh, StallAfter):
            await ex.sleep(beh.seconds)
            return False
        if isinstance(beh, ResetAfter):
            await ex.abort(beh.rst)
        if isinstance(beh, MalformedSSE):
            events = [self.sse_malformed(ctx)]
        elif isinstance(beh, InBandError):
            events = self.sse_error(ctx, beh)
        elif isinstance(beh, EndWithoutFinish):
            events = self.sse_end_without_finish(ctx, n)
        else:
            raise TypeError(f"unsupported behaviour {beh!r}")
        for event in events:
            await ex.send_event(event)
        await ex.end_stream()
        return True

    async def _run_unary(self, ctx: ChatContext, beh: Behaviour, ex: Exchange) -> None:
        ok, _ = self._plan(ctx, beh)
        tokens, finish = self._truncate(ctx, ok)
        if isinstance(beh, StallBeforeFirstToken | StallAfter):
            await ex.sleep(beh.seconds)
        await ex.sleep(ok.delay_s_between_tokens * len(tokens))
        if isinstance(beh, MalformedSSE):
            await ex.respond(200, b"{not json")
        elif isinstance(beh, InBandError):
            await ex.respond(500, self.error_body(500, beh.message, beh.error_type))
        elif isinstance(beh, ResetAfter):
            await ex.respond_partial(200, self.unary_body(ctx, ok, tokens, finish), beh.rst)
        else:
            fin = None if isinstance(beh, EndWithoutFinish) else finish
            await ex.respond(200, self.unary_body(ctx, ok, tokens, fin))

    # -- provider hooks ----------------------------------------------------------------

    async def handle(self, rec: RecordedRequest, ex: Exchange) -> None:
        """Route one request and answer it completely (or raise/abort)."""
        raise NotImplementedError

    def response_headers(self) -> dict[str, str]:
        """Headers added to every response."""
        return {}

    def error_body(self, status: int, message: str, error_type: str | None = None) -> bytes:
        """The provider's JSON error body for ``status``."""
        raise NotImplementedError

    async def send_error(self, ex: Exchange, status: int, message: str, error_type: str | None = None) -> None:
        """Answer with the provider's error body."""
        await ex.respond(status, self.error_body(status, message, error_type))

    def behaviour_error(self, ctx: ChatContext, beh: Behaviour) -> tuple[int, bytes]:
        """Status and body for UnknownModel / ContextTooLong / Overloaded."""
        raise NotImplementedError

    def unary_body(self, ctx: ChatContext, ok: Ok, tokens: list[str], finish: str | None) -> bytes:
        """The JSON body of a non-streamed answer."""
        raise NotImplementedError

    def sse_preamble(self, ctx: ChatContext) -> list[bytes]:
        """Events before the first content delta."""
        raise NotImplementedError

    def sse_token(self, ctx: ChatContext, i: int, text: str, finish: str | None) -> bytes:
        """One content delta (``finish`` set only with ``finish_in_last_chunk``)."""
        raise NotImplementedError

    def sse_finish(self, ctx: ChatContext, finish: str, n: int, already: bool) -> list[bytes]:
        """Events after the last delta (``already``: finish_reason was sent with it)."""
        raise NotImplementedError

    def sse_end_without_finish(self, ctx: ChatContext, n: int) -> list[bytes]:
        """Clean end of stream without any finish/stop reason."""
        raise NotImplementedError

    def sse_error(self, ctx: ChatContext, beh: InBandError) -> list[bytes]:
        """The in-band error events."""
        raise NotImplementedError

    def sse_malformed(self, ctx: ChatContext) -> bytes:
        """An event whose data is not JSON."""
        return b"data: {not json\n\n"
