"""Metric instruments (OpenTelemetry API; a no-op until a MeterProvider is installed).

Names follow the GenAI semantic conventions where one exists; the gateway's own figures use the
``gateway.`` prefix. Instruments are created lazily so that the MeterProvider installed at startup
(after this module is imported) is the one they report to.

Label cardinality is bounded: every attribute value comes from configuration or a fixed set.
A caller's model name becomes ``gen_ai.request.model`` only when it is a configured model (a
catalogue name or a provider's model id), else ``other``; a tenant label is a configured tenant,
else ``other``. A caller sending random model names therefore creates no new series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.metrics import _internal as _otel_metrics_state
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

from service.providers.base import Usage

_DURATION_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536]
OTHER = "other"
CIRCUIT_STATES = ("closed", "open", "half_open")

_models: frozenset[str] = frozenset()
_tenants: frozenset[str] = frozenset()
# Sources of (provider, circuit state) pairs, one per running gateway; read at each collection.
_circuit_sources: list[Callable[[], Iterable[tuple[str, str]]]] = []


_ledger_dropped: Callable[[], int] | None = None


def _observe_ledger_dropped(options: CallbackOptions) -> Iterable[Observation]:
    source = _ledger_dropped
    return [] if source is None else [Observation(source())]


def watch_ledger(dropped: Callable[[], int]) -> None:
    """Reports ``dropped()`` (records the ledger's bound dropped since start) as gateway.ledger.dropped."""
    global _ledger_dropped
    _ledger_dropped = dropped


def record_cost(provider: str, tenant: str, usd: float) -> None:
    """A call's estimated cost (gateway.cost, bounded tenant label)."""
    if usd <= 0 or not enabled():
        return
    instruments().cost.add(usd, {"gen_ai.provider.name": provider, "gateway.tenant": tenant_label(tenant)})


def _observe_circuits(options: CallbackOptions) -> Iterable[Observation]:
    for source in list(_circuit_sources):
        for provider, state in source():
            for candidate in CIRCUIT_STATES:
                yield Observation(
                    1 if candidate == state else 0, {"gateway.provider": provider, "gateway.circuit.state": candidate}
                )


class _Instruments:
    def __init__(self) -> None:
        meter = metrics.get_meter("inference-gateway")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens used per attempt, as the upstream reported them (none when it did not)",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Provider attempt duration",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_S,
        )
        self.ttft = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to first chunk",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_S,
        )
        self.overhead = meter.create_histogram(
            "gateway.overhead.duration",
            unit="s",
            description="Time of an RPC spent on the gateway's own work (not upstream, not waiting)",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_S,
        )
        self.wait = meter.create_histogram(
            "gateway.wait.duration",
            unit="s",
            description="Time of an RPC spent waiting on purpose: backoff, Retry-After, cold start, a slot, the caller",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_S,
        )
        self.attempts = meter.create_counter(
            "gateway.provider.attempts", unit="{attempt}", description="Provider attempts by outcome"
        )
        self.skips = meter.create_counter(
            "gateway.provider.skips", unit="{skip}", description="Providers skipped by reason"
        )
        self.fallbacks = meter.create_counter(
            "gateway.fallbacks", unit="{fallback}", description="Changes of provider within a call (not retries)"
        )
        self.circuit = meter.create_observable_gauge(
            "gateway.provider.circuit_state",
            callbacks=[_observe_circuits],
            unit="{state}",
            description="1 for each provider's current circuit state (closed, open, half_open), 0 for the others",
        )
        self.active_streams = meter.create_up_down_counter(
            "gateway.active_streams", unit="{stream}", description="ChatStream calls in progress"
        )
        self.rpcs = meter.create_counter(
            "gateway.rpc.calls", unit="{call}", description="RPCs by method, status code and tenant"
        )
        self.reload_failures = meter.create_counter(
            "gateway.config.reload_failures",
            unit="{failure}",
            description="Reloads of keys, tenant policy or TLS files refused (the previous version stays)",
        )
        self.cost = meter.create_counter(
            "gateway.cost", unit="USD", description="Estimated cost of calls by provider and tenant (docs/cost.md)"
        )
        self.ledger_dropped = meter.create_observable_counter(
            "gateway.ledger.dropped",
            callbacks=[_observe_ledger_dropped],
            unit="{record}",
            description="Usage records dropped because the ledger's queue was full",
        )


_instruments: _Instruments | None = None


def instruments() -> _Instruments:
    """The instruments, created on first use."""
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


_sdk_installed = False


def _installed_provider() -> object:
    """The globally installed MeterProvider, or None. Read from the API's module state: the public
    ``get_meter_provider()`` consults ``os.environ`` on every call until one is installed, which
    cost ~1 us per recording site per RPC (several per call) on a gateway without metrics."""
    try:
        return _otel_metrics_state._METER_PROVIDER
    except AttributeError:  # a future API without the module global: the public, slower way
        return metrics.get_meter_provider()


def enabled() -> bool:
    """Whether an SDK MeterProvider is installed; without one, recording is skipped entirely
    (building attribute dicts for no-op instruments costs the hot path for nothing).

    Once seen, the answer is kept: OpenTelemetry installs the global provider once per process.
    """
    global _sdk_installed
    if not _sdk_installed:
        _sdk_installed = isinstance(_installed_provider(), SdkMeterProvider)
    return _sdk_installed


def reset() -> None:
    """Forgets the instruments (after a new MeterProvider is installed, e.g. in tests)."""
    global _instruments
    _instruments = None


def configure_labels(models: Iterable[str], tenants: Iterable[str]) -> None:
    """The model and tenant label values that may appear; anything else is ``other``."""
    global _models, _tenants
    _models = frozenset(m for m in models if m)
    _tenants = frozenset(t for t in tenants if t)


def model_label(model: str) -> str:
    """``model`` when configured, else ``other``."""
    return model if model in _models else OTHER


def tenant_label(tenant: str) -> str:
    """``tenant`` when configured, else ``other``."""
    return tenant if tenant in _tenants else OTHER


def watch_circuits(source: Callable[[], Iterable[tuple[str, str]]]) -> Callable[[], None]:
    """Reports ``source``'s (provider, state) pairs as the circuit-state gauge from now on (the
    instruments are created here, so every state is visible from startup); returns the undo."""
    _circuit_sources.append(source)
    if enabled():
        instruments()

    def unwatch() -> None:
        if source in _circuit_sources:
            _circuit_sources.remove(source)

    return unwatch


def record_attempt(
    provider: str, system: str, model: str, duration_s: float, error_type: str | None, usage: Usage | None
) -> None:
    """One provider attempt ended; ``usage`` only when the upstream reported it."""
    if not enabled():
        return
    ins = instruments()
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": system,
        "gateway.provider": provider,
        "gen_ai.request.model": model_label(model),
    }
    if error_type:
        attrs["error.type"] = error_type
    ins.duration.record(duration_s, attrs)
    ins.attempts.add(
        1,
        {
            "gateway.provider": provider,
            "gen_ai.provider.name": system,
            "outcome": "error" if error_type else "ok",
            **({"error.type": error_type} if error_type else {}),
        },
    )
    if usage is not None:
        ins.token_usage.record(usage.prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        ins.token_usage.record(usage.completion_tokens, {**attrs, "gen_ai.token.type": "output"})


def record_ttft(provider: str, system: str, model: str, seconds: float) -> None:
    """Time to first chunk of an attempt."""
    if not enabled():
        return
    instruments().ttft.record(
        seconds,
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": system,
            "gateway.provider": provider,
            "gen_ai.request.model": model_label(model),
        },
    )


def record_skip(provider: str, reason: str) -> None:
    """A provider was skipped."""
    if not enabled():
        return
    instruments().skips.add(1, {"gateway.provider": provider, "reason": reason})


def record_fallback(left: str, to: str) -> None:
    """A call left provider ``left`` for ``to``."""
    if not enabled():
        return
    instruments().fallbacks.add(1, {"gateway.provider": left, "gateway.fallback.to": to})


def record_rpc(method: str, code: int, tenant: str, overhead_s: float | None, wait_s: float) -> None:
    """One RPC ended with status ``code``; ``overhead_s`` is its own work (None: not recorded),
    ``wait_s`` its deliberate waits."""
    if not enabled():
        return
    ins = instruments()
    ins.rpcs.add(1, {"rpc.method": method, "rpc.grpc.status_code": code, "gateway.tenant": tenant_label(tenant)})
    if overhead_s is not None:
        ins.overhead.record(overhead_s, {"rpc.method": method})
    if wait_s > 0:
        ins.wait.record(wait_s, {"rpc.method": method})


def record_reload_failure(part: str) -> None:
    """A reload of ``part`` (keys, tenants, tls) was refused."""
    if not enabled():
        return
    instruments().reload_failures.add(1, {"gateway.config.part": part})


def stream_started() -> None:
    """A ChatStream began."""
    if not enabled():
        return
    instruments().active_streams.add(1)


def stream_ended() -> None:
    """A ChatStream ended."""
    if not enabled():
        return
    instruments().active_streams.add(-1)
