"""The blocking client: the same calls, options, retries and errors as the asyncio one."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator, Sequence
from types import TracebackType
from typing import Any, Unpack

import grpc
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from clients import convert
from clients import usage as usage_api
from clients.agent import result_parser
from clients.base import ClientBase, StreamEvent, StreamState
from clients.errors import from_rpc_error
from clients.options import ChatOptions, RetryPolicy, build_request
from clients.types import CatalogModel, ChatResult, Health, UsageRow
from clients.usage import DEFAULT_BY, UsageTime


class SyncChatStream(StreamState):
    """Blocking counterpart of :class:`~clients.client.ChatStream`.

    ``with client.chat_stream(...) as stream: for text in stream: ...``; leaving the block cancels
    the call. The call starts on the first iteration and is made once (retried like the async
    one, only before any text); iterating again never resends it. ``stream.events()`` yields
    tool-call fragments too; ``stream.final.tool_calls`` holds the assembled calls.
    """

    def __init__(
        self,
        stub: pb_grpc.InferenceServiceStub,
        request: pb.ChatStreamRequest,
        deadline: float,
        metadata: tuple[tuple[str, str], ...],
        retry: RetryPolicy,
        parse: convert.Parser = None,
    ) -> None:
        super().__init__(parse)
        self._stub = stub
        self._request = request
        self._deadline = deadline
        self._metadata = metadata
        self._retry = retry
        self._call: Any = None
        self._iterator: Generator[StreamEvent, None, None] | None = None
        self._texts: Generator[str, None, None] | None = None

    def __enter__(self) -> SyncChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancels the call if it is still running."""
        if self._call is not None:
            self._call.cancel()
        for iterator in (self._texts, self._iterator):
            if iterator is not None:
                try:
                    iterator.close()
                except ValueError:
                    pass  # closed from another thread while it runs: the cancel above ends it

    def __iter__(self) -> Iterator[str]:
        if self._texts is None:
            self._texts = self._text_only()
        return self._texts

    def events(self) -> Iterator[StreamEvent]:
        """Text (``str``) and tool-call fragments (:class:`~clients.ToolCallDelta`) as they arrive.

        The same call as text iteration: either continues where the other stopped.
        """
        if self._iterator is None:
            self._iterator = self._iterate()
        return self._iterator

    def _text_only(self) -> Generator[str, None, None]:
        for event in self.events():
            if isinstance(event, str):
                yield event

    def _iterate(self) -> Generator[StreamEvent, None, None]:
        retry = 0
        while True:
            self._call = self._stub.ChatStream(
                self._request, timeout=max(0.001, self._deadline - time.monotonic()), metadata=self._metadata
            )
            try:
                for message in self._call:
                    yield from self._take(message)
                return
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                delay = None if self._answered else self._retry.delay_s(err, retry, self._deadline)
                if delay is None:
                    raise err from None
                retry += 1
                time.sleep(delay)
            finally:
                self._call.cancel()  # a no-op once the call has ended


class InferenceClient(ClientBase):
    """Blocking client with the same methods as :class:`~clients.client.AsyncInferenceClient`,
    for scripts and threads: ``with InferenceClient() as c: print(c.chat("Hi").text)``."""

    _channel: grpc.Channel
    _stub: pb_grpc.InferenceServiceStub

    def _open(self) -> None:
        c = self.connection
        if c.tls:
            self._channel = grpc.secure_channel(c.target, c.credentials(), options=c.options)
        else:
            self._channel = grpc.insecure_channel(c.target, options=c.options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def _unary(self, method: Any, request: Any, deadline: float, policy: RetryPolicy) -> Any:
        """One unary call, retried by ``policy`` (``UNAVAILABLE``, opted-in ``RESOURCE_EXHAUSTED``)
        within ``deadline`` (a ``time.monotonic()`` instant)."""
        retry = 0
        while True:
            try:
                return method(
                    request, timeout=max(0.001, deadline - time.monotonic()), metadata=self.connection.metadata
                )
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                delay = policy.delay_s(err, retry, deadline)
                if delay is None:
                    raise err from None
                retry += 1
                time.sleep(delay)

    def chat(self, prompt: str | None = None, **options: Unpack[ChatOptions]) -> ChatResult:
        """One complete answer.

        Args:
            prompt: The user's message (appended after ``messages``).
            **options: See :class:`~clients.options.ChatOptions`.

        Raises:
            InferenceError: A subclass naming what failed, after any retries.
        """
        request = build_request(pb.ChatRequest, prompt, options)
        deadline, policy = self._deadline(options), self._retry(options)
        response = self._unary(self._stub.Chat, request, deadline, policy)
        return convert.chat_result(response, result_parser(options.get("response_format")))

    def chat_stream(self, prompt: str | None = None, **options: Unpack[ChatOptions]) -> SyncChatStream:
        """A streaming call: a context manager and iterator of text deltas.

        Args:
            prompt: The user's message (appended after ``messages``).
            **options: See :class:`~clients.options.ChatOptions`.
        """
        request = build_request(pb.ChatStreamRequest, prompt, options)
        return SyncChatStream(
            self._stub,
            request,
            self._deadline(options),
            self.connection.metadata,
            self._retry(options),
            result_parser(options.get("response_format")),
        )

    def health(self, timeout_s: float = 10.0) -> Health:
        """The service's health and every provider's state."""
        try:
            response = self._stub.Health(pb.HealthRequest(), timeout=timeout_s, metadata=self.connection.metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return convert.health(response)

    def list_models(self, timeout_s: float = 10.0) -> list[CatalogModel]:
        """The model catalogue: every name ``model=`` may use (the default first) and where it goes."""
        try:
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout_s, metadata=self.connection.metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return convert.catalogue(response)

    def provider_status(self, timeout_s: float = 10.0) -> pb.GetProviderStatusResponse:
        """Admin view (needs an admin key); returned as the proto message."""
        try:
            response: pb.GetProviderStatusResponse = self._stub.GetProviderStatus(
                pb.GetProviderStatusRequest(), timeout=timeout_s, metadata=self.connection.metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return response

    def usage(
        self,
        *,
        since: UsageTime | None = None,
        until: UsageTime | None = None,
        by: str | Sequence[str] = DEFAULT_BY,
        tenant: str | None = None,
        timeout_s: float | None = None,
    ) -> list[UsageRow]:
        """Usage and estimated cost from the gateway's ledger, grouped as asked.

        An admin key sees every tenant; a tenant key only its own (``tenant`` may name only it).
        Retried like ``chat`` (``UNAVAILABLE``, by the client's retry policy) within ``timeout_s``.

        Args:
            since: Start (inclusive); the start of the current month (UTC) when None. A datetime
                (naive is UTC), a date, or ``YYYY-MM-DD``, ``YYYY-MM`` or ISO 8601 text.
            until: End; the end of the current month (UTC) when None. A day or month given
                without a time is included whole; an exact time is exclusive.
            by: Dimensions to group by, in order: ``tenant``, ``provider``, ``model``, ``day``
                (a sequence, or one comma-separated string); ``()`` gives one row for everything.
            tenant: Only this tenant.
            timeout_s: The whole call's timeout; the client's default when None.

        Returns:
            One :class:`~clients.UsageRow` per group, ordered by the groups' values; the
            dimensions not grouped by are None.

        Raises:
            ValueError: A bound that is not a date, an empty range, or an unknown dimension
                (before any call).
            InferenceError: A subclass naming what failed (``PermissionDeniedError`` for another
                tenant's usage with a tenant key, or without an admin key).
        """
        dims = usage_api.dimensions(by)
        request = usage_api.build_request(since, until, dims, tenant)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        response = self._unary(self._stub.GetUsage, request, deadline, self.retry)
        return usage_api.rows(response, dims)
