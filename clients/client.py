"""Async and sync clients for inference.v1.InferenceService.

``UNAVAILABLE`` is retried with jittered exponential backoff, but only while no text has been
received and only inside the caller's ``timeout``: a retry never splices two answers.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from inference.v1 import inference_pb2 as pb
from inference.v1 import inference_pb2_grpc as pb_grpc

from clients.errors import InferenceError, UnavailableError, from_rpc_error
from clients.types import Attempt, ChatResult, Health, ProviderHealth, Usage

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 120.0
INITIAL_RETRY_DELAY_S = 0.25
MAX_RETRY_DELAY_S = 4.0
MAX_RETRIES = 3

MessageLike = tuple[str, str] | dict[str, str]
_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}


def _messages(prompt: str | None, messages: Sequence[MessageLike] | None, system: str | None) -> list[pb.Message]:
    out: list[pb.Message] = []
    if system:
        out.append(pb.Message(role=pb.ROLE_SYSTEM, content=system))
    for m in messages or ():
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        out.append(pb.Message(role=_ROLES.get(role, pb.ROLE_UNSPECIFIED), content=content))
    if prompt is not None:
        out.append(pb.Message(role=pb.ROLE_USER, content=prompt))
    return out


def _request_fields(
    prompt: str | None,
    messages: Sequence[MessageLike] | None,
    system: str | None,
    model: str | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    stop: Sequence[str] | None,
    seed: int | None,
    wait_for_cold_start: bool | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"messages": _messages(prompt, messages, system), "model": model or ""}
    for key, value in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens), ("seed", seed)):
        if value is not None:
            fields[key] = value
    if stop:
        fields["stop"] = list(stop)
    if wait_for_cold_start is not None:
        fields["cold_start_policy"] = (
            pb.COLD_START_POLICY_WAIT if wait_for_cold_start else pb.COLD_START_POLICY_FALLBACK
        )
    return fields


def _usage(u: pb.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens)


def _attempts(items: Sequence[pb.Attempt]) -> list[Attempt]:
    return [Attempt(a.provider, a.error_reason, a.error_message, a.duration.ToNanoseconds() / 1e9) for a in items]


def _finish(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _chat_result(r: pb.ChatResponse) -> ChatResult:
    return ChatResult(
        r.id, r.model, r.message.content, _finish(r.finish_reason), _usage(r.usage), r.provider, _attempts(r.attempts)
    )


def _health(r: pb.HealthResponse) -> Health:
    return Health(
        status=pb.ServingStatus.Name(r.status).removeprefix("SERVING_STATUS_"),
        providers=[
            ProviderHealth(
                p.name,
                p.kind,
                p.endpoint,
                p.model,
                pb.ProviderState.Name(p.state).removeprefix("PROVIDER_STATE_"),
                pb.CircuitState.Name(p.circuit_state).removeprefix("CIRCUIT_STATE_"),
                pb.Warmth.Name(p.warmth).removeprefix("WARMTH_"),
                p.last_error,
                p.last_latency.ToNanoseconds() / 1e9 if p.HasField("last_latency") else None,
            )
            for p in r.providers
        ],
    )


def _retry_delay(err: InferenceError, retry: int, deadline: float) -> float | None:
    """Seconds to wait before retrying, or None to give up: only UNAVAILABLE before any text
    (never an interrupted stream), at most MAX_RETRIES times, and only inside the deadline."""
    if type(err) is not UnavailableError or retry >= MAX_RETRIES:
        return None
    if err.retry_after_s is not None:
        delay = err.retry_after_s
    else:
        delay = random.uniform(0, min(MAX_RETRY_DELAY_S, INITIAL_RETRY_DELAY_S * 2**retry))
    return None if time.monotonic() + delay >= deadline else delay


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _credentials(
    root_certificates: bytes | None, private_key: bytes | None, certificate_chain: bytes | None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class ChatStream:
    """An open streaming call: iterate for text deltas; ``final`` is set when it ends.

    Use as ``async with client.chat_stream(...) as stream: async for text in stream: ...``;
    leaving the block cancels the call (the server then stops the upstream generation).
    """

    def __init__(
        self,
        stub: pb_grpc.InferenceServiceStub,
        request: pb.ChatStreamRequest,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        self._stub = stub
        self._request = request
        self._timeout_s = timeout_s
        self._metadata = metadata
        self._call: Any = None
        self.final: ChatResult | None = None
        self.text_parts: list[str] = []

    @property
    def usage(self) -> Usage | None:
        """Token usage, once the stream has ended."""
        return self.final.usage if self.final else None

    @property
    def text(self) -> str:
        """Text received so far."""
        return "".join(self.text_parts)

    async def __aenter__(self) -> ChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancels the call if it is still running."""
        if self._call is not None and not self._call.done():
            self._call.cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        deadline = time.monotonic() + self._timeout_s
        retry = 0
        while True:
            self._call = self._stub.ChatStream(
                self._request, timeout=max(0.001, deadline - time.monotonic()), metadata=self._metadata
            )
            try:
                async for msg in self._call:
                    if msg.HasField("delta"):
                        self.text_parts.append(msg.delta.text)
                        yield msg.delta.text
                    else:
                        f = msg.final
                        self.final = ChatResult(
                            f.id,
                            f.model,
                            self.text,
                            _finish(f.finish_reason),
                            _usage(f.usage),
                            f.provider,
                            _attempts(f.attempts),
                        )
                return
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                delay = None if self.text_parts else _retry_delay(err, retry, deadline)
                if delay is None:
                    raise err from None
                retry += 1
                await asyncio.sleep(delay)


class AsyncInferenceClient:
    """asyncio client. ``async with AsyncInferenceClient("host:port") as c: await c.chat("Hi")``."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        tls: bool | None = None,
        server_name: str | None = None,
    ) -> None:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        if tls or root_certificates:
            self._channel = grpc.aio.secure_channel(
                target, _credentials(root_certificates, private_key, certificate_chain), options=options
            )
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(api_key)
        self.timeout_s = timeout_s

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def chat(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageLike] | None = None,
        system: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        wait_for_cold_start: bool | None = None,
        timeout_s: float | None = None,
    ) -> ChatResult:
        """One complete answer; raises an :class:`InferenceError` subclass."""
        request = pb.ChatRequest(
            **_request_fields(
                prompt, messages, system, model, temperature, top_p, max_tokens, stop, seed, wait_for_cold_start
            )
        )
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        retry = 0
        while True:
            try:
                response = await self._stub.Chat(
                    request, timeout=max(0.001, deadline - time.monotonic()), metadata=self._metadata
                )
                return _chat_result(response)
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                delay = _retry_delay(err, retry, deadline)
                if delay is None:
                    raise err from None
                retry += 1
                await asyncio.sleep(delay)

    def chat_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageLike] | None = None,
        system: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        wait_for_cold_start: bool | None = None,
        timeout_s: float | None = None,
    ) -> ChatStream:
        """A streaming call (an async context manager and iterator of text deltas)."""
        request = pb.ChatStreamRequest(
            **_request_fields(
                prompt, messages, system, model, temperature, top_p, max_tokens, stop, seed, wait_for_cold_start
            )
        )
        return ChatStream(self._stub, request, timeout_s or self.timeout_s, self._metadata)

    async def health(self, timeout_s: float = 10.0) -> Health:
        """The service's health and every provider's state."""
        try:
            return _health(await self._stub.Health(pb.HealthRequest(), timeout=timeout_s, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def provider_status(self, timeout_s: float = 10.0) -> pb.GetProviderStatusResponse:
        """Admin view (needs an admin key); returned as the proto message."""
        try:
            response: pb.GetProviderStatusResponse = await self._stub.GetProviderStatus(
                pb.GetProviderStatusRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return response


class InferenceClient:
    """Blocking client with the same methods, for scripts and threads."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        tls: bool | None = None,
        server_name: str | None = None,
    ) -> None:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        if tls or root_certificates:
            self._channel = grpc.secure_channel(
                target, _credentials(root_certificates, private_key, certificate_chain), options=options
            )
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._metadata = _metadata(api_key)
        self.timeout_s = timeout_s

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def chat(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageLike] | None = None,
        system: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        wait_for_cold_start: bool | None = None,
        timeout_s: float | None = None,
    ) -> ChatResult:
        """One complete answer; raises an :class:`InferenceError` subclass."""
        request = pb.ChatRequest(
            **_request_fields(
                prompt, messages, system, model, temperature, top_p, max_tokens, stop, seed, wait_for_cold_start
            )
        )
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        retry = 0
        while True:
            try:
                return _chat_result(
                    self._stub.Chat(request, timeout=max(0.001, deadline - time.monotonic()), metadata=self._metadata)
                )
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                delay = _retry_delay(err, retry, deadline)
                if delay is None:
                    raise err from None
                retry += 1
                time.sleep(delay)

    def chat_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageLike] | None = None,
        system: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        timeout_s: float | None = None,
    ) -> SyncChatStream:
        """A streaming call: a context manager and iterator of text deltas."""
        request = pb.ChatStreamRequest(
            **_request_fields(prompt, messages, system, model, temperature, None, max_tokens, None, None, None)
        )
        return SyncChatStream(self._stub, request, timeout_s or self.timeout_s, self._metadata)

    def health(self, timeout_s: float = 10.0) -> Health:
        """The service's health."""
        try:
            return _health(self._stub.Health(pb.HealthRequest(), timeout=timeout_s, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class SyncChatStream:
    """Blocking counterpart of :class:`ChatStream` (no retries once text has arrived)."""

    def __init__(
        self,
        stub: pb_grpc.InferenceServiceStub,
        request: pb.ChatStreamRequest,
        timeout_s: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        self._call: Any = stub.ChatStream(request, timeout=timeout_s, metadata=metadata)
        self.final: ChatResult | None = None
        self.text_parts: list[str] = []

    @property
    def usage(self) -> Usage | None:
        """Token usage, once the stream has ended."""
        return self.final.usage if self.final else None

    def __enter__(self) -> SyncChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._call.cancel()

    def __iter__(self) -> Iterator[str]:
        try:
            for msg in self._call:
                if msg.HasField("delta"):
                    self.text_parts.append(msg.delta.text)
                    yield msg.delta.text
                else:
                    f = msg.final
                    self.final = ChatResult(
                        f.id,
                        f.model,
                        "".join(self.text_parts),
                        _finish(f.finish_reason),
                        _usage(f.usage),
                        f.provider,
                        _attempts(f.attempts),
                    )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
