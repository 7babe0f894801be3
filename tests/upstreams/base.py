"""Shared machinery for the fake upstream servers: behaviours, recording and a tiny HTTP/1.1 server.

Each fake runs ``asyncio.start_server`` on 127.0.0.1 in a background thread with its own event
loop, so it keeps serving while the test's loop is blocked (and the other way round). The HTTP
layer is hand-written on purpose: resets (RST via ``SO_LINGER 0`` + ``transport.abort()``),
stalls, refused connections and client disconnects are then exact and observable.

One *behaviour* (a small frozen dataclass in ``behaviours``) is consumed per request to the chat endpoint;
``FakeUpstream.run_chat`` turns it into bytes through provider hooks implemented by
``FakeOpenAI`` and ``FakeAnthropic``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import traceback
from collections import deque
from types import TracebackType
from typing import Any, ClassVar, Self

from tests.upstreams.behaviours import (
    Behaviour,
    ContextTooLong,
    EndWithoutFinish,
    InBandError,
    MalformedSSE,
    Ok,
    Overloaded,
    ResetAfter,
    ResetBeforeResponse,
    StallAfter,
    StallBeforeFirstToken,
    Status,
    UnknownModel,
)
from tests.upstreams.wire import (
    ChatContext,
    ClientGone,
    Exchange,
    RecordedRequest,
    _Aborted,
    _Connection,
    _phrase,
    _read_request,
    dumps,
)

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
            # A deep accept queue: asyncio's default backlog (100) overflows under a burst of thousands
            # of connections, and the kernel's retried SYNs then outlast CONNECT_TIMEOUT_S.
            self._server = await asyncio.start_server(
                self._on_connection, self.host, self._port, reuse_address=True, backlog=4096
            )
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
