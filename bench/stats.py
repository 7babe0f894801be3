"""Per-request samples and their summaries (percentiles, throughput, errors).

A worker fills one :class:`Samples`; the parent merges the workers' samples and summarises them.
Samples are ``array('d')`` of seconds so that shipping 10^5-10^6 of them between processes stays
cheap.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_ERROR_SAMPLES = 5


@dataclass(slots=True)
class Samples:
    """What one worker observed inside the measurement window.

    Attributes:
        latency: Whole-request latency (unary) or time to the end of the stream, seconds.
        ttft: Time to the first non-empty text chunk (streams only), seconds.
        gaps: Time between two consecutive text chunks of one stream, seconds.
        completed: Requests that finished successfully inside the window (throughput).
        chunks: Text chunks (messages with text) received inside the window (streamed throughput).
        tokens: Completion tokens (from the final usage) of streams completed inside the window.
        started: Requests started inside the window.
        completed_all: Requests that finished successfully at any time (warm-up and drain included).
        errors_all: Requests that failed at any time (warm-up and drain included).
        errors: Failed requests by kind (gRPC status code name, HTTP status, exception type).
        error_latency: How long each failed request took to fail, seconds.
        error_samples: The first few error messages, for diagnosis.
        max_in_flight: Most requests this worker had open at once.
        cpu_s: CPU time the worker used over the whole run.
    """

    latency: array[float] = field(default_factory=lambda: array("d"))
    ttft: array[float] = field(default_factory=lambda: array("d"))
    gaps: array[float] = field(default_factory=lambda: array("d"))
    completed: int = 0
    chunks: int = 0
    tokens: int = 0
    started: int = 0
    completed_all: int = 0
    errors_all: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_latency: array[float] = field(default_factory=lambda: array("d"))
    error_samples: list[str] = field(default_factory=list)
    max_in_flight: int = 0
    cpu_s: float = 0.0

    def error(self, kind: str, message: str, after_s: float | None = None) -> None:
        """Counts one failed request (that failed ``after_s`` after it started)."""
        self.errors[kind] += 1
        if after_s is not None:
            self.error_latency.append(after_s)
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{kind}: {message[:300]}")

    def merge(self, other: Samples) -> None:
        """Adds another worker's samples to these."""
        self.latency.extend(other.latency)
        self.ttft.extend(other.ttft)
        self.gaps.extend(other.gaps)
        self.completed += other.completed
        self.chunks += other.chunks
        self.tokens += other.tokens
        self.started += other.started
        self.completed_all += other.completed_all
        self.errors_all += other.errors_all
        self.errors.update(other.errors)
        self.error_latency.extend(other.error_latency)
        for s in other.error_samples:
            if len(self.error_samples) < MAX_ERROR_SAMPLES:
                self.error_samples.append(s)
        self.max_in_flight += other.max_in_flight
        self.cpu_s += other.cpu_s


def percentiles_ms(values: array[float] | list[float]) -> dict[str, float] | None:
    """p50/p90/p99/max/mean in milliseconds (nearest-rank), or None without samples."""
    n = len(values)
    if n == 0:
        return None
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] * 1000.0

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1] * 1000.0,
        "mean": sum(ordered) / n * 1000.0,
        "n": float(n),
    }


def summarise(samples: Samples, duration_s: float) -> dict[str, Any]:
    """The JSON-able summary of one load run."""
    errors = sum(samples.errors.values())
    return {
        "requests": len(samples.latency),
        "started": samples.started,
        "completed_in_window": samples.completed,
        "duration_s": duration_s,
        "throughput_rps": samples.completed / duration_s if duration_s > 0 else 0.0,
        "chunks_per_s": samples.chunks / duration_s if duration_s > 0 else 0.0,
        "tokens_per_s": samples.tokens / duration_s if duration_s > 0 else 0.0,
        "errors": errors,
        "errors_all": samples.errors_all,
        "completed_all": samples.completed_all,
        "error_kinds": dict(samples.errors),
        "error_samples": list(samples.error_samples),
        "error_after_ms": percentiles_ms(samples.error_latency),
        "latency_ms": percentiles_ms(samples.latency),
        "ttft_ms": percentiles_ms(samples.ttft),
        "gap_ms": percentiles_ms(samples.gaps),
        "max_in_flight": samples.max_in_flight,
        "client_cpu_s": samples.cpu_s,
    }
