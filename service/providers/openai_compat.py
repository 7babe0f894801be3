"""OpenAI-compatible provider: vLLM on Modal, a legacy vLLM host, the embedded llama.cpp server.

How these upstreams differ from plain OpenAI:

* vLLM reports an error *inside* a 200 stream as ``data: {"error": {...}}`` followed by
  ``[DONE]``; a stream can also end without any ``finish_reason`` when the engine dies. Both are
  failures here, never a short answer.
* Usage in a stream only arrives with ``stream_options.include_usage``, as a last chunk with
  ``choices: []``.
* ``GET /health`` (no auth) answers 200 when the engine is up, 503 when it is dead; while a
  replica starts the port is closed (connect refused) or, on Modal, the request waits for it.
* Closing the HTTP connection aborts the generation in the engine, which is how a cancelled call
  stops the GPU: every response is closed (not released to the pool) unless fully read.
* An unknown model is a 404; the error names the variable that configures the model and the
  models the endpoint serves (``GET /v1/models``).

Text deltas that arrive in the same network read are relayed as one delta (never delayed to
wait for more), so a fast upstream costs one gRPC message per read rather than per token.

The HTTP client is aiohttp, not httpx: on this hot path it measured about 5x less CPU per request
(one pooled ``httpx.AsyncClient``: ~1,100 us CPU per unary call and ~2,400 us per 64-token stream;
``aiohttp.ClientSession``: ~210 us and ~450 us, same fake upstream, uvloop, one core). The wire
format lives in :mod:`service.providers.openai_wire` and is tested without I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

import aiohttp
import orjson
from opentelemetry import propagate

from service.errors import (
    GatewayError,
    ProviderError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from service.providers.base import ChatRequest, ChatResult, HealthReport, StreamItem
from service.providers.openai_wire import (
    CHAT_PATH,
    SSEDecoder,
    error_for_status,
    parse_completion,
    request_body,
    served_model_ids,
)

_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class OpenAICompatConfig:
    """Settings of one OpenAI-compatible upstream.

    Attributes:
        name: Name in the chain.
        base_url: Scheme, host and port (no ``/v1``).
        model: Default model id.
        model_env_var: The variable that sets ``model``, named in "model not found" errors.
        headers: Extra headers on every request (auth); never logged.
        health_path: Probe path; llama.cpp and vLLM both serve ``/health``.
    """

    name: str
    base_url: str
    model: str
    kind: str = "vllm"
    model_env_var: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    scale_to_zero: bool = False
    connect_timeout_s: float = 3.0
    request_timeout_s: float = 120.0
    max_connections: int = 64
    health_path: str = "/health"


def _request_headers() -> dict[str, str]:
    """JSON content type plus the W3C trace context of the current attempt span, so a vLLM
    started with an OTLP endpoint joins the caller's trace."""
    headers = {"content-type": _JSON}
    propagate.inject(headers)
    return headers


class OpenAICompatProvider:
    """A provider over any OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(self, config: OpenAICompatConfig) -> None:
        self.config = config
        self.name = config.name
        self.kind = config.kind
        self.endpoint = config.base_url.rstrip("/")
        self.default_model = config.model
        self.scale_to_zero = config.scale_to_zero
        self._session: aiohttp.ClientSession | None = None
        self._url = self.endpoint + CHAT_PATH

    async def start(self) -> None:
        """Creates the pooled session (one per provider, sized to the concurrency limit)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_connections,
                limit_per_host=self.config.max_connections,
                keepalive_timeout=30,
                ttl_dns_cache=300,
            )
            # sock_read bounds each read, i.e. one unary answer or one gap of a stream; the router's
            # TTFT and idle timeouts are tighter, this is the backstop.
            timeout = aiohttp.ClientTimeout(
                total=None, connect=self.config.connect_timeout_s, sock_read=self.config.request_timeout_s
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers=dict(self.config.headers),
                skip_auto_headers=("User-Agent",),
                auto_decompress=False,
            )

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session; ``start()`` must have run."""
        if self._session is None:
            raise RuntimeError(f"provider {self.name} used before start()")
        return self._session

    async def _error(self, response: aiohttp.ClientResponse, model: str) -> GatewayError:
        body = await response.read()
        served = await self._served_models() if response.status == 404 else []
        return error_for_status(
            self.name,
            self.endpoint,
            response.status,
            body,
            response.headers.get("retry-after"),
            model=model,
            default_model=self.default_model,
            model_env_var=self.config.model_env_var,
            served=served,
        )

    def _translate(self, exc: BaseException) -> ProviderError:
        """Maps aiohttp/socket exceptions to the error tree."""
        if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
            return ProviderTimeoutError(self.name, f"{self.name} ({self.endpoint}) timed out: {type(exc).__name__}")
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            return ProviderUnavailableError(
                self.name, f"{self.name} ({self.endpoint}) connection failed: {type(exc).__name__}: {exc}"
            )
        return ProviderError(self.name, f"{self.name} ({self.endpoint}) failed: {type(exc).__name__}: {exc}")

    async def chat(self, request: ChatRequest) -> ChatResult:
        """One unary completion."""
        body = request_body(request, self.default_model, stream=False)
        try:
            async with self.session.post(self._url, data=orjson.dumps(body), headers=_request_headers()) as response:
                if response.status != 200:
                    raise await self._error(response, body["model"])
                payload = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._translate(exc) from exc
        return parse_completion(self.name, payload, body["model"])

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        """Streams deltas over SSE; an unfinished response is closed, which aborts upstream."""
        body = request_body(request, self.default_model, stream=True)
        try:
            response = await self.session.post(self._url, data=orjson.dumps(body), headers=_request_headers())
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._translate(exc) from exc
        try:
            if response.status != 200:
                raise await self._error(response, body["model"])
            decoder = SSEDecoder(self.name, body["model"])
            content = response.content
            while not decoder.done:
                data = await content.readany()
                if not data:
                    break
                deltas = decoder.feed(data)
                if deltas:
                    # Tokens that arrived in one read go out as one delta: nothing waits for it,
                    # and under load the per-message cost is paid once per read, not per token.
                    yield deltas[0] if len(deltas) == 1 else "".join(deltas)
                if decoder.error is not None:
                    raise decoder.error
            yield decoder.end()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._translate(exc) from exc
        finally:
            # close(), not release(): a response not read to the end must drop its connection so
            # the engine sees the client go and stops generating.
            response.close()

    async def _served_models(self) -> list[str]:
        try:
            async with self.session.get(self.endpoint + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return served_model_ids(await r.read())
        except Exception:  # best effort: the error message is still useful without the list
            return []

    async def check_health(self, timeout_s: float) -> HealthReport:
        """GET /health, then /v1/models; never generates tokens."""
        start = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.get(self.endpoint + self.config.health_path, timeout=timeout) as response:
                status = response.status
                await response.read()
            if status != 200:
                return HealthReport(
                    False,
                    time.perf_counter() - start,
                    error=f"{self.config.health_path} answered {status}",
                    reachable=status < 500,
                )
            async with self.session.get(self.endpoint + "/v1/models", timeout=timeout) as response:
                status = response.status
                models_body = await response.read()
            if status != 200:
                return HealthReport(
                    False, time.perf_counter() - start, error=f"/v1/models answered {status}", reachable=status < 500
                )
            served = served_model_ids(models_body)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return HealthReport(False, time.perf_counter() - start, error=str(self._translate(exc)))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return HealthReport(
                False, time.perf_counter() - start, error="/v1/models sent an unexpected body", reachable=True
            )
        latency = time.perf_counter() - start
        if served and self.default_model not in served:
            return HealthReport(
                False,
                latency,
                served,
                reachable=True,
                error=(
                    f"{self.config.model_env_var or 'model'}={self.default_model!r} is not served by "
                    f"{self.endpoint}; it serves {served}"
                ),
            )
        return HealthReport(True, latency, served)

    async def aclose(self) -> None:
        """Closes the pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None
