"""The asyncio client for inference.v1.InferenceService.

Failed calls are retried by the client's :class:`~clients.options.RetryPolicy` (``UNAVAILABLE``
with jittered exponential backoff, ``RESOURCE_EXHAUSTED`` after its RetryInfo delay when opted
in), but only while no text has been received and only inside the caller's ``timeout_s``: a
retry never splices two answers. :class:`~clients.sync_client.InferenceClient` is the blocking
twin with the same calls and options.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Unpack

import grpc
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from clients import convert
from clients import usage as usage_api
from clients.agent import result_parser
from clients.base import ClientBase, StreamEvent, StreamState
from clients.connection import DEFAULT_TARGET
from clients.errors import from_rpc_error
from clients.options import DEFAULT_TIMEOUT_S, ChatOptions, MessageLike, RetryPolicy, build_request
from clients.types import CatalogModel, ChatResult, Health, UsageRow
from clients.usage import DEFAULT_BY, UsageTime

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_S",
    "AsyncInferenceClient",
    "ChatStream",
    "MessageLike",
]


class ChatStream(StreamState):
    """One streaming call: iterate for text deltas; ``final``, ``text`` and ``usage`` after it ends.

    Use as ``async with client.chat_stream(...) as stream: async for text in stream: ...``;
    leaving the block cancels the call (the server then stops the upstream generation). The call
    starts on the first iteration and is made once: iterating again continues where the last
    loop stopped (nothing, once the stream has ended) and never resends it.

    ``stream.events()`` yields tool-call fragments (:class:`~clients.ToolCallDelta`) too, in
    arrival order, mixed with the text; ``stream.tool_calls`` assembles them, and after the end
    ``stream.final.tool_calls`` holds the calls as the gateway assembled them.
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
        self._iterator: AsyncGenerator[StreamEvent, None] | None = None
        self._texts: AsyncGenerator[str, None] | None = None

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancels the call if it is still running."""
        if self._call is not None and not self._call.done():
            self._call.cancel()
        for iterator in (self._texts, self._iterator):
            if iterator is not None:
                try:
                    await iterator.aclose()
                except RuntimeError:
                    pass  # another task is iterating it: the cancel above ends that loop

    def __aiter__(self) -> AsyncIterator[str]:
        if self._texts is None:
            self._texts = self._text_only()
        return self._texts

    def events(self) -> AsyncIterator[StreamEvent]:
        """Text (``str``) and tool-call fragments (:class:`~clients.ToolCallDelta`) as they arrive.

        The same call as text iteration: either continues where the other stopped.
        """
        if self._iterator is None:
            self._iterator = self._iterate()
        return self._iterator

    async def _text_only(self) -> AsyncGenerator[str, None]:
        async for event in self.events():
            if isinstance(event, str):
                yield event

    async def _iterate(self) -> AsyncGenerator[StreamEvent, None]:
        retry = 0
        while True:
            self._call = self._stub.ChatStream(
                self._request, timeout=max(0.001, self._deadline - time.monotonic()), metadata=self._metadata
            )
            try:
                async for message in self._call:
                    for event in self._take(message):
                        yield event
                return
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                delay = None if self._answered else self._retry.delay_s(err, retry, self._deadline)
                if delay is None:
                    raise err from None
                retry += 1
                await asyncio.sleep(delay)
            finally:
                if not self._call.done():
                    self._call.cancel()


class AsyncInferenceClient(ClientBase):
    """asyncio client. ``async with AsyncInferenceClient() as c: await c.chat("Hi")``.

    The target, API key and CA default to ``INFERENCE_TARGET``, ``INFERENCE_API_KEY`` and
    ``INFERENCE_CA_FILE`` (see :class:`~clients.base.ClientBase` for every argument).
    """

    _channel: grpc.aio.Channel
    _stub: pb_grpc.InferenceServiceStub

    def _open(self) -> None:
        c = self.connection
        if c.tls:
            self._channel = grpc.aio.secure_channel(c.target, c.credentials(), options=c.options)
        else:
            self._channel = grpc.aio.insecure_channel(c.target, options=c.options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def _unary(self, method: Any, request: Any, deadline: float, policy: RetryPolicy) -> Any:
        """One unary call, retried by ``policy`` (``UNAVAILABLE``, opted-in ``RESOURCE_EXHAUSTED``)
        within ``deadline`` (a ``time.monotonic()`` instant)."""
        retry = 0
        while True:
            try:
                return await method(
                    request, timeout=max(0.001, deadline - time.monotonic()), metadata=self.connection.metadata
                )
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                delay = policy.delay_s(err, retry, deadline)
                if delay is None:
                    raise err from None
                retry += 1
                await asyncio.sleep(delay)

    async def chat(self, prompt: str | None = None, **options: Unpack[ChatOptions]) -> ChatResult:
        """One complete answer.

        Args:
            prompt: The user's message (appended after ``messages``).
            **options: See :class:`~clients.options.ChatOptions`.

        Raises:
            InferenceError: A subclass naming what failed, after any retries.
        """
        request = build_request(pb.ChatRequest, prompt, options)
        deadline, policy = self._deadline(options), self._retry(options)
        response = await self._unary(self._stub.Chat, request, deadline, policy)
        return convert.chat_result(response, result_parser(options.get("response_format")))

    def chat_stream(self, prompt: str | None = None, **options: Unpack[ChatOptions]) -> ChatStream:
        """A streaming call: an async context manager and async iterator of text deltas.

        Args:
            prompt: The user's message (appended after ``messages``).
            **options: See :class:`~clients.options.ChatOptions`.
        """
        request = build_request(pb.ChatStreamRequest, prompt, options)
        return ChatStream(
            self._stub,
            request,
            self._deadline(options),
            self.connection.metadata,
            self._retry(options),
            result_parser(options.get("response_format")),
        )

    async def health(self, timeout_s: float = 10.0) -> Health:
        """The service's health and every provider's state."""
        try:
            response = await self._stub.Health(pb.HealthRequest(), timeout=timeout_s, metadata=self.connection.metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return convert.health(response)

    async def list_models(self, timeout_s: float = 10.0) -> list[CatalogModel]:
        """The model catalogue: every name ``model=`` may use (the default first) and where it goes."""
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout_s, metadata=self.connection.metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return convert.catalogue(response)

    async def provider_status(self, timeout_s: float = 10.0) -> pb.GetProviderStatusResponse:
        """Admin view (needs an admin key); returned as the proto message."""
        try:
            response: pb.GetProviderStatusResponse = await self._stub.GetProviderStatus(
                pb.GetProviderStatusRequest(), timeout=timeout_s, metadata=self.connection.metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return response

    async def usage(
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
        response = await self._unary(self._stub.GetUsage, request, deadline, self.retry)
        return usage_api.rows(response, dims)
