"""Modal's vLLM: the OpenAI-compatible provider plus what Modal adds.

How it differs from plain OpenAI/vLLM:

* It scales to zero. A cold replica takes 10-30 s (longer on the first model download); any
  request, ``/health`` included, starts one, bills the GPU and resets its idle timer. So when a
  Modal API token is set (``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET``), health checks first ask
  Modal's API how many containers run (:mod:`modal_vllm.sdk`, which wakes nothing) and probe
  ``/health`` only when one does; at zero the report says "cold (0 containers)" and is not
  ``reachable``, which the router reads as cold, not broken. Only :meth:`ModalProvider.wake`
  sends the request that starts a container. Without a token nothing can be known without a
  probe, and the router probes only while traffic keeps Modal warm anyway.
* Startup validation follows ``MODAL_VALIDATE_ON_START``: ``stats`` (the default with a token)
  reads the container count, ``probe`` asks ``/health`` (and wakes it), ``off`` (the default
  without a token) asks nothing and starts out cold.
* Proxy auth: with ``requires_proxy_auth`` every request needs ``Modal-Key``/``Modal-Secret``
  headers (``MODAL_PROXY_TOKEN_ID``/``MODAL_PROXY_TOKEN_SECRET``), else 401.
* The URL is permanent; when ``MODAL_WEB_URL`` is unset but a Modal API token is, it is looked up
  from the deployed app (``multi-agent-vllm-inference``, function ``serve``) at startup.
* Web endpoints cut a request at 150 s (Modal then answers with a redirect): keep
  REQUEST_TIMEOUT_S below that, and a stream cut there ends as an interrupted stream.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from typing import Literal

import httpx

from modal_vllm import status as modal_status
from modal_vllm.sdk import ModalApiError, StatsSource, read_stats_async
from modal_vllm.status import EndpointStatus, probe_endpoint
from service.config import Settings
from service.errors import ConfigError
from service.providers.base import HealthReport
from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider

log = logging.getLogger(__name__)

ValidateMode = Literal["stats", "probe", "off"]

COLD_REASON = "cold (0 containers)"
"""How a health report starts when Modal's API counts no running container."""


def modal_headers(settings: Settings) -> dict[str, str]:
    """Proxy-auth and vLLM API-key headers (secret values; never logged)."""
    headers: dict[str, str] = {}
    if settings.modal_proxy_token_id and settings.modal_proxy_token_secret:
        headers["Modal-Key"] = settings.modal_proxy_token_id
        headers["Modal-Secret"] = settings.modal_proxy_token_secret
    if settings.modal_vllm_api_key:
        headers["authorization"] = f"Bearer {settings.modal_vllm_api_key}"
    return headers


def validate_mode(settings: Settings) -> ValidateMode:
    """``MODAL_VALIDATE_ON_START``, defaulting to ``stats`` with a Modal API token, else ``off``.

    (Settings has already refused ``stats`` without a token.)
    """
    if settings.modal_validate_on_start is not None:
        return settings.modal_validate_on_start
    return "stats" if settings.modal_token_id and settings.modal_token_secret else "off"


class ModalProvider(OpenAICompatProvider):
    """vLLM on Modal."""

    def __init__(
        self,
        settings: Settings,
        *,
        stats_source: StatsSource | None = None,
        validate_on_start: ValidateMode | None = None,
    ) -> None:
        """Builds the provider; nothing is sent anywhere until :meth:`start`.

        Args:
            settings: The gateway settings.
            stats_source: Replaces the Modal SDK's container count (tests inject a fake).
            validate_on_start: Overrides ``MODAL_VALIDATE_ON_START``.
        """
        self._settings = settings
        self._stats_source = stats_source
        self._has_tokens = bool(settings.modal_token_id and settings.modal_token_secret)
        self.validate_on_start: ValidateMode = validate_on_start or validate_mode(settings)
        self._startup_check_pending = True
        # One TLS context for every probe: a bare httpx.AsyncClient() builds one (loading the CA
        # bundle, ~20 ms of CPU with the GIL held) on the event loop, and a wake-up probes every
        # WAKE_POLL_INTERVAL_S. Each probe still opens a connection of its own.
        self._probe_tls: ssl.SSLContext | None = None
        super().__init__(
            OpenAICompatConfig(
                name="modal",
                base_url=settings.modal_web_url or "https://unresolved.modal.run",
                model=settings.modal_model,
                model_env_var="MODAL_MODEL",
                headers=modal_headers(settings),
                scale_to_zero=True,
                connect_timeout_s=settings.connect_timeout_s,
                max_connections=settings.max_concurrent_requests * 2,
            )
        )

    def _modal_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key == "MODAL_ENVIRONMENT"}
        env["MODAL_TOKEN_ID"] = self._settings.modal_token_id
        env["MODAL_TOKEN_SECRET"] = self._settings.modal_token_secret
        return env

    async def start(self) -> None:
        """Resolves the URL through Modal's API when only a token is configured.

        Raises:
            ConfigError: The lookup failed; the message says what to set or check.
        """
        if not self._settings.modal_web_url:
            try:
                # Looked up through the module so tests can replace it.
                resolved = await modal_status.resolve_endpoint_async(self._modal_env())
            except Exception as exc:
                raise ConfigError(
                    f"Modal endpoint lookup failed: {exc}. To fix: set MODAL_WEB_URL to the URL "
                    "`modal deploy modal_vllm/deployment.py` printed (`python -m modal_vllm status` checks it)"
                ) from exc
            if resolved is None:
                raise ConfigError(
                    "Modal is configured without an endpoint: set MODAL_WEB_URL, or MODAL_TOKEN_ID and "
                    "MODAL_TOKEN_SECRET to look it up"
                )
            self.endpoint = resolved.url.rstrip("/")
            log.info("resolved the Modal endpoint through the modal SDK: %s", self.endpoint)
        await super().start()
        if self.validate_on_start == "probe":
            log.warning("MODAL_VALIDATE_ON_START=probe: the startup check wakes a scaled-to-zero Modal GPU")

    async def check_health(self, timeout_s: float) -> HealthReport:
        """Health without waking: Modal's container count first (with a token), then a probe
        only when a container runs. The first call, the router's startup check, follows
        ``MODAL_VALIDATE_ON_START`` instead."""
        if self._startup_check_pending:
            self._startup_check_pending = False
            if self.validate_on_start == "off":
                return HealthReport(
                    False,
                    0.0,
                    error="not checked at startup (MODAL_VALIDATE_ON_START=off): cold until traffic or a wake-up",
                    reachable=False,
                )
            if self.validate_on_start == "probe":
                return await self.wake(timeout_s)
        if not self._has_tokens:
            return await self.wake(timeout_s)
        started = time.perf_counter()
        try:
            stats = await read_stats_async(self._modal_env(), source=self._stats_source, timeout_s=timeout_s)
        except ModalApiError as exc:
            # Falling back to a probe could start a GPU nobody asked for: report, and let a
            # wake-up (which the router starts only for real traffic) send the request.
            return HealthReport(
                False,
                time.perf_counter() - started,
                error=f"container count unknown, not probed (a probe would wake it): {exc}",
                reachable=False,
            )
        if stats.running_containers == 0:
            backlog = f", {stats.backlog} queued" if stats.backlog else ""
            return HealthReport(
                False,
                time.perf_counter() - started,
                error=f"{COLD_REASON}{backlog}: Modal has scaled it to zero; the next request starts one",
                reachable=False,
            )
        return await self.wake(timeout_s)

    async def wake(self, timeout_s: float) -> HealthReport:
        """Probes ``/health`` and ``/v1/models``: the request that starts a scaled-to-zero container.

        Used for wake-ups, and for health checks once a container is known to run (a probe then
        only resets its idle timer). Also checks that MODAL_MODEL is among the served models.
        """
        if self._probe_tls is None:
            self._probe_tls = httpx.create_ssl_context()
        async with httpx.AsyncClient(verify=self._probe_tls) as client:
            status = await probe_endpoint(
                self.endpoint,
                self.default_model,
                headers=dict(self.config.headers),
                client=client,
                timeout_s=timeout_s,
            )
        return _report(status)


def _report(status: EndpointStatus) -> HealthReport:
    # Any answer below 500 means a replica (or Modal's auth proxy) is up: waiting will not help.
    reachable = status.http_status is not None and status.http_status < 500
    return HealthReport(
        ok=status.ok,
        latency_s=status.probe_latency_s,
        served_models=list(status.served_models),
        error="" if status.ok else status.message,
        reachable=reachable,
    )
