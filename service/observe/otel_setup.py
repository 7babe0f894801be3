"""OpenTelemetry setup from the standard ``OTEL_*`` variables.

* Traces: ``OTEL_TRACES_EXPORTER`` = ``otlp`` | ``console`` | ``none``; when unset, ``otlp`` if
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, else nothing is exported
  (and no SDK is installed, so spans cost almost nothing).
* Metrics: ``OTEL_METRICS_EXPORTER`` likewise (``otlp`` | ``console`` | ``none``), plus a
  Prometheus scrape endpoint on ``METRICS_PORT`` (host of GRPC_LISTEN_ADDRESS) when set.
* Resource: ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (read by the SDK), default
  service name ``inference-gateway``.
* Propagation: the SDK default (W3C tracecontext + baggage), ``OTEL_PROPAGATORS`` to change it.

The OTLP exporters read their own variables (endpoint, headers, protocol, timeouts); only the
gRPC flavour is installed (``opentelemetry-exporter-otlp-proto-grpc``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace

from service.config import Settings
from service.observe import metrics as gateway_metrics

log = logging.getLogger(__name__)


@dataclass
class TelemetryHandles:
    """What was installed, so it can be flushed and shut down."""

    tracer_provider: Any = None
    meter_provider: Any = None
    metrics_port: int = 0
    exporters: list[str] = field(default_factory=list)

    def shutdown(self) -> None:
        """Flushes and stops exporters (spans of the last calls are not lost on SIGTERM)."""
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:  # exporting must never block shutdown
                    log.exception("telemetry shutdown failed")


def _choice(env: Mapping[str, str], var: str, endpoint_vars: tuple[str, ...]) -> str:
    value = env.get(var, "").strip().lower()
    if value:
        return value
    return "otlp" if any(env.get(v) for v in endpoint_vars) else "none"


def setup_telemetry(settings: Settings, env: Mapping[str, str] | None = None) -> TelemetryHandles:
    """Installs tracer and meter providers as the environment asks; returns handles."""
    env = os.environ if env is None else env
    handles = TelemetryHandles()
    traces = _choice(env, "OTEL_TRACES_EXPORTER", ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    metric_exp = _choice(
        env, "OTEL_METRICS_EXPORTER", ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )
    if traces == "none" and metric_exp == "none" and not settings.metrics_port:
        return handles

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create({} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "inference-gateway"})

    if traces != "none":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        exporter: SpanExporter
        if traces == "console":
            exporter = ConsoleSpanExporter()
        elif traces == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={traces!r} is not supported; use otlp, console or none")
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        handles.tracer_provider = tracer_provider
        handles.exporters.append(f"traces:{traces}")

    readers: list[Any] = []
    if metric_exp != "none":
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            MetricExporter,
            PeriodicExportingMetricReader,
        )

        metric_exporter: MetricExporter
        if metric_exp == "console":
            metric_exporter = ConsoleMetricExporter()
        elif metric_exp == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            metric_exporter = OTLPMetricExporter()
        else:
            raise ValueError(f"OTEL_METRICS_EXPORTER={metric_exp!r} is not supported; use otlp, console or none")
        readers.append(PeriodicExportingMetricReader(metric_exporter))
        handles.exporters.append(f"metrics:{metric_exp}")
    if settings.metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host = settings.grpc_listen_address.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
        start_http_server(settings.metrics_port, addr=host)
        readers.append(PrometheusMetricReader())
        handles.metrics_port = settings.metrics_port
        handles.exporters.append(f"prometheus:{host}:{settings.metrics_port}")
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        gateway_metrics.reset()
        handles.meter_provider = meter_provider
    log.info("telemetry: %s", ", ".join(handles.exporters) or "off")
    return handles
