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
  stops the GPU: every stream closes its response in ``finally``.
* An unknown model is a 404; the error names the variable that configures the model and the
  models the endpoint serves (``GET /v1/models``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from opentelemetry import propagate

from service.errors import (
    InvalidRequestError,
    ProviderAuthError,
    ProviderError,
    ProviderModelNotFoundError,
    ProviderProtocolError,
    ProviderTimeoutError,
    ProviderUnavailableError,
)
from service.providers.base import (
    ChatRequest,
    ChatResult,
    FinishReason,
    HealthReport,
    StreamEnd,
    StreamItem,
    Usage,
    finish_reason_from_openai,
)

CHAT_PATH = "/v1/chat/completions"


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
    headers = {"content-type": "application/json"}
    propagate.inject(headers)
    return headers


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_text(body: bytes) -> str:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace")
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(data)[:300]


class OpenAICompatProvider:
    """A provider over any OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(self, config: OpenAICompatConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.name = config.name
        self.kind = config.kind
        self.endpoint = config.base_url.rstrip("/")
        self.default_model = config.model
        self.scale_to_zero = config.scale_to_zero
        self._client = client
        self._owns_client = client is None
        self._url = self.endpoint + CHAT_PATH

    async def start(self) -> None:
        """Creates the pooled HTTP client (one per provider, reused by every call)."""
        if self._client is None:
            limits = httpx.Limits(
                max_connections=self.config.max_connections,
                max_keepalive_connections=self.config.max_connections,
            )
            self._client = httpx.AsyncClient(
                headers=dict(self.config.headers),
                timeout=httpx.Timeout(self.config.request_timeout_s, connect=self.config.connect_timeout_s),
                limits=limits,
            )

    @property
    def client(self) -> httpx.AsyncClient:
        """The pooled client; ``start()`` must have run."""
        if self._client is None:
            raise RuntimeError(f"provider {self.name} used before start()")
        return self._client

    def _body(self, request: ChatRequest, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self.default_model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def _raise_for_status(self, response: httpx.Response, model: str) -> None:
        """Translates a non-2xx answer into the error tree (the one place for HTTP codes)."""
        status = response.status_code
        text = _error_text(await response.aread())
        where = f"{self.name} ({self.endpoint}) answered {status}"
        if status == 404:
            served = await self._served_models()
            hint = f" Set {self.config.model_env_var} to one of them." if self.config.model_env_var else ""
            configured = (
                f"{self.config.model_env_var}={model!r}"
                if self.config.model_env_var and model == self.default_model
                else f"model {model!r}"
            )
            raise ProviderModelNotFoundError(
                self.name,
                f"{configured} is not served by {self.name} ({self.endpoint}); it serves {served}.{hint}",
                model=model,
                served=served,
            )
        if status in (401, 403):
            raise ProviderAuthError(
                self.name, f"{where}: credentials refused ({text}); check the provider's API key or proxy token"
            )
        if status in (400, 413, 422):
            raise InvalidRequestError(f"{self.name} rejected the request: {text}")
        if status == 429 or status == 408 or status >= 500:
            raise ProviderUnavailableError(self.name, f"{where}: {text}", retry_after_s=_retry_after_s(response))
        raise ProviderError(self.name, f"{where}: {text}")

    def _translate(self, exc: Exception) -> ProviderError:
        """Maps httpx transport exceptions to the error tree."""
        if isinstance(exc, httpx.TimeoutException):
            return ProviderTimeoutError(self.name, f"{self.name} ({self.endpoint}) timed out: {type(exc).__name__}")
        if isinstance(
            exc, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.NetworkError)
        ):
            return ProviderUnavailableError(
                self.name, f"{self.name} ({self.endpoint}) connection failed: {type(exc).__name__}: {exc}"
            )
        return ProviderError(self.name, f"{self.name} ({self.endpoint}) failed: {type(exc).__name__}: {exc}")

    async def chat(self, request: ChatRequest) -> ChatResult:
        """One unary completion."""
        body = self._body(request, stream=False)
        try:
            response = await self.client.post(self._url, content=orjson.dumps(body), headers=_request_headers())
            if response.status_code != 200:
                await self._raise_for_status(response, body["model"])
            data = orjson.loads(response.content)
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        except orjson.JSONDecodeError as exc:
            raise ProviderProtocolError(self.name, f"{self.name} sent a body that is not JSON") from exc
        if "error" in data and "choices" not in data:
            raise ProviderProtocolError(self.name, f"{self.name} returned an error: {_error_text(response.content)}")
        try:
            choice = data["choices"][0]
            if not choice.get("finish_reason"):
                raise ProviderProtocolError(self.name, f"{self.name} answered without a finish reason (incomplete)")
            usage = data.get("usage") or {}
            return ChatResult(
                id=str(data.get("id", "")),
                model=str(data.get("model") or body["model"]),
                content=choice["message"].get("content") or "",
                finish_reason=finish_reason_from_openai(choice.get("finish_reason")),
                usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ProviderProtocolError(self.name, f"{self.name} sent an unexpected completion shape: {exc!r}") from exc

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamItem, None]:
        """Streams deltas over SSE; the response is closed in ``finally`` (aborts upstream)."""
        body = self._body(request, stream=True)
        req = self.client.build_request("POST", self._url, content=orjson.dumps(body), headers=_request_headers())
        try:
            response = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        try:
            if response.status_code != 200:
                await self._raise_for_status(response, body["model"])
            finish: str | None = None
            usage = Usage()
            resp_id = ""
            model = body["model"]
            done = False
            buffer = b""
            async for raw in response.aiter_raw():
                buffer += raw
                # SSE events end with a blank line; vLLM and llama.cpp send one data line each.
                while True:
                    nl = buffer.find(b"\n")
                    if nl < 0:
                        break
                    line = buffer[:nl]
                    buffer = buffer[nl + 1 :]
                    if not line.startswith(b"data:"):
                        continue  # blank separator, comment, event: or id: line
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    try:
                        chunk = orjson.loads(payload)
                    except orjson.JSONDecodeError as exc:
                        raise ProviderProtocolError(
                            self.name, f"{self.name} sent malformed SSE data: {payload[:80]!r}"
                        ) from exc
                    if "error" in chunk:
                        raise ProviderProtocolError(
                            self.name, f"{self.name} reported an error mid-stream: {_error_text(payload)}"
                        )
                    if not resp_id:
                        resp_id = chunk.get("id", "")
                        model = chunk.get("model") or model
                    choices = chunk.get("choices")
                    if choices:
                        choice = choices[0]
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                    u = chunk.get("usage")
                    if u:
                        usage = Usage(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
                if done:
                    break
            if finish is None:
                raise ProviderProtocolError(
                    self.name,
                    f"{self.name} ended the stream without a finish reason"
                    + (" ([DONE] received)" if done else " (connection closed early)"),
                )
            yield StreamEnd(id=resp_id, model=model, finish_reason=finish_reason_from_openai(finish), usage=usage)
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        finally:
            await response.aclose()

    async def _served_models(self) -> list[str]:
        try:
            response = await self.client.get(self.endpoint + "/v1/models", timeout=5.0)
            data = orjson.loads(response.content)
            return [str(m["id"]) for m in data.get("data", [])]
        except Exception:  # best effort: the error message is still useful without the list
            return []

    async def check_health(self, timeout_s: float) -> HealthReport:
        """GET /health, then /v1/models; never generates tokens."""
        start = time.perf_counter()
        try:
            response = await self.client.get(self.endpoint + self.config.health_path, timeout=timeout_s)
            if response.status_code != 200:
                return HealthReport(
                    False,
                    time.perf_counter() - start,
                    error=f"{self.config.health_path} answered {response.status_code}",
                    reachable=response.status_code < 500,
                )
            models = await self.client.get(self.endpoint + "/v1/models", timeout=timeout_s)
            if models.status_code != 200:
                return HealthReport(
                    False,
                    time.perf_counter() - start,
                    error=f"/v1/models answered {models.status_code}",
                    reachable=models.status_code < 500,
                )
            served = [str(m["id"]) for m in orjson.loads(models.content).get("data", [])]
        except httpx.HTTPError as exc:
            return HealthReport(False, time.perf_counter() - start, error=str(self._translate(exc)))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return HealthReport(False, time.perf_counter() - start, error="/v1/models sent an unexpected body")
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
        """Closes the pool if this provider created it."""
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None


__all__ = ["FinishReason", "OpenAICompatConfig", "OpenAICompatProvider"]
