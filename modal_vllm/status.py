"""Where the Modal vLLM endpoint is, and whether it is up, warm and serving the expected model.

The gateway's Modal provider and ``python -m modal_vllm status`` both use this module:

* :func:`resolve_endpoint` finds the base URL: ``MODAL_WEB_URL`` when set, else a lookup of the
  deployed function through Modal's API when ``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET`` are set
  (:mod:`modal_vllm.sdk`); :func:`resolve_endpoint_async` does the same without blocking the loop.
* :func:`probe_endpoint` asks vLLM's ``GET /health`` and ``GET /v1/models`` and turns every way
  they fail into an :class:`EndpointStatus` with an actionable ``error``.
* :func:`cold_status` is the status of an endpoint Modal reports at zero containers, built
  without sending it anything.
* :func:`proxy_auth_headers` builds the headers Modal's proxy auth and vLLM's API key need.

Any HTTP request, ``/health`` included, wakes a scaled-to-zero container and resets its idle
timer, so a probe can cost GPU time: ask Modal's API first (:func:`modal_vllm.sdk.read_stats`)
and probe only when a container is already running. "Cold" is said only when Modal says so: a
refused connection is a wrong URL (Modal's proxy accepts connections even at zero containers).
Header values are secrets; they never appear in errors or reprs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from modal_vllm.sdk import (
    DEFAULT_API_TIMEOUT_S,
    DEPLOY_HINT,
    EndpointLookupError,
    FunctionStats,
    WebUrlLookup,
    modal_sdk_web_url,
    run_in_daemon_thread,
    run_in_daemon_thread_async,
    scrub,
    tokens_configured,
)
from modal_vllm.settings import APP_NAME, FUNCTION_NAME

__all__ = [
    "DEFAULT_LOOKUP_TIMEOUT_S",
    "DEFAULT_PROBE_TIMEOUT_S",
    "WARM_HEALTH_LATENCY_S",
    "EndpointLookupError",
    "EndpointStatus",
    "ResolvedEndpoint",
    "cold_status",
    "probe_endpoint",
    "proxy_auth_headers",
    "resolve_endpoint",
    "resolve_endpoint_async",
]

DEFAULT_PROBE_TIMEOUT_S = 10.0
"""Per-request timeout of a probe; a cold start takes far longer than this."""

WARM_HEALTH_LATENCY_S = 5.0
"""A healthy answer slower than this was held by Modal's proxy while a container booted."""

DEFAULT_LOOKUP_TIMEOUT_S = DEFAULT_API_TIMEOUT_S
"""Bound on the SDK URL lookup, which otherwise retries for about a minute without network."""


@dataclass(frozen=True, slots=True)
class ResolvedEndpoint:
    """Where the endpoint is and how that was found.

    Attributes:
        url: Base URL without a trailing slash, e.g. ``https://ws--app-serve.modal.run``.
        source: ``MODAL_WEB_URL`` or ``modal-sdk``.
    """

    url: str
    source: str


@dataclass(slots=True)
class EndpointStatus:
    """What is known about the endpoint: Modal's container count and/or one probe.

    Attributes:
        url: Base URL.
        expected_model: The model the gateway will ask for (``MODAL_MODEL``).
        containers: Running containers as Modal's API reports them; None when not read.
        backlog: Requests queued at Modal; None when not read.
        probed: An HTTP request was sent to the endpoint (which may have woken it).
        healthy: ``GET /health`` answered 200.
        served_models: Model ids from ``GET /v1/models`` (vLLM's ``--served-model-name``).
        model_matches: ``expected_model`` is among ``served_models`` (true when none expected).
        probe_latency_s: Round-trip time of ``GET /health`` in seconds.
        http_status: Status of the last HTTP answer, None when none came.
        woke_it: The healthy answer was so slow that Modal must have booted a container for it.
        error: What is wrong and what to do about it; empty when all is fine.
    """

    url: str
    expected_model: str = ""
    containers: int | None = None
    backlog: int | None = None
    probed: bool = False
    healthy: bool = False
    served_models: list[str] = field(default_factory=list)
    model_matches: bool = False
    probe_latency_s: float = 0.0
    http_status: int | None = None
    woke_it: bool = False
    error: str = ""

    @property
    def state(self) -> str:
        """``cold`` only when Modal reports zero containers; ``warm`` when a container answered
        (or Modal counts one and it answered); ``starting`` when Modal counts a container that
        is not healthy yet; ``unknown`` otherwise (no container count and no healthy answer)."""
        if self.containers == 0:
            return "cold"
        if self.healthy:
            return "warm"
        if self.containers:
            answered = self.http_status is not None and self.http_status != 503
            return "warm" if answered else "starting"
        return "unknown"

    @property
    def ok(self) -> bool:
        """Healthy, serving the expected model, and nothing else wrong."""
        return self.healthy and self.model_matches and not self.error

    @property
    def message(self) -> str:
        """One line for humans: the error, the model mismatch, the cold state, or all fine."""
        if self.error:
            return self.error
        if self.state == "cold" and not self.probed:
            return (
                f"{self.url} is cold: Modal reports 0 running containers (nothing is billed; the "
                "next request starts one and waits for its cold start)"
            )
        if not self.model_matches:
            return (
                f"MODAL_MODEL={self.expected_model!r} is not served by {self.url}; the endpoint "
                f"serves: {self.served_models!r}. Set MODAL_MODEL to one of them or redeploy "
                f"with MODAL_MODEL={self.expected_model}."
            )
        woke = (
            f" (it took {self.probe_latency_s:.1f} s: this probe probably started a container)" if self.woke_it else ""
        )
        return f"{self.url} is healthy, serving {self.served_models!r}{woke}."

    def to_dict(self) -> dict[str, Any]:
        """The fields plus ``state``, ``ok`` and ``message``, ready for ``json.dumps``."""
        return {**asdict(self), "state": self.state, "ok": self.ok, "message": self.message}


def cold_status(url: str, expected_model: str, stats: FunctionStats) -> EndpointStatus:
    """The status of an endpoint Modal reports at zero containers, without probing it.

    Args:
        url: Base URL.
        expected_model: ``MODAL_MODEL``.
        stats: Modal's answer; ``running_containers`` should be 0.

    Returns:
        A status whose ``state`` is ``cold`` and ``ok`` is False.
    """
    return EndpointStatus(
        url=url.rstrip("/"), expected_model=expected_model, containers=stats.running_containers, backlog=stats.backlog
    )


def proxy_auth_headers(env: Mapping[str, str]) -> dict[str, str]:
    """Headers that authenticate a request to the deployment.

    Args:
        env: The environment: ``MODAL_PROXY_TOKEN_ID``/``MODAL_PROXY_TOKEN_SECRET`` become
            ``Modal-Key``/``Modal-Secret`` (Modal's proxy auth, only as a pair);
            ``MODAL_VLLM_API_KEY`` (or ``VLLM_API_KEY``) becomes ``Authorization: Bearer``.

    Returns:
        The headers; empty when nothing is configured.
    """
    headers: dict[str, str] = {}
    token_id = env.get("MODAL_PROXY_TOKEN_ID", "").strip()
    token_secret = env.get("MODAL_PROXY_TOKEN_SECRET", "").strip()
    if token_id and token_secret:
        headers["Modal-Key"] = token_id
        headers["Modal-Secret"] = token_secret
    api_key = (env.get("MODAL_VLLM_API_KEY", "") or env.get("VLLM_API_KEY", "")).strip()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def resolve_endpoint(
    env: Mapping[str, str],
    *,
    lookup: WebUrlLookup | None = None,
    lookup_timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S,
) -> ResolvedEndpoint | None:
    """Finds the endpoint's base URL from the environment, blocking for an SDK lookup.

    Args:
        env: The environment (``MODAL_WEB_URL``, ``MODAL_TOKEN_ID``, ``MODAL_TOKEN_SECRET``,
            optionally ``MODAL_ENVIRONMENT``).
        lookup: Replaces the Modal SDK lookup (tests inject a fake).
        lookup_timeout_s: Give up on the SDK lookup after this many seconds.

    Returns:
        The endpoint, or None when neither ``MODAL_WEB_URL`` nor the tokens are set.

    Raises:
        ValueError: ``MODAL_WEB_URL`` is not an http(s) URL.
        EndpointLookupError: Only one token is set, or the SDK lookup failed or timed out.
    """
    direct = _from_web_url(env)
    if direct is not None or not tokens_configured(env):
        return direct
    call = _lookup_call(env, lookup)
    try:
        url = run_in_daemon_thread(call, lookup_timeout_s)
    except Exception as exc:
        raise _lookup_error(exc, env) from None
    return _from_looked_up(url)


async def resolve_endpoint_async(
    env: Mapping[str, str],
    *,
    lookup: WebUrlLookup | None = None,
    lookup_timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S,
) -> ResolvedEndpoint | None:
    """Like :func:`resolve_endpoint` (same arguments, result and errors), without blocking.

    The lookup runs in a daemon thread rather than the loop's default executor, so a lookup
    stuck on an unreachable Modal never delays the process's shutdown.
    """
    direct = _from_web_url(env)
    if direct is not None or not tokens_configured(env):
        return direct
    call = _lookup_call(env, lookup)
    try:
        url = await run_in_daemon_thread_async(call, lookup_timeout_s)
    except Exception as exc:
        raise _lookup_error(exc, env) from None
    return _from_looked_up(url)


async def probe_endpoint(
    base_url: str,
    expected_model: str,
    *,
    headers: Mapping[str, str] | None = None,
    client: httpx.AsyncClient | None = None,
    timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    warm_latency_s: float = WARM_HEALTH_LATENCY_S,
) -> EndpointStatus:
    """Asks the endpoint's ``/health`` and ``/v1/models`` how it is; never raises for HTTP.

    Args:
        base_url: Base URL, with or without a trailing slash.
        expected_model: Model id the gateway will request (``MODAL_MODEL``); empty skips the check.
        headers: Auth headers, usually from :func:`proxy_auth_headers`.
        client: A pooled client to reuse; a temporary one is made and closed otherwise.
        timeout_s: Per-request timeout in seconds.
        warm_latency_s: A healthy answer slower than this counts as a cold start.

    Returns:
        The status; ``error`` says what is wrong, without any header value.
    """
    url = base_url.rstrip("/")
    status = EndpointStatus(url=url, expected_model=expected_model)
    # The bare token is scrubbed too, not only "Bearer <token>".
    values = [value for value in (headers or {}).values() if value]
    secrets = values + [value.partition(" ")[2] for value in values if " " in value]
    own_client = client is None
    http = client if client is not None else httpx.AsyncClient()
    try:
        await _probe(http, status, dict(headers or {}), timeout_s, warm_latency_s)
    finally:
        if own_client:
            await http.aclose()
    status.error = scrub(status.error, secrets)
    return status


async def _probe(
    http: httpx.AsyncClient,
    status: EndpointStatus,
    headers: dict[str, str],
    timeout_s: float,
    warm_latency_s: float,
) -> None:
    url = status.url
    started = time.monotonic()
    status.probed = True
    try:
        health = await http.get(f"{url}/health", headers=headers, timeout=timeout_s)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        # Modal's proxy accepts connections even at zero containers (it holds the request while
        # one boots), so failing to connect at all is never a cold start.
        status.error = (
            f"cannot connect to {url} ({type(exc).__name__}: {str(exc) or 'refused'}): nothing is "
            "listening there, which is not how a cold Modal app behaves; check MODAL_WEB_URL "
            f"(`modal app list` shows deployed apps) or {DEPLOY_HINT}"
        )
        return
    except httpx.TimeoutException:
        status.error = (
            f"{url}/health gave no answer within {timeout_s:g} s: Modal holds requests while a "
            "container boots and loads the model, so it may be starting; or it is overloaded"
        )
        return
    except httpx.HTTPError as exc:
        status.error = f"GET {url}/health failed: {type(exc).__name__}: {exc}"
        return
    status.probe_latency_s = time.monotonic() - started
    status.http_status = health.status_code
    if health.status_code != 200:
        status.error = _health_error(url, health.status_code, headers)
        return
    status.healthy = True
    status.woke_it = status.probe_latency_s > warm_latency_s

    try:
        models = await http.get(f"{url}/v1/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        status.error = f"GET {url}/v1/models failed: {type(exc).__name__}: {exc}"
        return
    status.http_status = models.status_code
    if models.status_code in (401, 403):
        # /health passed the proxy, so this is vLLM's own --api-key guarding /v1/*.
        status.error = (
            f"GET {url}/v1/models answered {models.status_code}: the deployment has a vLLM API "
            "key (MODAL_VLLM_API_KEY_SECRET); set MODAL_VLLM_API_KEY to the same value"
        )
        return
    if models.status_code != 200:
        status.error = f"GET {url}/v1/models answered HTTP {models.status_code}"
        return
    try:
        status.served_models = _model_ids(models.json())
    except ValueError as exc:
        status.error = f"GET {url}/v1/models returned an unexpected body: {exc}"
        return
    status.model_matches = not status.expected_model or (status.expected_model in status.served_models)


def _health_error(url: str, code: int, headers: Mapping[str, str]) -> str:
    if code in (401, 403):
        has_key = any(name.lower() == "modal-key" for name in headers)
        sent = "were sent but rejected" if has_key else "are not set"
        return (
            f"GET {url}/health answered {code}: the deployment requires Modal proxy auth and "
            f"MODAL_PROXY_TOKEN_ID/MODAL_PROXY_TOKEN_SECRET {sent}; create a proxy auth token "
            "in the Modal dashboard and set both"
        )
    if code == 503:
        return (
            f"GET {url}/health answered 503: the vLLM engine is starting or has died; "
            "check `modal app logs` if it persists"
        )
    if code == 404:
        return f"GET {url}/health answered 404: no app at this URL; check MODAL_WEB_URL or {DEPLOY_HINT}"
    return f"GET {url}/health answered HTTP {code}"


def _model_ids(body: Any) -> list[str]:
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ValueError('expected {"data": [{"id": ...}, ...]}')
    ids = [item.get("id") for item in body["data"] if isinstance(item, dict)]
    return [model_id for model_id in ids if isinstance(model_id, str)]


def _from_web_url(env: Mapping[str, str]) -> ResolvedEndpoint | None:
    raw = env.get("MODAL_WEB_URL", "").strip()
    if not raw:
        return None
    if not raw.startswith(("https://", "http://")):
        raise ValueError(f"MODAL_WEB_URL must start with https:// (or http:// for a local server), got {raw!r}")
    return ResolvedEndpoint(url=raw.rstrip("/"), source="MODAL_WEB_URL")


def _lookup_call(env: Mapping[str, str], lookup: WebUrlLookup | None) -> Callable[[], str | None]:
    chosen, frozen_env = lookup or modal_sdk_web_url, dict(env)
    return lambda: chosen(APP_NAME, FUNCTION_NAME, frozen_env)


def _from_looked_up(url: str | None) -> ResolvedEndpoint:
    if not url:
        raise EndpointLookupError(
            f"Modal app {APP_NAME!r} function {FUNCTION_NAME!r} has no web URL; {DEPLOY_HINT}, or set MODAL_WEB_URL"
        )
    return ResolvedEndpoint(url=url.rstrip("/"), source="modal-sdk")


def _lookup_error(exc: Exception, env: Mapping[str, str]) -> EndpointLookupError:
    detail = scrub(f"{type(exc).__name__}: {exc}", [env.get("MODAL_TOKEN_SECRET", ""), env.get("MODAL_TOKEN_ID", "")])
    return EndpointLookupError(
        f"Could not look up the web URL of Modal app {APP_NAME!r} function {FUNCTION_NAME!r} "
        f"with MODAL_TOKEN_ID/MODAL_TOKEN_SECRET ({detail}); check the tokens and that the app "
        f"is deployed; {DEPLOY_HINT}; or set MODAL_WEB_URL to skip the lookup"
    )
