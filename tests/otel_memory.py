"""One in-memory OpenTelemetry SDK per test process (tracer and meter providers can be set once).

Test modules that read spans or metrics call :func:`install` from a fixture; every figure is
read as a difference between two :func:`snapshot` calls, so tests sharing the providers never
see each other's counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.observe import metrics as gateway_metrics

_exporter: InMemorySpanExporter | None = None
_reader: InMemoryMetricReader | None = None


def install_metrics() -> InMemoryMetricReader | None:
    """The process's in-memory metric reader (None when something else installed a MeterProvider).

    Metrics alone keep the rest of the session cheap: aggregates are bounded, spans would pile up."""
    global _reader
    if _reader is None:
        reader = InMemoryMetricReader()
        meter_provider = MeterProvider(metric_readers=[reader])
        metrics.set_meter_provider(meter_provider)
        gateway_metrics.reset()
        if metrics.get_meter_provider() is not meter_provider:
            return None
        _reader = reader
    return _reader


def install() -> tuple[InMemorySpanExporter, InMemoryMetricReader] | None:
    """The process's in-memory span exporter and metric reader (None when something else
    installed an SDK)."""
    global _exporter
    reader = install_metrics()
    if _exporter is None:
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        if trace.get_tracer_provider() is not tracer_provider:
            return None
        _exporter = exporter
    return None if reader is None else (_exporter, reader)


@dataclass(frozen=True)
class Point:
    """One data point: its value (sum or gauge value; a histogram's sum), count and unit."""

    value: float
    count: int
    unit: str


Key = tuple[str, frozenset[tuple[str, Any]]]


def snapshot(reader: InMemoryMetricReader) -> dict[Key, Point]:
    """Every data point now, by (metric name, attributes)."""
    out: dict[Key, Point] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    count = int(getattr(p, "count", 0))
                    value = float(p.sum if hasattr(p, "sum") else p.value)
                    out[(m.name, frozenset(dict(p.attributes or {}).items()))] = Point(value, count, m.unit)
    return out


def delta(before: dict[Key, Point], after: dict[Key, Point], name: str, **attrs: Any) -> Point:
    """What changed for ``name`` with exactly ``attrs`` (value and count differences)."""
    key = (name, frozenset(attrs.items()))
    b, a = before.get(key), after.get(key)
    if a is None:
        return Point(0.0, 0, "")
    return Point(a.value - (b.value if b else 0.0), a.count - (b.count if b else 0), a.unit)


def series(snap: dict[Key, Point], name: str) -> list[dict[str, Any]]:
    """The attribute sets of ``name``'s series."""
    return [dict(attrs) for n, attrs in snap if n == name]


def unit(snap: dict[Key, Point], name: str) -> str:
    """The unit ``name`` is reported in."""
    return next(p.unit for (n, _), p in snap.items() if n == name)
