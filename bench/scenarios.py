"""The benchmark's scenarios and targets, in one place with their durations and sizes.

A scenario is a load shape; it runs against each *target*: ``direct`` (the fake upstream over
HTTP: the baseline), ``gateway`` (this service over gRPC) and ``litellm`` (the LiteLLM proxy over
HTTP). "Added" figures are the target's figure minus the direct baseline's for the same scenario.
"""

from __future__ import annotations

from dataclasses import dataclass

FAST_MODEL = "bench-model"
PACED_MODEL = "bench-model-paced"  # one token per PACED_DELAY_MS, first token included
PACED_DELAY_MS = 100.0
# A stream paced like a fast engine (one token every 2 ms): each token arrives in its own read, so
# the gap between chunks measures the gateway's per-token relay cost (an instant upstream's tokens
# arrive together and are relayed as one delta).
GAP_MODEL = "bench-model-gap"
GAP_DELAY_MS = 2.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """One load shape.

    Attributes:
        key: Stable id used in the JSON (``c1_unary``).
        title: Human-readable name for tables.
        rpc: ``unary`` or ``stream``.
        concurrency: Closed-loop callers (ignored when ``rate`` is set).
        rate: Open-loop requests/s (0 = closed loop).
        max_tokens: Completion length.
        paced: Use the slow upstream model (one token per 100 ms) instead of the instant one.
        warmup_s: Load before measuring (connections, pools, JIT-less warm caches).
        duration_s: Measured seconds.
        workers: Load-generator processes.
        channels: gRPC channels per worker.
        timeout_s: Per-request deadline.
    """

    key: str
    title: str
    rpc: str
    concurrency: int = 1
    rate: float = 0.0
    max_tokens: int = 16
    paced: bool = False
    warmup_s: float = 1.0
    duration_s: float = 4.0
    workers: int = 1
    channels: int = 1
    timeout_s: float = 30.0
    upstream_model: str = ""

    @property
    def model(self) -> str:
        """The upstream model this scenario asks for."""
        return self.upstream_model or (PACED_MODEL if self.paced else FAST_MODEL)


FULL = [
    Scenario("c1_unary", "c=1 unary, 16 tokens", "unary", 1, max_tokens=16),
    Scenario("c1_stream", "c=1 stream, 64 tokens", "stream", 1, max_tokens=64),
    Scenario(
        "c1_stream_paced", "c=1 stream, 64 tokens, 1 token / 2 ms", "stream", 1, max_tokens=64, upstream_model=GAP_MODEL
    ),
    Scenario("c64_unary", "c=64 unary, 16 tokens", "unary", 64, max_tokens=16, workers=2, channels=2),
    Scenario("c256_unary", "c=256 unary, 16 tokens", "unary", 256, max_tokens=16, workers=2, channels=4),
    Scenario("c64_stream", "c=64 stream, 64 tokens", "stream", 64, max_tokens=64, workers=2, channels=2),
    # Every token in its own upstream read and its own gRPC message: the per-message relay capacity.
    Scenario(
        "c256_stream_paced",
        "c=256 stream, 64 tokens, 1 token / 2 ms",
        "stream",
        256,
        max_tokens=64,
        upstream_model=GAP_MODEL,
        workers=2,
        channels=4,
    ),
    Scenario(
        "open150_unary",
        "open loop 150 req/s (Poisson) unary",
        "unary",
        rate=150.0,
        max_tokens=16,
        workers=1,
        channels=2,
    ),
    Scenario(
        "streams_2000",
        "2,000 concurrent slow streams (1 token / 100 ms, 40 tokens)",
        "stream",
        2000,
        max_tokens=40,
        paced=True,
        warmup_s=2.0,
        duration_s=6.0,
        workers=2,
        channels=8,
        timeout_s=60.0,
    ),
]

QUICK = [
    Scenario("c1_unary", "c=1 unary, 16 tokens", "unary", 1, max_tokens=16, warmup_s=0.2, duration_s=0.6),
    Scenario("c1_stream", "c=1 stream, 64 tokens", "stream", 1, max_tokens=64, warmup_s=0.2, duration_s=0.6),
    Scenario("c16_unary", "c=16 unary, 16 tokens", "unary", 16, max_tokens=16, warmup_s=0.2, duration_s=0.6),
    Scenario("c16_stream", "c=16 stream, 64 tokens", "stream", 16, max_tokens=64, warmup_s=0.2, duration_s=0.6),
    Scenario(
        "streams_200",
        "200 concurrent slow streams (1 token / 100 ms, 5 tokens)",
        "stream",
        200,
        max_tokens=5,
        paced=True,
        warmup_s=0.3,
        duration_s=1.0,
        channels=2,
    ),
]

# The fallback measurements: c=1 unary through a gateway whose first provider refuses connections.
FALLBACK_SCENARIO = Scenario("c1_unary", "c=1 unary, 16 tokens", "unary", 1, max_tokens=16, duration_s=3.0)


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    """One fallback configuration.

    Attributes:
        key: Stable id in the JSON.
        title: What it shows.
        layout: ``plain`` - the usual single-provider gateway (the reference).
            ``modal_dead`` - PROVIDER_ORDER=modal,vastai with MODAL_WEB_URL on a closed port (Modal
            is COLD from its failed startup probe).
            ``vastai_dies`` - PROVIDER_ORDER=vastai,modal where vastai's upstream passes the startup
            probe and is then stopped, so the gateway still believes it healthy and really attempts
            it (Modal serves, from the fake upstream).
        env: Extra gateway environment.
        measure: Run the load (False: only the probe call, for configurations that wait seconds).
        probe_timeout_s: Deadline of the probe call.
    """

    key: str
    title: str
    layout: str
    env: dict[str, str]
    measure: bool = True
    probe_timeout_s: float = 10.0


# Modal must be healthy from the start to be the fallback: without a Modal token the startup check is
# off and Modal stays cold (skipped) until a wake-up; probe asks the fake upstream's /health instead.
_KEEP_IN_CHAIN = {
    "CIRCUIT_FAILURE_THRESHOLD": "1000000000",
    "HEALTH_CHECK_INTERVAL_S": "3600",
    "MODAL_VALIDATE_ON_START": "probe",
}
FALLBACK_CONFIGS = [
    FallbackConfig(
        "fallback_reference",
        "reference: plain gateway, one healthy provider (measured in the same stage, for the differences)",
        "plain",
        {},
    ),
    FallbackConfig(
        "fallback_steady",
        "steady state: dead Modal first, skipped as COLD (PROVIDER_ORDER=modal,vastai, default "
        "COLD_START_POLICY=fallback)",
        "modal_dead",
        {"COLD_START_POLICY": "fallback"},
    ),
    FallbackConfig(
        "fallback_failed_attempt",
        "failed attempt + fallback on every call: first provider refuses connections, no retry "
        "(PROVIDER_ORDER=vastai,modal, RETRY_MAX_RETRIES=0, circuit never opens)",
        "vastai_dies",
        {"RETRY_MAX_RETRIES": "0", **_KEEP_IN_CHAIN},
    ),
    FallbackConfig(
        "fallback_failed_attempt_retry",
        "as above with the default RETRY_MAX_RETRIES=1 (one retry after a 0-200 ms backoff); what "
        "the first CIRCUIT_FAILURE_THRESHOLD (5) calls pay before the circuit opens",
        "vastai_dies",
        dict(_KEEP_IN_CHAIN),
    ),
    FallbackConfig(
        "fallback_wait_policy",
        "dead Modal under COLD_START_POLICY=wait: the call waits for the wake-up (half its deadline when "
        "a fallback is left), then falls back; probe call only, 4 s deadline",
        "modal_dead",
        {"COLD_START_POLICY": "wait"},
        measure=False,
        probe_timeout_s=4.0,
    ),
]

# WORKERS=1 against WORKERS=2 (and the floor with 1 and 2 processes), nothing pinned: the kernel
# spreads connections over the processes (SO_REUSEPORT hashes each new connection), so the load
# opens many (2 load workers x 8 channels = 16 connections) to keep the split even.
WORKERS_SCENARIO = Scenario(
    "workers_unary", "c=128 unary, 16 tokens, 16 connections", "unary", 128, max_tokens=16, workers=2, channels=8
)
WORKERS_SCENARIO_QUICK = Scenario(
    "workers_unary",
    "c=16 unary, 16 tokens, 8 connections",
    "unary",
    16,
    max_tokens=16,
    workers=2,
    channels=4,
    warmup_s=0.2,
    duration_s=0.6,
)
