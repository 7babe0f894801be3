"""OpenTelemetry setup from the standard ``OTEL_*`` variables.

* Traces: ``OTEL_TRACES_EXPORTER``, a comma list of ``otlp``, ``console``, ``none``; when unset,
  ``otlp`` if ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set, else nothing is
  exported (and no SDK is installed, so spans cost almost nothing).
* Metrics: ``OTEL_METRICS_EXPORTER`` likewise, with ``prometheus`` too. The Prometheus scrape
  endpoint is an HTTP server of its own on ``METRICS_ADDRESS`` (default ``127.0.0.1:9464``), on
  when that is set, when ``METRICS_PORT`` is set (then on 127.0.0.1), or when the exporter list
  names ``prometheus``. It never follows the gRPC bind: a gRPC server on 0.0.0.0 does not expose
  metrics on every interface, and a ``unix:`` gRPC address needs no host for it.
* OTLP protocol: ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or per signal, ``..._TRACES_PROTOCOL``,
  ``..._METRICS_PROTOCOL``) = ``grpc`` (default; port 4317) or ``http/protobuf`` (port 4318).
  The exporters read their own endpoint, header, timeout and TLS variables.
* ``OTEL_EXPORTER_OTLP_HEADERS`` (and per signal) values are credentials: registered for redaction.
* Resource: ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` (read by the SDK), default
  service name ``inference-gateway``.
* Propagation: the SDK default (W3C tracecontext + baggage), ``OTEL_PROPAGATORS`` to change it;
  the caller's baggage goes upstream only with FORWARD_BAGGAGE=true (see ``interceptors``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace

from service.config import Settings
from service.errors import ConfigError
from service.guard.redaction import register_secrets
from service.observe import metrics as gateway_metrics
from service.observe.otlp_http import HttpMetricExporter, HttpSpanExporter, header_values

log = logging.getLogger(__name__)

DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"
_TRACE_EXPORTERS = ("otlp", "console", "none")
_METRIC_EXPORTERS = ("otlp", "console", "prometheus", "none")
_PROTOCOLS = ("grpc", "http/protobuf")


@dataclass
class TelemetryHandles:
    """What was installed, so it can be flushed and shut down."""

    tracer_provider: Any = None
    meter_provider: Any = None
    metrics_address: str = ""
    metrics_port: int = 0
    exporters: list[str] = field(default_factory=list)
    _http_server: Any = None

    def shutdown(self) -> None:
        """Flushes and stops exporters (spans of the last calls are not lost on SIGTERM)."""
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:  # exporting must never block shutdown
                    log.exception("telemetry shutdown failed")
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()


def _choices(env: Mapping[str, str], var: str, known: tuple[str, ...], endpoint_vars: tuple[str, ...]) -> list[str]:
    value = env.get(var, "").strip().lower()
    if not value:
        return ["otlp"] if any(env.get(v) for v in endpoint_vars) else []
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        raise ConfigError(f"{var}={value}: {', '.join(unknown)} not supported; use a comma list of {', '.join(known)}")
    return [v for v in dict.fromkeys(chosen) if v != "none"]


def _protocol(env: Mapping[str, str], signal: str) -> str:
    var = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    if not env.get(var, "").strip():
        var = "OTEL_EXPORTER_OTLP_PROTOCOL"
    value = env.get(var, "").strip().lower() or "grpc"
    if value not in _PROTOCOLS:
        raise ConfigError(f"{var}={value}: not supported; use grpc or http/protobuf")
    return value


def metrics_address(settings: Settings, metric_exporters: list[str]) -> str:
    """Where the Prometheus endpoint listens ("" when off)."""
    if settings.metrics_address:
        return settings.metrics_address
    if settings.metrics_port:
        return f"127.0.0.1:{settings.metrics_port}"
    return DEFAULT_METRICS_ADDRESS if "prometheus" in metric_exporters else ""


def setup_telemetry(settings: Settings, env: Mapping[str, str] | None = None) -> TelemetryHandles:
    """Installs tracer and meter providers as the environment asks; returns handles.

    Raises:
        ConfigError: an exporter or protocol that is not supported, or a metrics address that
            cannot be bound.
    """
    env = os.environ if env is None else env
    register_secrets(header_values(env))  # before anything could log them
    handles = TelemetryHandles()
    traces = _choices(
        env,
        "OTEL_TRACES_EXPORTER",
        _TRACE_EXPORTERS,
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    )
    metric_exporters = _choices(
        env,
        "OTEL_METRICS_EXPORTER",
        _METRIC_EXPORTERS,
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
    )
    scrape = metrics_address(settings, metric_exporters)
    trace_protocol = _protocol(env, "TRACES") if "otlp" in traces else ""
    metric_protocol = _protocol(env, "METRICS") if "otlp" in metric_exporters else ""
    if not traces and not metric_exporters and not scrape:
        return handles

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create({} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "inference-gateway"})

    if traces:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        tracer_provider = TracerProvider(resource=resource)
        for name in traces:
            exporter: SpanExporter
            if name == "console":
                exporter = ConsoleSpanExporter()
            elif trace_protocol == "http/protobuf":
                exporter = HttpSpanExporter(env)
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
            handles.exporters.append(f"traces:{name}{'/' + trace_protocol if name == 'otlp' else ''}")
        trace.set_tracer_provider(tracer_provider)
        handles.tracer_provider = tracer_provider

    readers: list[Any] = []
    for name in metric_exporters:
        if name == "prometheus":
            continue  # below, with the scrape endpoint
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            MetricExporter,
            PeriodicExportingMetricReader,
        )

        metric_exporter: MetricExporter
        if name == "console":
            metric_exporter = ConsoleMetricExporter()
        elif metric_protocol == "http/protobuf":
            metric_exporter = HttpMetricExporter(env)
        else:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            metric_exporter = OTLPMetricExporter()
        readers.append(PeriodicExportingMetricReader(metric_exporter))
        handles.exporters.append(f"metrics:{name}{'/' + metric_protocol if name == 'otlp' else ''}")
    if scrape:
        readers.append(_prometheus(scrape, handles))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        gateway_metrics.reset()
        handles.meter_provider = meter_provider
    log.info("telemetry: %s", ", ".join(handles.exporters) or "off")
    return handles


def _prometheus(address: str, handles: TelemetryHandles) -> Any:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        server, _thread = start_http_server(int(port), addr=host)
    except OSError as exc:
        raise ConfigError(f"METRICS_ADDRESS={address} cannot be bound: {exc.strerror or exc}") from None
    handles._http_server = server
    handles.metrics_port = int(server.server_port)
    handles.metrics_address = f"{host}:{handles.metrics_port}"
    handles.exporters.append(f"prometheus:{handles.metrics_address}")
    return PrometheusMetricReader()
