"""What the sync and async clients share: construction, per-call settings, stream bookkeeping."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from inference.v1 import inference_pb2 as pb

from clients import convert
from clients.connection import Connection, resolve_connection
from clients.options import DEFAULT_TIMEOUT_S, ChatOptions, RetryPolicy
from clients.types import ChatResult, ToolCall, ToolCallDelta, Usage

StreamEvent = str | ToolCallDelta
"""What ``stream.events()`` yields: text, or a tool-call fragment, in arrival order."""


class ClientBase:
    """Resolves the connection and holds the defaults every call starts from."""

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        tls: bool | None = None,
        server_name: str | None = None,
        load_balancing: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Connects lazily (gRPC channels connect on the first call).

        Args:
            target: ``host:port``; ``INFERENCE_TARGET``, else 127.0.0.1:50051, when None.
            api_key: Bearer token; ``INFERENCE_API_KEY`` when None; ``""`` sends none.
            ca_file: CA certificate file (turns TLS on); ``INFERENCE_CA_FILE`` when None.
            root_certificates: CA PEM bytes (turns TLS on); wins over ``ca_file``.
            private_key: Client key PEM, for mutual TLS.
            certificate_chain: Client certificate PEM, for mutual TLS.
            tls: TLS with the system's roots, without a CA of your own.
            server_name: Name to check the server certificate against.
            load_balancing: ``"round_robin"`` spreads calls over every address the target resolves
                to (replicas behind ``dns:///`` a headless Service, or ``ipv4:a:p,b:p``);
                ``INFERENCE_LOAD_BALANCING`` when None, else gRPC's ``pick_first`` (one address).
            timeout_s: Default timeout of a whole call, retries included.
            retry: Default retry policy; ``RetryPolicy()`` when None.
            env: Where the ``INFERENCE_*`` defaults are read; ``os.environ`` when None.

        Raises:
            ClientConfigError: The CA file cannot be read, or the load-balancing policy is unknown.
        """
        self.connection: Connection = resolve_connection(
            target,
            api_key=api_key,
            ca_file=ca_file,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            tls=tls,
            server_name=server_name,
            load_balancing=load_balancing,
            env=env,
        )
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._open()

    def _open(self) -> None:
        """Creates the channel and stub (each client its own kind)."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        """Where the client connects."""
        return self.connection.target

    def _deadline(self, options: ChatOptions) -> float:
        return time.monotonic() + (options.get("timeout_s") or self.timeout_s)

    def _retry(self, options: ChatOptions) -> RetryPolicy:
        return options.get("retry") or self.retry


class StreamState:
    """What a stream has received so far; the same for both clients."""

    def __init__(self, parse: convert.Parser = None) -> None:
        self.final: ChatResult | None = None
        self.text_parts: list[str] = []
        self.tool_call_deltas: list[ToolCallDelta] = []
        self._parse = parse

    @property
    def text(self) -> str:
        """Text received so far (all of it once the stream has ended)."""
        return "".join(self.text_parts)

    @property
    def usage(self) -> Usage | None:
        """Token usage, once the stream has ended."""
        return self.final.usage if self.final else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls: as the gateway assembled them once the stream has ended, else as the
        fragments so far make them up (the last call's arguments may still be incomplete)."""
        return self.final.tool_calls if self.final else convert.assemble(self.tool_call_deltas)

    @property
    def _answered(self) -> bool:
        """Something of the answer arrived: retrying now would splice two answers."""
        return bool(self.text_parts or self.tool_call_deltas)

    def _take(self, message: pb.ChatStreamResponse) -> list[StreamEvent]:
        """Records one message; returns its events (none for the final message).

        A delta that carries only tool-call fragments yields no text, so text iteration sees
        exactly the text the model wrote.
        """
        if message.HasField("delta"):
            delta = message.delta
            events: list[StreamEvent] = []
            if delta.text or not delta.tool_calls:
                self.text_parts.append(delta.text)
                events.append(delta.text)
            for d in delta.tool_calls:
                fragment = convert.tool_call_delta(d)
                self.tool_call_deltas.append(fragment)
                events.append(fragment)
            return events
        self.final = convert.stream_result(message.final, self.text, self._parse)
        return []
