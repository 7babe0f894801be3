"""Metric instruments (OpenTelemetry API; a no-op until a MeterProvider is installed).

Names follow the GenAI semantic conventions where one exists; the gateway's own figures use the
``gateway.`` prefix. Instruments are created lazily so that the MeterProvider installed at startup
(after this module is imported) is the one they report to.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

from service.providers.base import Usage

_DURATION_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536]


class _Instruments:
    def __init__(self) -> None:
        meter = metrics.get_meter("inference-gateway")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens used per attempt",
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
            description="Time of an RPC not spent waiting on an upstream",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS_S,
        )
        self.attempts = meter.create_counter(
            "gateway.provider.attempts", unit="{attempt}", description="Provider attempts by outcome"
        )
        self.skips = meter.create_counter(
            "gateway.provider.skips", unit="{skip}", description="Providers skipped by reason"
        )
        self.circuit = meter.create_up_down_counter(
            "gateway.provider.circuit_open", unit="{circuit}", description="1 while a provider's circuit is open"
        )
        self.active_streams = meter.create_up_down_counter(
            "gateway.active_streams", unit="{stream}", description="ChatStream calls in progress"
        )
        self.rpcs = meter.create_counter(
            "gateway.rpc.calls", unit="{call}", description="RPCs by method and status code"
        )


_instruments: _Instruments | None = None


def instruments() -> _Instruments:
    """The instruments, created on first use."""
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


def enabled() -> bool:
    """Whether an SDK MeterProvider is installed; without one, recording is skipped entirely
    (building attribute dicts for no-op instruments costs the hot path for nothing)."""
    return isinstance(metrics.get_meter_provider(), SdkMeterProvider)


def reset() -> None:
    """Forgets the instruments (after a new MeterProvider is installed, e.g. in tests)."""
    global _instruments
    _instruments = None


def record_attempt(provider: str, model: str, duration_s: float, error_type: str | None, usage: Usage | None) -> None:
    """One provider attempt ended."""
    if not enabled():
        return
    ins = instruments()
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gateway.provider": provider,
        "gen_ai.request.model": model,
    }
    if error_type:
        attrs["error.type"] = error_type
    ins.duration.record(duration_s, attrs)
    ins.attempts.add(
        1,
        {
            "gateway.provider": provider,
            "outcome": "error" if error_type else "ok",
            **({"error.type": error_type} if error_type else {}),
        },
    )
    if usage is not None:
        ins.token_usage.record(usage.prompt_tokens, {**attrs, "gen_ai.token.type": "input"})
        ins.token_usage.record(usage.completion_tokens, {**attrs, "gen_ai.token.type": "output"})


def record_ttft(provider: str, model: str, seconds: float) -> None:
    """Time to first chunk of a streamed attempt."""
    if not enabled():
        return
    instruments().ttft.record(
        seconds, {"gen_ai.operation.name": "chat", "gateway.provider": provider, "gen_ai.request.model": model}
    )


def record_skip(provider: str, reason: str) -> None:
    """A provider was skipped."""
    if not enabled():
        return
    instruments().skips.add(1, {"gateway.provider": provider, "reason": reason})


_open_circuits: set[str] = set()


def record_circuit(provider: str, state: str) -> None:
    """Tracks open circuits as a 0/1 gauge per provider."""
    if not enabled():
        return
    ins = instruments()
    if state == "open" and provider not in _open_circuits:
        _open_circuits.add(provider)
        ins.circuit.add(1, {"gateway.provider": provider})
    elif state == "closed" and provider in _open_circuits:
        _open_circuits.discard(provider)
        ins.circuit.add(-1, {"gateway.provider": provider})


def record_rpc(method: str, code: str, overhead_s: float | None) -> None:
    """One RPC ended with ``code``; ``overhead_s`` is its time not spent upstream."""
    if not enabled():
        return
    ins = instruments()
    ins.rpcs.add(1, {"rpc.method": method, "rpc.grpc.status_code": code})
    if overhead_s is not None:
        ins.overhead.record(overhead_s, {"rpc.method": method})


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
