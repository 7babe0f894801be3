"""Builds and runs the gRPC server: InferenceService, grpc.health.v1, reflection, graceful stop,
and reloads of keys, tenant policy and TLS files (SIGHUP, or a changed file). With ``REDIS_URL``,
tenant limits, circuits and Modal warmth are shared with the other workers and replicas
(:mod:`service.shared`); with ``WORKERS`` > 1 this process is one of several on the same port."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from inference.v1 import inference_pb2, inference_pb2_grpc

from service.api.servicer import InferenceServicer
from service.config import Settings
from service.guard.limits import LimitStore
from service.guard.security import ReloadResult, Security
from service.guard.watch import FileWatcher
from service.observe import metrics
from service.observe.interceptors import TelemetryInterceptor
from service.providers.base import Provider
from service.providers.registry import build_chain, plan_chain
from service.routing.router import Router
from service.shared.client import SharedRedis
from service.shared.health import RedisHealth
from service.shared.limits import RedisLimits
from service.spend import Spend

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
# The grpc.health.v1 name for liveness probes (the name Kubernetes' probe docs suggest). It is
# SERVING from start to graceful shutdown whatever the providers do: answering at all shows the
# process and its event loop are alive, and a restart cannot bring an upstream back. Readiness is
# "" and SERVICE_NAME, which follow the providers (_publish_health).
LIVENESS_SERVICE = "liveness"


class CatalogueScope:
    """What a model name means here, for tenant model restrictions: the router's catalogue."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def aliases(self, model: str) -> frozenset[str]:
        """``model``, plus a catalogue name's model ids, or the catalogue names routing to an id."""
        names = {model}
        for entry in self._router.catalogue.entries.values():
            ids = {m for _, m in entry.routes}
            if entry.name == model:
                names |= ids
            elif model in ids:
                names.add(entry.name)
        return frozenset(names)

    def defaults(self, providers: frozenset[str] | None) -> frozenset[str]:
        """The catalogue's default name, else each allowed provider's default model."""
        catalogue = self._router.catalogue
        if catalogue.from_file and catalogue.default:
            return frozenset((catalogue.default,))
        return frozenset(
            s.provider.default_model for s in self._router.slots if providers is None or s.name in providers
        )

    def configured(self) -> set[str]:
        """Every model name configuration knows (the metrics' model label values)."""
        names = {s.provider.default_model for s in self._router.slots}
        for entry in self._router.catalogue.entries.values():
            names.add(entry.name)
            names.update(m for _, m in entry.routes)
        return names


class Gateway:
    """One running service: router, gRPC server, health reporting. Used by ``serve`` and tests."""

    def __init__(
        self,
        settings: Settings,
        providers: Sequence[Provider] | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.settings = settings
        if providers is None:
            for name, why in plan_chain(settings):
                log.info("provider %s: %s", name, why)
            providers = build_chain(settings)
        self.router = Router(providers, settings)
        # The usage ledger, the cost model and the budgets (docs/cost.md); opened with the server.
        self.spend = Spend.from_settings(settings)
        self.router.spend = self.spend
        metrics.watch_ledger(lambda: self.spend.ledger.state().dropped)
        self.health = HealthServicer()
        self.scope = CatalogueScope(self.router)
        limits: LimitStore | None = None
        self.redis: SharedRedis | None = None
        self.shared_health: RedisHealth | None = None
        if settings.redis_url:  # shared with the other workers and replicas (service.shared)
            self.redis = SharedRedis(settings.redis_url, settings.redis_key_prefix)
            limits = RedisLimits(self.redis)
            self.shared_health = RedisHealth(self.redis)
            self.shared_health.attach(self.router.slots)
        self.security = Security(settings, self.scope, limits)
        self._interceptors = list(interceptors)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._watcher: FileWatcher | None = None
        self._unwatch_circuits: Callable[[], None] | None = None

    def in_flight(self) -> int:
        """Calls being served now (kept by the admission interceptor)."""
        return self.security.in_flight

    async def _publish_health(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.router.serving()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def _bind(self, server: grpc.aio.Server) -> int:
        credentials = self.security.server_credentials()
        if credentials is not None:
            return int(server.add_secure_port(self.settings.grpc_listen_address, credentials))
        return int(server.add_insecure_port(self.settings.grpc_listen_address))

    def _label_values(self) -> None:
        metrics.configure_labels(self.scope.configured(), self.security.tenant_names())

    def reload(self, trigger: str, parts: set[str] | None = None) -> ReloadResult:
        """Reloads keys, TENANTS_FILE and TLS files (``parts`` of them, None for all; each on its
        own, a broken one stays as it was)."""
        result = self.security.reload(trigger, parts)
        for part in result.failed:
            metrics.record_reload_failure(part)
        if result.changed:
            self._label_values()
        return result

    def _files_changed(self, paths: list[str]) -> None:
        parts = self.security.watched_files()
        self.reload(f"changed: {', '.join(paths)}", {parts[p] for p in paths if p in parts})

    async def start(self) -> int:
        """Starts providers and the server; returns the bound port (1 for a unix socket)."""
        self.security.check_bind()
        self._label_values()
        self._unwatch_circuits = metrics.watch_circuits(
            lambda: [(s.name, s.breaker.state.value) for s in self.router.slots]
        )
        self.router.monitor.on_change = self._publish_health
        self.router.on_change = self._publish_health
        await self.spend.open()  # migrations; an unreachable database only degrades the ledger
        await self.router.start()
        if self.shared_health is not None:
            self.shared_health.start()
        pending = max(4096, 4 * self.settings.max_concurrent_requests)
        options = [
            ("grpc.max_receive_message_length", self.settings.max_request_bytes),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            *(
                # Behind an L4 balancer (a Kubernetes Service) HTTP/2 keeps each client on one
                # replica for good; a GOAWAY after this age makes clients reconnect and spread out.
                [
                    ("grpc.max_connection_age_ms", int(self.settings.grpc_max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(self.settings.grpc_max_connection_age_grace_s * 1000)),
                ]
                if self.settings.grpc_max_connection_age_s > 0
                else []
            ),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            # gRPC core cancels calls at random (status CANCELLED, never reaching a handler) once
            # more than max_pending_requests (default 1,000) arrive faster than the loop accepts
            # them. Admission control is the overload policy here (RESOURCE_EXHAUSTED + RetryInfo),
            # so core must let every call through to it.
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
            # Several workers share the port only when asked (WORKERS > 1); otherwise a second
            # gateway on a port already in use fails to start instead of silently taking half
            # the connections (gRPC core's default is to allow it).
            ("grpc.so_reuseport", 1 if self.settings.workers > 1 else 0),
        ]
        # Telemetry outermost: rejected calls (auth, admission) get spans and access-log lines too.
        interceptors = [
            TelemetryInterceptor(self.settings.log_content, self.settings.forward_baggage),
            *self.security.interceptors(),
            *self._interceptors,
        ]
        server = grpc.aio.server(options=options, interceptors=interceptors)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.router, self.settings, self.in_flight), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        # Set once; enter_graceful_shutdown (stop) turns it NOT_SERVING with the others.
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        self.port = self._bind(server)
        if self.port == 0:
            raise OSError(f"could not bind GRPC_LISTEN_ADDRESS={self.settings.grpc_listen_address}")
        await server.start()
        self.server = server
        await self._publish_health()
        address = self.settings.grpc_listen_address
        log.info(
            "serving %s on %s%s", SERVICE_NAME, address, "" if address.startswith("unix") else f" (port {self.port})"
        )
        self._watcher = FileWatcher(
            list(self.security.watched_files()), self.settings.config_reload_interval_s, self._files_changed
        )
        self._watcher.start()
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING first, for every health name including liveness (load balancers stop
        sending), then drain, then close providers."""
        await self.health.enter_graceful_shutdown()
        if self._watcher is not None:
            await self._watcher.stop()
        if self._unwatch_circuits is not None:
            self._unwatch_circuits()
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace_s if grace_s is None else grace_s)
        await self.router.aclose()
        await self.spend.close()  # idle GPU tails booked, every queued record written
        if self.shared_health is not None:
            await self.shared_health.stop()
        if self.redis is not None:
            await self.redis.aclose()

    async def wait(self) -> None:
        """Blocks until the server stops."""
        if self.server is not None:
            await self.server.wait_for_termination()


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then drains for SHUTDOWN_GRACE_S and returns."""
    from service.observe.otel_setup import setup_telemetry

    telemetry = setup_telemetry(settings)
    gateway = Gateway(settings)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload, "SIGHUP")
    await stop.wait()
    log.info("shutting down: draining for up to %.1f s", settings.shutdown_grace_s)
    await gateway.stop()
    telemetry.shutdown()
    log.info("stopped")
