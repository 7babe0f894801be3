"""OTLP over HTTP (``http/protobuf``): span and metric exporters on httpx.

The project's dependencies hold the OTLP encoders (``opentelemetry-exporter-otlp-proto-common``,
which the gRPC exporter also uses) and httpx, but not ``opentelemetry-exporter-otlp-proto-http``
(which would bring ``requests``). These two classes are the rest: encode a batch with the
official encoder, POST it as ``application/x-protobuf``, retry what the OTLP specification calls
retryable (429, 502, 503, 504, connection errors) with backoff inside the export timeout.

They read the standard variables, a signal's own first (``OTEL_EXPORTER_OTLP_TRACES_*``,
``..._METRICS_*``), then the general one:

* ``ENDPOINT``: the signal's is the full URL; the general one gets ``/v1/traces`` or
  ``/v1/metrics`` appended; default ``http://localhost:4318``;
* ``HEADERS`` (``k=v,k2=v2``, URL-encoded values), ``TIMEOUT`` (seconds, as the Python SDK reads
  it; default 10), ``COMPRESSION`` (``gzip`` or ``none``), ``CERTIFICATE`` (a CA file for https),
  ``CLIENT_CERTIFICATE`` / ``CLIENT_KEY`` (mutual TLS).

Export failures are logged without the headers (they carry credentials).
"""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import OTLPMetricExporterMixin
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.util.re import parse_env_headers

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://localhost:4318"
_RETRYABLE = frozenset({429, 502, 503, 504})


def _setting(env: Mapping[str, str], signal: str, name: str) -> str:
    return (env.get(f"OTEL_EXPORTER_OTLP_{signal}_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}") or "").strip()


def header_values(env: Mapping[str, str]) -> list[str]:
    """Every OTLP header value configured (they are credentials, for redaction)."""
    values: list[str] = []
    for var in (
        "OTEL_EXPORTER_OTLP_HEADERS",
        *(f"OTEL_EXPORTER_OTLP_{s}_HEADERS" for s in ("TRACES", "METRICS", "LOGS")),
    ):
        raw = env.get(var, "")
        for value in parse_env_headers(raw, liberal=True).values() if raw else ():
            values.append(value)
            token = value.split()[-1] if value.strip() else ""
            if token != value and len(token) >= 8:
                values.append(token)  # "Bearer <token>": the token may be logged without its scheme
        for item in raw.split(","):
            values.append(item.partition("=")[2].strip())  # as written, still URL-encoded
    return [v for v in values if v]


class _Poster:
    """One signal's HTTP destination and the POST with retries."""

    def __init__(self, env: Mapping[str, str], signal: str, path: str) -> None:
        own = (env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or "").strip()
        base = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip() or DEFAULT_ENDPOINT
        self.url = own or f"{base.rstrip('/')}/{path}"
        self.timeout_s = float(_setting(env, signal, "TIMEOUT") or 10)
        self.gzip = _setting(env, signal, "COMPRESSION").lower() == "gzip"
        self.headers = {
            **parse_env_headers(_setting(env, signal, "HEADERS"), liberal=True),
            "content-type": "application/x-protobuf",
            **({"content-encoding": "gzip"} if self.gzip else {}),
        }
        ca = _setting(env, signal, "CERTIFICATE")
        cert, key = _setting(env, signal, "CLIENT_CERTIFICATE"), _setting(env, signal, "CLIENT_KEY")
        self._client = httpx.Client(
            timeout=self.timeout_s,
            verify=ca or True,
            cert=(cert, key) if cert and key else None,
            trust_env=False,  # a collector is reached directly, never through the upstreams' proxy
        )
        self._shutdown = False

    def post(self, body: bytes) -> bool:
        """Sends one batch; True when the collector took it."""
        if self._shutdown:
            return False
        data = gzip.compress(body) if self.gzip else body
        deadline = time.monotonic() + self.timeout_s
        delay = 0.5
        while True:
            try:
                response = self._client.post(self.url, content=data, headers=self.headers)
            except httpx.HTTPError as exc:
                problem, retry = f"{type(exc).__name__}", True
            else:
                if response.is_success:
                    return True
                problem, retry = f"HTTP {response.status_code}", response.status_code in _RETRYABLE
            if not retry or time.monotonic() + delay > deadline or self._shutdown:
                log.warning("OTLP export to %s failed: %s", self.url, problem)
                return False
            time.sleep(delay)
            delay *= 2

    def close(self) -> None:
        self._shutdown = True
        self._client.close()


class HttpSpanExporter(SpanExporter):
    """OTLP/HTTP protobuf span exporter."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._poster = _Poster(env, "TRACES", "v1/traces")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Encodes and sends one batch."""
        ok = self._poster.post(encode_spans(spans).SerializeToString())
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        """Closes the HTTP client."""
        self._poster.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Nothing is buffered here."""
        return True


class HttpMetricExporter(MetricExporter, OTLPMetricExporterMixin):
    """OTLP/HTTP protobuf metric exporter (temporality as OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._common_configuration(None, None)
        self._poster = _Poster(env, "METRICS", "v1/metrics")

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        """Encodes and sends one collection."""
        ok = self._poster.post(encode_metrics(metrics_data).SerializeToString())
        return MetricExportResult.SUCCESS if ok else MetricExportResult.FAILURE

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Nothing is buffered here."""
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Closes the HTTP client."""
        self._poster.close()
