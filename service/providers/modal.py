"""Modal's vLLM: the OpenAI-compatible provider plus what Modal adds.

How it differs from plain OpenAI/vLLM:

* It scales to zero. A cold replica takes 10-30 s (longer on the first model download); any
  request, ``/health`` included, starts one and resets its idle timer. The router treats it as
  ``scale_to_zero`` (warmth, wake-ups, probes only while warm).
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

from service.config import Settings
from service.errors import ConfigError
from service.providers.base import HealthReport
from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider

log = logging.getLogger(__name__)


def modal_headers(settings: Settings) -> dict[str, str]:
    """Proxy-auth and vLLM API-key headers (secret values; never logged)."""
    headers: dict[str, str] = {}
    if settings.modal_proxy_token_id and settings.modal_proxy_token_secret:
        headers["Modal-Key"] = settings.modal_proxy_token_id
        headers["Modal-Secret"] = settings.modal_proxy_token_secret
    if settings.modal_vllm_api_key:
        headers["authorization"] = f"Bearer {settings.modal_vllm_api_key}"
    return headers


class ModalProvider(OpenAICompatProvider):
    """vLLM on Modal."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
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

    async def start(self) -> None:
        """Resolves the URL through the modal SDK when only a token is configured."""
        if not self._settings.modal_web_url:
            from modal_vllm.status import resolve_endpoint_async

            env = dict(os.environ)
            env.update(
                {
                    "MODAL_TOKEN_ID": self._settings.modal_token_id,
                    "MODAL_TOKEN_SECRET": self._settings.modal_token_secret,
                }
            )
            try:
                resolved = await resolve_endpoint_async(env)
            except Exception as exc:
                raise ConfigError(f"could not look up the Modal endpoint: {exc}; set MODAL_WEB_URL") from exc
            if resolved is None:
                raise ConfigError("MODAL_WEB_URL is unset and the Modal lookup found nothing")
            self.endpoint = resolved.url.rstrip("/")
            log.info("resolved the Modal endpoint through the modal SDK: %s", self.endpoint)
        await super().start()

    async def check_health(self, timeout_s: float) -> HealthReport:
        """The operator's status probe (``python -m modal_vllm status``), reused: /health,
        /v1/models, and whether MODAL_MODEL is among the served models."""
        from modal_vllm.status import probe_endpoint

        status = await probe_endpoint(
            self.endpoint,
            self.default_model,
            headers=dict(self.config.headers),
            timeout_s=timeout_s,
        )
        # Any answer below 500 means a replica (or Modal's auth proxy) is up: waiting will not help.
        reachable = status.http_status is not None and status.http_status < 500
        return HealthReport(
            ok=status.ok,
            latency_s=status.probe_latency_s,
            served_models=list(status.served_models),
            error="" if status.ok else status.message,
            reachable=reachable,
        )
