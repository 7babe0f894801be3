"""Authentication, TLS, admission control and rate limits, as one gRPC server interceptor.

Contract with :mod:`service.server`:

* ``Security(settings)`` is built once per Gateway (it loads the keys: ConfigError when malformed).
* ``check_bind()`` raises :class:`ConfigError` when the bind is unsafe.
* ``server_credentials()`` returns TLS credentials, or None for plaintext.
* ``interceptors()`` returns the server interceptors, outermost first.
* ``in_flight`` counts calls being served now.

What each method needs (when keys are configured; with none, every call is tenant ``anonymous``)::

    InferenceService/Chat, ChatStream   tenant key; then rate limits, then a concurrency slot
    InferenceService/Health, ListModels tenant or admin key
    InferenceService/GetProviderStatus  admin key (a tenant key gets PERMISSION_DENIED)
    grpc.health.v1, reflection          open when AUTH_EXEMPT_HEALTH (default), else any key

Chat and ChatStream handlers are wrapped once and the wrappers cached, so a call costs one dict
lookup at dispatch plus, with auth off and no rate limits, a counter increment and decrement.
Other methods are never wrapped: their key check happens at dispatch, and open ones pass through.
The checks run in the order that wastes least: who is calling, can the request even be parsed,
is the tenant within its limits, is there a free slot.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, NoReturn

import grpc
from inference.v1 import inference_pb2

from service.api.status import to_grpc_status
from service.config import Settings
from service.errors import ConfigError, InvalidRequestError, ResourceExhaustedError
from service.guard.admission import ConcurrencyLimiter, RateLimiter
from service.guard.auth import ANONYMOUS, Authenticator, KeyRing, Principal
from service.guard.redaction import register_secrets

log = logging.getLogger(__name__)

current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("current_tenant", default=ANONYMOUS)
"""The tenant of the call being served, for logs and telemetry. grpc.aio serves each call in its
own task, so a value set for one call never leaks into another and needs no reset."""

_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
CHAT = f"/{_SERVICE}/Chat"
CHAT_STREAM = f"/{_SERVICE}/ChatStream"
ADMIN_METHODS = frozenset({f"/{_SERVICE}/GetProviderStatus"})
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.")


class _Undecodable:
    """What the request deserializer returns for bytes that are not the expected message."""


UNDECODABLE = _Undecodable()


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # it raises; this keeps the type checker honest


def is_loopback(address: str) -> bool:
    """Whether a gRPC listen address is reachable only from this host (loopback or a unix socket)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name may resolve to anything; "" and "0.0.0.0" mean every interface


def _read_pem(var: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}={path} cannot be read: {exc.strerror or type(exc).__name__}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{var}={path} is not a PEM file (no '-----BEGIN' line)")
    return data


def _max_tokens(request: Any, default: int, cap: int) -> int:
    value = request.max_tokens if request.HasField("max_tokens") else default
    return value if 1 <= value <= cap else cap  # out of range fails validation later; reserve the cap meanwhile


def _stream_usage(last: Any, reserved: int) -> int:
    if last is None:
        return 0  # nothing was sent: the call cost no tokens
    if last.HasField("final"):
        return int(last.final.usage.total_tokens)
    return reserved  # a partial answer without usage (cancelled, interrupted): charge what it reserved


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wraps a request deserializer so bad bytes become INVALID_ARGUMENT instead of grpc's UNKNOWN."""
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, or anything else the parser raises: the caller's bytes
            return UNDECODABLE

    return decode


class Security:
    """Keys, TLS material, limits, and the interceptor that applies them.

    Building one registers every secret it knows (the environment's and the key file's) with
    :func:`service.guard.redaction.register_secrets`, so log records are redacted from then on.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        for name in ("admission_wait_s", "rate_limit_rpm", "rate_limit_tpm"):
            if getattr(settings, name) < 0:
                raise ConfigError(f"{name.upper()} must not be negative, got {getattr(settings, name)}")
        self.keys = KeyRing.from_settings(settings)
        self.slots = ConcurrencyLimiter(settings.max_concurrent_requests, settings.admission_wait_s)
        self.limits = (
            RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
            if settings.rate_limit_rpm or settings.rate_limit_tpm
            else None
        )
        self.auth = Authenticator(self.keys)
        register_secrets(self.secrets())
        self.undecodable = to_grpc_status(
            InvalidRequestError(
                "the request could not be parsed as the method's request message (corrupt protobuf wire format, "
                "or a string field that is not UTF-8)"
            )
        )

    @property
    def in_flight(self) -> int:
        """Chat and ChatStream calls holding a concurrency slot now."""
        return self.slots.in_flight

    def secrets(self) -> list[str]:
        """Every secret value, including tokens from INFERENCE_API_KEYS_FILE."""
        return sorted({*self.settings.secrets(), *self.keys.secrets()})

    def check_bind(self) -> None:
        """Refuses a non-loopback bind without keys unless ALLOW_INSECURE_BIND; logs the auth state.

        Also reads the TLS files once, so that a bad path fails startup before any provider starts.

        Raises:
            ConfigError: the address is reachable from other hosts and nothing guards it, or a TLS
                file is unreadable.
        """
        if self.settings.tls_cert_file:
            self._tls_files()  # fail before the providers start, not at bind time after they did
        address = self.settings.grpc_listen_address
        local = is_loopback(address)
        if not self.keys.enabled:
            if not local and not self.settings.allow_insecure_bind:
                raise ConfigError(
                    f"GRPC_LISTEN_ADDRESS={address} is not a loopback address and no API keys are configured: "
                    "set INFERENCE_API_KEYS (or INFERENCE_API_KEYS_FILE), or ALLOW_INSECURE_BIND=true to serve "
                    "anyone who can reach it"
                )
            log.warning(
                "authentication is off (no INFERENCE_API_KEYS, INFERENCE_API_KEYS_FILE or ADMIN_API_KEYS): every "
                "caller is tenant %r and GetProviderStatus is open; listening on %s",
                ANONYMOUS,
                address,
            )
            return
        log.info(
            "authentication on: tenants %s, admins %s",
            self.keys.tenant_names or "none",
            self.keys.admin_names or "none",
        )
        if not self.keys.tenant_names:
            log.warning("only ADMIN_API_KEYS are configured: Chat and ChatStream are refused to every caller")
        if not local and not self.settings.tls_cert_file:
            log.warning(
                "listening on %s without TLS: API keys cross the network in clear text unless a proxy in front "
                "terminates TLS; set TLS_CERT_FILE and TLS_KEY_FILE",
                address,
            )

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from TLS_CERT_FILE/TLS_KEY_FILE; mutual TLS with TLS_CLIENT_CA_FILE.

        Raises:
            ConfigError: a file is unreadable or not PEM.
        """
        s = self.settings
        if not s.tls_cert_file:
            return None
        cert, key, client_ca = self._tls_files()
        log.info("TLS on%s", " with client certificates required (mutual TLS)" if client_ca else "")
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca)
        )

    def _tls_files(self) -> tuple[bytes, bytes, bytes | None]:
        s = self.settings
        cert = _read_pem("TLS_CERT_FILE", s.tls_cert_file)
        key = _read_pem("TLS_KEY_FILE", s.tls_key_file)
        client_ca = _read_pem("TLS_CLIENT_CA_FILE", s.tls_client_ca_file) if s.tls_client_ca_file else None
        return cert, key, client_ca

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The one interceptor doing authentication and admission."""
        return [SecurityInterceptor(self)]


def _deny(handler: grpc.RpcMethodHandler, status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts with ``status``."""

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort_with_status(status)

    if handler.unary_unary:
        make = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        make = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        make = grpc.stream_unary_rpc_method_handler
    else:
        make = grpc.stream_stream_rpc_method_handler
    return make(
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class SecurityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped here
    """Authentication and admission for every call; see the module docstring for the policy."""

    def __init__(self, security: Security) -> None:
        self._security = security
        self._auth = security.keys.enabled
        # method -> (handler from the continuation, handler to serve): built once per method.
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Serves the cached wrapper or pass-through; everything else goes through :meth:`_route`."""
        handler = await continuation(details)
        cached = self._cache.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        return self._route(handler, details)

    def _route(self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails) -> Any:
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        method: str = details.method
        if method == CHAT:
            served = self._wrap_chat(handler)
        elif method == CHAT_STREAM:
            served = self._wrap_chat_stream(handler)
        elif not self._auth or (self._security.settings.auth_exempt_health and method.startswith(EXEMPT_PREFIXES)):
            served = handler
        else:
            # Checked per call at dispatch, never cached: the answer depends on the caller's metadata.
            auth = self._security.auth
            verdict = auth.check(details.invocation_metadata, auth.admin if method in ADMIN_METHODS else auth.any)
            return handler if isinstance(verdict, Principal) else _deny(handler, verdict)
        # Only registered methods get here (the handler is not None), so the cache stays small.
        self._cache[method] = (handler, served)
        return served

    def _wrap_chat(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        admit = self._admission()
        limits = self._security.limits
        slots = self._security.slots
        plain = not self._auth and limits is None

        async def chat(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if plain and request is not UNDECODABLE and slots.try_acquire():
                tenant, reserved = ANONYMOUS, 0  # the common case without a second coroutine
            else:
                tenant, reserved = await admit(request, context)
            used = 0  # a failed unary call delivered nothing: its reservation is refunded
            try:
                response = await inner(request, context)
                if limits is not None:
                    used = response.usage.total_tokens
            finally:
                slots.release()
                if limits is not None:
                    limits.settle(tenant, reserved, used)
            return response

        return grpc.unary_unary_rpc_method_handler(
            chat,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_chat_stream(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_stream
        admit = self._admission()
        limits = self._security.limits
        slots = self._security.slots
        plain = not self._auth and limits is None

        async def chat_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if plain and request is not UNDECODABLE and slots.try_acquire():
                tenant, reserved = ANONYMOUS, 0
            else:
                tenant, reserved = await admit(request, context)
            last = None
            try:
                # aclosing: when the caller goes away grpc closes this generator, and the servicer's
                # stream (and through it the upstream request) must be closed with it, not left to GC.
                async with aclosing(inner(request, context)) as responses:
                    async for last in responses:
                        yield last
            finally:
                slots.release()  # a stream holds its slot until it ends, fails or is cancelled
                if limits is not None:
                    limits.settle(tenant, reserved, _stream_usage(last, reserved))

        return grpc.unary_stream_rpc_method_handler(
            chat_stream,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _admission(self) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[tuple[str, int]]]:
        """The checks before a chat call; on success the caller holds a slot it must release."""
        security = self._security
        auth = self._auth
        policy = security.auth.tenant
        check = security.auth.check
        limits = security.limits
        slots = security.slots
        undecodable = security.undecodable
        default_max, cap = security.settings.default_max_tokens, security.settings.max_tokens_cap

        async def admit(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, int]:
            tenant = ANONYMOUS
            if auth:
                verdict = check(context.invocation_metadata(), policy)
                if not isinstance(verdict, Principal):
                    await _abort(context, verdict)
                tenant = verdict.name
                current_tenant.set(tenant)
            if request is UNDECODABLE:
                await _abort(context, undecodable)
            reserved = 0
            if limits is not None:
                reserved = limits.reservation(_max_tokens(request, default_max, cap))
                refusal = limits.admit(tenant, reserved)
                if refusal is not None:
                    await _abort(context, to_grpc_status(refusal))
            if not slots.try_acquire():
                try:
                    await slots.acquire(context.time_remaining())
                except BaseException as exc:  # refused, or cancelled while queued: the call never ran
                    if limits is not None:
                        limits.refund(tenant, reserved)
                    if isinstance(exc, ResourceExhaustedError):
                        await _abort(context, to_grpc_status(exc))
                    raise
            return tenant, reserved

        return admit
