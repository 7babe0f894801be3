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

* Tool calls stream as ``delta.tool_calls`` fragments (vLLM needs ``--enable-auto-tool-choice``
  and a ``--tool-call-parser``); ``tool_choice`` without ``tools`` is a 400 there, so it is left
  out. Structured output is ``response_format`` (vLLM ignores ``guided_json`` from 0.12).

Both RPCs are served from :meth:`OpenAICompatProvider.stream` (the router assembles unary
answers), so there is no unary code path. Text deltas that arrive in the same network read are
relayed as one delta (never delayed to wait for more), so a fast upstream costs one gRPC message
per read rather than per token.

The HTTP client is :mod:`service.providers.http.client`, a keep-alive HTTP/1.1 pool on asyncio
Protocols with llhttp doing the framing (see there for the measurements against httpx and aiohttp);
it honours HTTP(S)_PROXY/NO_PROXY as httpx does. Calls use one pool; health probes and the model
list use a small pool of their own, so a busy traffic pool never fails a probe. The wire format
lives in :mod:`service.providers.http.openai_wire` and is tested without I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field

import orjson
from opentelemetry import propagate

from service.errors import (
    ConfigError,
    GatewayError,
    ProviderError,
    ProviderProtocolError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from service.providers.base import ChatRequest, HealthReport, StreamItem
from service.providers.http import client as http1
from service.providers.http.openai_wire import (
    CHAT_PATH,
    SSEDecoder,
    error_for_status,
    request_body,
    served_model_ids,
)

log = logging.getLogger(__name__)

# Health probes and the model list: connections of their own, so a probe never waits behind
# traffic; none is kept between probes (minutes apart, longer than any keep-alive).
_PROBE_CONNECTIONS = 2

# After SSE [DONE] the chunked body's terminator normally follows at once; waiting this long for it
# keeps the connection reusable, and a server that never sends it costs no more than this.
_DRAIN_AFTER_DONE_S = 0.05


@dataclass(frozen=True, slots=True)
class OpenAICompatConfig:
    """Settings of one OpenAI-compatible upstream.

    Attributes:
        name: Name in the chain.
        base_url: Scheme, host, port and an optional path prefix; a trailing ``/v1`` is accepted
            and dropped (request paths carry it).
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
    image_input: bool = True  # the upstream takes image content parts (a vision model)
    connect_timeout_s: float = 3.0
    max_connections: int = 64
    pool_timeout_s: float = http1.DEFAULT_POOL_TIMEOUT_S
    idle_timeout_s: float = http1.DEFAULT_IDLE_TIMEOUT_S  # 0: a connection is never reused
    health_path: str = "/health"


def normalise_base_url(url: str) -> str:
    """``url`` without trailing slashes and without a trailing ``/v1`` (paths add it)."""
    base = url.rstrip("/")
    if base.lower().endswith("/v1"):
        base = base[:-3].rstrip("/")
    return base


def _request_headers() -> dict[str, str] | None:
    """The W3C trace context of the current attempt span, so a vLLM started with an OTLP endpoint
    joins the caller's trace (nothing when tracing is off)."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


class OpenAICompatProvider:
    """A provider over any OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(self, config: OpenAICompatConfig) -> None:
        self.config = config
        self.name = config.name
        self.kind = config.kind
        self.endpoint = normalise_base_url(config.base_url)
        if self.endpoint != config.base_url.rstrip("/"):
            log.info("%s: base URL %s used as %s (request paths add /v1)", self.name, config.base_url, self.endpoint)
        self.default_model = config.model
        self.scale_to_zero = config.scale_to_zero
        self.image_input = config.image_input
        self._pool: http1.Pool | None = None
        self._probe_pool: http1.Pool | None = None

    async def start(self) -> None:
        """Creates the connection pools: one for calls (sized to the concurrency limit), a small
        one for health probes and the model list."""
        if self._pool is not None:
            return
        self.endpoint = normalise_base_url(self.endpoint)  # a subclass may have resolved it since
        headers = {"content-type": "application/json", **self.config.headers}
        try:
            self._pool = http1.Pool(
                self.endpoint,
                max_connections=self.config.max_connections,
                connect_timeout_s=self.config.connect_timeout_s,
                pool_timeout_s=self.config.pool_timeout_s,
                idle_timeout_s=self.config.idle_timeout_s,
                headers=headers,
            )
            self._probe_pool = http1.Pool(
                self.endpoint,
                max_connections=_PROBE_CONNECTIONS,
                connect_timeout_s=self.config.connect_timeout_s,
                pool_timeout_s=self.config.pool_timeout_s,
                idle_timeout_s=0,
                headers=headers,
            )
        except ValueError as exc:
            raise ConfigError(f"{self.name}: {exc} (check the URL and HTTP_PROXY/HTTPS_PROXY/ALL_PROXY)") from exc
        if self._pool.proxy is not None:
            log.info("%s: %s is reached through the proxy %s", self.name, self.endpoint, self._pool.proxy.url)

    @property
    def pool(self) -> http1.Pool:
        """The connection pool; ``start()`` must have run."""
        if self._pool is None:
            raise RuntimeError(f"provider {self.name} used before start()")
        return self._pool

    @property
    def probe_pool(self) -> http1.Pool:
        """The health-probe pool; ``start()`` must have run."""
        if self._probe_pool is None:
            raise RuntimeError(f"provider {self.name} used before start()")
        return self._probe_pool

    async def _error(self, response: http1.Response, model: str) -> GatewayError:
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
        """Maps transport exceptions to the error tree."""
        if isinstance(exc, TimeoutError):
            return ProviderTimeoutError(self.name, f"{self.name} ({self.endpoint}) timed out")
        if isinstance(exc, http1.ProtocolViolation):
            return ProviderProtocolError(self.name, f"{self.name} ({self.endpoint}) broke HTTP: {exc}")
        if isinstance(exc, http1.PoolTimeout):
            # Our own pool, not the upstream, was the bottleneck: retryable, and never a timeout.
            return ProviderUnavailableError(
                self.name, f"{self.name} ({self.endpoint}) connection pool exhausted: {exc}"
            )
        if isinstance(exc, http1.ConnectFailed):
            return ProviderUnavailableError(
                self.name, f"{self.name} ({self.endpoint}) connection failed: {exc}", connect_failed=True
            )
        if isinstance(exc, (http1.HTTPError, OSError)):
            return ProviderUnavailableError(self.name, f"{self.name} ({self.endpoint}) connection failed: {exc}")
        return ProviderError(self.name, f"{self.name} ({self.endpoint}) failed: {type(exc).__name__}: {exc}")

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        """Streams deltas over SSE; an unfinished response is closed, which aborts upstream."""
        body = request_body(request, self.default_model, stream=True)
        try:
            response = await self.pool.request("POST", CHAT_PATH, orjson.dumps(body), _request_headers())
        except (http1.HTTPError, OSError) as exc:
            raise self._translate(exc) from exc
        try:
            if response.status != 200:
                raise await self._error(response, body["model"])
            decoder = SSEDecoder(self.name, body["model"])
            receive = response.receive
            while not decoder.done and (data := await receive()):
                # Text that arrived in one read is one delta (joined by the decoder): nothing waits
                # for it, and under load the per-message cost is paid once per read, not per token.
                # Tool-call fragments pass as they came, in order with the text around them.
                for item in decoder.feed(data):
                    yield item
                if decoder.error is not None:
                    raise decoder.error
            end = decoder.end()
            await response.drain(_DRAIN_AFTER_DONE_S)
            yield end
        except (http1.HTTPError, OSError) as exc:
            raise self._translate(exc) from exc
        finally:
            # A response not read to the end drops its connection, so the engine sees the client
            # go and stops generating.
            response.close()

    async def _served_models(self) -> list[str]:
        try:
            async with asyncio.timeout(5):
                response = await self.probe_pool.request("GET", "/v1/models")
                return served_model_ids(await response.read())
        except Exception:  # best effort: the error message is still useful without the list
            return []

    async def check_health(self, timeout_s: float) -> HealthReport:
        """GET /health, then /v1/models; never generates tokens."""
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                for path in (self.config.health_path, "/v1/models"):
                    response = await self.probe_pool.request("GET", path)
                    models_body = await response.read()
                    if response.status != 200:
                        return HealthReport(
                            False,
                            time.perf_counter() - start,
                            reachable=response.status < 500,
                            error=f"{path} answered {response.status}",
                        )
            served = served_model_ids(models_body)
        except (http1.HTTPError, OSError, TimeoutError) as exc:
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
        """Closes the pools."""
        for pool in (self._pool, self._probe_pool):
            if pool is not None:
                await pool.aclose()
        self._pool = self._probe_pool = None
