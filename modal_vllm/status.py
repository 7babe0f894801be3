"""Where the Modal vLLM endpoint is, and whether it is up, warm and serving the expected model.

The gateway's Health RPC and ``python -m modal_vllm status`` both use this module:

* :func:`resolve_endpoint` finds the base URL: ``MODAL_WEB_URL`` when set, else a lookup of the
  deployed function through the Modal SDK when ``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET`` are set.
  The SDK lookup blocks and, without network, retries for about a minute, so it runs in a daemon
  thread under a timeout; :func:`resolve_endpoint_async` does the same without blocking the loop.
* :func:`probe_endpoint` asks vLLM's ``GET /health`` and ``GET /v1/models`` and turns every way
  they fail into an :class:`EndpointStatus` with an actionable ``error``.
* :func:`proxy_auth_headers` builds the headers Modal's proxy auth and vLLM's API key need.

Any HTTP request, ``/health`` included, wakes a scaled-to-zero container and resets its idle
timer, so every probe can cost GPU time: callers should probe only while they believe the
endpoint is warm. Header values are secrets; they never appear in errors or reprs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import httpx

from modal_vllm.settings import APP_NAME, FUNCTION_NAME

T = TypeVar("T")

DEFAULT_PROBE_TIMEOUT_S = 10.0
"""Per-request timeout of a probe; a cold start takes far longer, so a timeout means cold."""

WARM_HEALTH_LATENCY_S = 5.0
"""A /health answer slower than this was held by Modal's proxy while a container booted."""

DEFAULT_LOOKUP_TIMEOUT_S = 20.0
"""Bound on the SDK URL lookup, which otherwise retries for about a minute without network."""

DEPLOY_HINT = "deploy with `modal deploy modal_vllm/deployment.py` (see docs/modal.md)"

WebUrlLookup = Callable[[str, str, Mapping[str, str]], str | None]
"""(app name, function name, env) -> the deployed function's web URL, or None if it has none."""


class EndpointLookupError(RuntimeError):
    """The Modal endpoint is configured through tokens, but its URL could not be looked up."""


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
    """The outcome of one probe of the endpoint.

    Attributes:
        url: Base URL probed.
        healthy: ``GET /health`` answered 200.
        warm: Healthy, and answered within ``WARM_HEALTH_LATENCY_S``, so no cold start happened.
        served_models: Model ids from ``GET /v1/models`` (vLLM's ``--served-model-name``).
        expected_model: The model the gateway will ask for (``MODAL_MODEL``).
        model_matches: ``expected_model`` is among ``served_models`` (true when none expected).
        probe_latency_s: Round-trip time of ``GET /health`` in seconds.
        http_status: Status of the last HTTP answer, None when none came.
        error: What is wrong and what to do about it; empty when all is fine.
    """

    url: str
    healthy: bool = False
    warm: bool = False
    served_models: list[str] = field(default_factory=list)
    expected_model: str = ""
    model_matches: bool = False
    probe_latency_s: float = 0.0
    http_status: int | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        """Healthy, serving the expected model, and nothing else wrong."""
        return self.healthy and self.model_matches and not self.error

    @property
    def message(self) -> str:
        """One line for humans: the error, the model mismatch, or that all is fine."""
        if self.error:
            return self.error
        if not self.model_matches:
            return (
                f"MODAL_MODEL={self.expected_model!r} is not served by {self.url}; the endpoint "
                f"serves: {self.served_models!r}. Set MODAL_MODEL to one of them or redeploy "
                f"with MODAL_MODEL={self.expected_model}."
            )
        temperature = "warm" if self.warm else "cold (it just started)"
        return f"{self.url} is healthy and {temperature}, serving {self.served_models!r}."

    def to_dict(self) -> dict[str, Any]:
        """The fields plus ``ok`` and ``message``, ready for ``json.dumps``."""
        return {**asdict(self), "ok": self.ok, "message": self.message}


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
    if direct is not None or not _tokens_configured(env):
        return direct
    call = _lookup_call(env, lookup)
    try:
        url = _run_in_daemon_thread(call, lookup_timeout_s)
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
    if direct is not None or not _tokens_configured(env):
        return direct
    call = _lookup_call(env, lookup)
    try:
        url = await _run_in_daemon_thread_async(call, lookup_timeout_s)
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
    status.error = _scrub(status.error, secrets)
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
    try:
        health = await http.get(f"{url}/health", headers=headers, timeout=timeout_s)
    except httpx.ConnectError:
        status.error = (
            f"{url} is not listening (connection refused): the container is cold or the vLLM "
            "engine is still starting; requests will wait for a cold start"
        )
        return
    except httpx.TimeoutException:
        status.error = (
            f"{url}/health gave no answer within {timeout_s:g} s: the container is cold-starting "
            "(Modal holds requests while it boots and loads the model) or overloaded"
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
    status.warm = status.probe_latency_s <= warm_latency_s

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


def _scrub(text: str, secrets: list[str]) -> str:
    # Belt and braces: no message we build includes headers, but exception texts are not ours.
    for secret in filter(None, secrets):  # replacing "" would splice *** between every char
        text = text.replace(secret, "***")
    return text


def _from_web_url(env: Mapping[str, str]) -> ResolvedEndpoint | None:
    raw = env.get("MODAL_WEB_URL", "").strip()
    if not raw:
        return None
    if not raw.startswith(("https://", "http://")):
        raise ValueError(f"MODAL_WEB_URL must start with https:// (or http:// for a local server), got {raw!r}")
    return ResolvedEndpoint(url=raw.rstrip("/"), source="MODAL_WEB_URL")


def _tokens_configured(env: Mapping[str, str]) -> bool:
    has_id = bool(env.get("MODAL_TOKEN_ID", "").strip())
    has_secret = bool(env.get("MODAL_TOKEN_SECRET", "").strip())
    if has_id != has_secret:
        missing = "MODAL_TOKEN_SECRET" if has_id else "MODAL_TOKEN_ID"
        raise EndpointLookupError(
            f"{missing} is not set: MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are needed together to "
            f"look up Modal app {APP_NAME!r}; or set MODAL_WEB_URL instead"
        )
    return has_id


def _lookup_call(env: Mapping[str, str], lookup: WebUrlLookup | None) -> Callable[[], str | None]:
    chosen, frozen_env = lookup or _modal_sdk_lookup, dict(env)
    return lambda: chosen(APP_NAME, FUNCTION_NAME, frozen_env)


def _modal_sdk_lookup(app_name: str, function_name: str, env: Mapping[str, str]) -> str | None:
    # Imported here: modal costs ~0.3 s to import and most callers set MODAL_WEB_URL.
    import modal

    # An explicit client uses the tokens in `env`, which need not be os.environ.
    with modal.Client.from_credentials(env["MODAL_TOKEN_ID"], env["MODAL_TOKEN_SECRET"]) as client:
        function = modal.Function.from_name(
            app_name,
            function_name,
            environment_name=env.get("MODAL_ENVIRONMENT") or None,
            client=client,
        )
        url: str | None = function.get_web_url()
        return url


def _from_looked_up(url: str | None) -> ResolvedEndpoint:
    if not url:
        raise EndpointLookupError(
            f"Modal app {APP_NAME!r} function {FUNCTION_NAME!r} has no web URL; {DEPLOY_HINT}, or set MODAL_WEB_URL"
        )
    return ResolvedEndpoint(url=url.rstrip("/"), source="modal-sdk")


def _lookup_error(exc: Exception, env: Mapping[str, str]) -> EndpointLookupError:
    detail = _scrub(f"{type(exc).__name__}: {exc}", [env.get("MODAL_TOKEN_SECRET", "")])
    return EndpointLookupError(
        f"Could not look up the web URL of Modal app {APP_NAME!r} function {FUNCTION_NAME!r} "
        f"with MODAL_TOKEN_ID/MODAL_TOKEN_SECRET ({detail}); check the tokens and that the app "
        f"is deployed; {DEPLOY_HINT}; or set MODAL_WEB_URL to skip the lookup"
    )


def _run_in_daemon_thread(call: Callable[[], T], timeout_s: float) -> T:
    # A daemon thread, not an executor: executors join their threads at exit, and a lookup
    # stuck retrying an unreachable Modal would hold the process for a minute.
    outcome: list[tuple[bool, Any]] = []
    done = threading.Event()

    def target() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=target, name="modal-url-lookup", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"no answer from Modal within {timeout_s:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result


async def _run_in_daemon_thread_async(call: Callable[[], T], timeout_s: float) -> T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():  # the waiter timed out or was cancelled
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        value: Any
        try:
            ok, value = True, call()
        except BaseException as exc:
            ok, value = False, exc
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:
            pass  # the loop closed while we waited: nobody wants the answer

    threading.Thread(target=target, name="modal-url-lookup", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout_s)
    except TimeoutError:
        raise TimeoutError(f"no answer from Modal within {timeout_s:g} s") from None
