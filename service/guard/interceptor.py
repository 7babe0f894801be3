"""The security interceptor: who is calling, what its policy allows, and whether it may start now.

Chat and ChatStream handlers are wrapped once and the wrappers cached, so a call costs one dict
lookup at dispatch plus, with auth off and an open anonymous policy, a counter increment and
decrement. Other methods are never wrapped (admin RPCs get an audit line): their key check happens
at dispatch, and open ones pass through. The checks run in the order that wastes least:

1. the key (UNAUTHENTICATED; an admin key on Chat is PERMISSION_DENIED);
2. whether the request parses at all (INVALID_ARGUMENT);
3. the tenant's model restriction (PERMISSION_DENIED naming the model and the tenant);
4. the tenant's limits (RESOURCE_EXHAUSTED with RetryInfo and a QuotaFailure naming
   ``tenant:<name>`` and the limit): one request, a token reservation, an open-call slot;
5. a process-wide slot (MAX_CONCURRENT_REQUESTS, waiting up to ADMISSION_WAIT_S).

The tenant's provider restriction is applied by the router (the servicer passes
:func:`service.guard.policy.allowed_providers`). When the call ends its token reservation is
settled with what it consumed (:func:`service.guard.tokens.charge`), whatever way it ended.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from inference.v1 import inference_pb2

from service.api.status import to_grpc_status, to_rpc_status
from service.errors import PermissionDeniedError, ResourceExhaustedError
from service.guard.audit import audit
from service.guard.auth import ANONYMOUS, Policy, Principal
from service.guard.limits import Grant, Refusal
from service.guard.policy import TenantPolicy, current_policy, model_denial
from service.guard.security import Security, current_tenant
from service.guard.tokens import charge, estimate_prompt_tokens, reservation
from service.observe.telemetry import RpcStats, current_rpc

_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
CHAT = f"/{_SERVICE}/Chat"
CHAT_STREAM = f"/{_SERVICE}/ChatStream"
ADMIN_METHODS = frozenset({f"/{_SERVICE}/GetProviderStatus"})
# Admin keys see every tenant's usage; a tenant key its own (the servicer reads current_principal).
USAGE_METHOD = f"/{_SERVICE}/GetUsage"
# Who is calling a method that answers differently per caller; None with authentication off.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("current_principal", default=None)
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.")


class _Undecodable:
    """What the request deserializer returns for bytes that are not the expected message."""


UNDECODABLE = _Undecodable()


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # it raises; this keeps the type checker honest


def _max_tokens(request: Any, default: int, cap: int) -> int:
    value = request.max_tokens if request.HasField("max_tokens") else default
    return value if 1 <= value <= cap else cap  # out of range fails validation later; reserve the cap meanwhile


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


def quota_status(error: ResourceExhaustedError, subject: str, limit: str, description: str) -> grpc.Status:
    """``error``'s status with a google.rpc.QuotaFailure naming ``subject`` and ``limit``."""
    status = to_rpc_status(error)
    violation = error_details_pb2.QuotaFailure.Violation(subject=subject, description=description, quota_id=limit)
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.QuotaFailure(violations=[violation]))
    status.details.append(packed)
    return rpc_status.to_status(status)


def _refusal_status(policy: TenantPolicy, refusal: Refusal, reserved: int, prompt: int) -> grpc.Status:
    tenant, wait = policy.tenant, refusal.retry_after_s
    if refusal.limit == "rpm":
        what = f"rpm: {policy.rpm} requests per minute, {policy.burst} at once"
        message = f"tenant {tenant!r} is over its request rate ({what}); retry in {wait:.2f} s"
        reason = "RATE_LIMIT_RPM"
    elif refusal.limit == "tpm":
        what = f"tpm: {policy.tpm} tokens per minute"
        message = (
            f"tenant {tenant!r} is over its token rate ({what}); this call reserves {reserved} tokens (its prompt, "
            f"about {prompt}, plus max_tokens); retry in {wait:.2f} s"
        )
        reason = "RATE_LIMIT_TPM"
    else:
        what = f"max_concurrent: {policy.max_concurrent} open calls"
        message = f"tenant {tenant!r} has {policy.max_concurrent} calls open, its max_concurrent; retry when one ends"
        reason = "TENANT_CONCURRENCY_LIMIT"
    error = ResourceExhaustedError(message, wait, reason=reason)
    return quota_status(error, f"tenant:{tenant}", refusal.limit, f"tenant:{tenant} {what}")


def _auth_failure(policy: Policy, verdict: grpc.Status) -> tuple[str, str]:
    """(audit event, reason) of a refused check."""
    if verdict is policy.denied:
        return "permission", "wrong_role"
    reason = "missing" if verdict is policy.missing else "malformed" if verdict is policy.malformed else "invalid"
    return "authentication", reason


def _deny(
    handler: grpc.RpcMethodHandler, status: grpc.Status, method: str, failure: tuple[str, str]
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only audits and aborts with ``status``."""
    event, reason = failure

    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        audit(event, "refused", peer=context.peer(), method=method, reason=reason)
        await context.abort_with_status(status)

    return _same_shape(handler, deny)


def _same_shape(handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        make = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        make = grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        make = grpc.stream_unary_rpc_method_handler
    else:
        make = grpc.stream_stream_rpc_method_handler
    return make(
        behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


def _as_principal(handler: grpc.RpcMethodHandler, method: str, who: Principal) -> grpc.RpcMethodHandler:
    """A unary handler that runs with ``current_principal`` set to the caller, audited."""

    async def served(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        audit("usage_call", "allowed", peer=context.peer(), tenant=who.name, method=method)
        token = current_principal.set(who)
        try:
            return await handler.unary_unary(request, context)
        finally:
            current_principal.reset(token)

    return _same_shape(handler, served)


def _audited_admin(handler: grpc.RpcMethodHandler, method: str, who: str) -> grpc.RpcMethodHandler:
    """An admin handler (unary) that writes its audit line, then serves."""
    inner = handler.unary_unary
    if inner is None:
        return handler

    async def admin(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        audit("admin_call", "allowed", peer=context.peer(), tenant=who, method=method)
        return await inner(request, context)

    return _same_shape(handler, admin)


@dataclass(slots=True)
class _Ticket:
    """An admitted call's reservation, settled when the call ends."""

    grant: Grant
    prompt: int
    stats: RpcStats


class SecurityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped here
    """Authentication, policy and admission for every call; see the module docstring."""

    def __init__(self, security: Security) -> None:
        self._security = security
        # Fixed for the life of the process: a reload may change keys, never whether there are any.
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
        security = self._security
        if method == CHAT:
            served = self._wrap_chat(handler)
        elif method == CHAT_STREAM:
            served = self._wrap_chat_stream(handler)
        elif not self._auth:
            return _audited_admin(handler, method, ANONYMOUS) if method in ADMIN_METHODS else handler
        elif security.settings.auth_exempt_health and method.startswith(EXEMPT_PREFIXES):
            served = handler
        else:
            # Checked per call at dispatch, never cached: the answer depends on the caller's metadata.
            auth = security.auth
            policy = auth.admin if method in ADMIN_METHODS else auth.any
            verdict = auth.check(details.invocation_metadata, policy)
            if not isinstance(verdict, Principal):
                return _deny(handler, verdict, method, _auth_failure(policy, verdict))
            if method == USAGE_METHOD:
                return _as_principal(handler, method, verdict)
            return _audited_admin(handler, method, verdict.name) if method in ADMIN_METHODS else handler
        # Only registered methods get here (the handler is not None), so the cache stays small.
        self._cache[method] = (handler, served)
        return served

    def _wrap_chat(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        admit = self._admission(CHAT)
        security = self._security
        slots = security.slots
        limits = security.limits

        async def chat(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if security.plain and request is not UNDECODABLE and slots.try_acquire():
                try:  # the common case without a second coroutine
                    return await inner(request, context)
                finally:
                    slots.release()
            ticket = await admit(request, context)
            try:
                return await inner(request, context)
            finally:
                slots.release()
                if ticket is not None:
                    await limits.settle(ticket.grant, charge(ticket.stats, ticket.grant.tokens, ticket.prompt))

        return grpc.unary_unary_rpc_method_handler(
            chat,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_chat_stream(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_stream
        admit = self._admission(CHAT_STREAM)
        security = self._security
        slots = security.slots
        limits = security.limits

        async def chat_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            ticket = None
            if not (security.plain and request is not UNDECODABLE and slots.try_acquire()):
                ticket = await admit(request, context)
            try:
                # aclosing: when the caller goes away grpc closes this generator, and the servicer's
                # stream (and through it the upstream request) must be closed with it, not left to GC.
                async with aclosing(inner(request, context)) as responses:
                    async for message in responses:
                        yield message
            finally:
                slots.release()  # a stream holds its slot until it ends, fails or is cancelled
                if ticket is not None:
                    await limits.settle(ticket.grant, charge(ticket.stats, ticket.grant.tokens, ticket.prompt))

        return grpc.unary_stream_rpc_method_handler(
            chat_stream,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _admission(self, method: str) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Ticket | None]]:
        """The checks before a chat call; on success the caller holds a slot it must release, and
        settles the ticket (if any) when the call ends."""
        security = self._security
        auth = self._auth
        slots = security.slots
        undecodable = security.undecodable
        default_max, cap = security.settings.default_max_tokens, security.settings.max_tokens_cap

        async def admit(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> _Ticket | None:
            tenant = ANONYMOUS
            if auth:
                authenticator = security.auth  # read per call: a reload may replace it
                verdict = authenticator.check(context.invocation_metadata(), authenticator.tenant)
                if not isinstance(verdict, Principal):
                    event, reason = _auth_failure(authenticator.tenant, verdict)
                    audit(event, "refused", peer=context.peer(), method=method, reason=reason)
                    await _abort(context, verdict)
                tenant = verdict.name
                current_tenant.set(tenant)
            if request is UNDECODABLE:
                await _abort(context, undecodable)
            policy = security.policy_for(tenant)
            if not policy.open:
                current_policy.set(policy)
            if policy.models is not None:
                denial = model_denial(policy, request.model, security.scope)
                if denial is not None:
                    audit("permission", "refused", peer=context.peer(), tenant=tenant, method=method, reason="model")
                    await _abort(context, to_grpc_status(PermissionDeniedError(denial)))
            ticket = None
            if policy.limited:
                prompt = reserved = 0
                if policy.tpm:
                    prompt = estimate_prompt_tokens(request)
                    reserved = reservation(prompt, _max_tokens(request, default_max, cap), policy.tpm)
                got = await security.limits.acquire(policy, reserved)
                if isinstance(got, Refusal):
                    await _abort(context, _refusal_status(policy, got, reserved, prompt))
                stats = current_rpc.get()
                if stats is None:  # no telemetry interceptor in front: keep the figures settling needs
                    stats = RpcStats()
                    current_rpc.set(stats)
                ticket = _Ticket(got, prompt, stats)
            if not slots.try_acquire():
                waited = time.perf_counter()
                try:
                    await slots.acquire(context.time_remaining())
                except BaseException as exc:  # refused, or cancelled while queued: the call never ran
                    if ticket is not None:
                        await security.limits.cancel(ticket.grant)
                    if isinstance(exc, ResourceExhaustedError):
                        await _abort(
                            context,
                            quota_status(exc, "gateway", "MAX_CONCURRENT_REQUESTS", f"gateway {slots.limit} calls"),
                        )
                    raise
                finally:
                    stats = current_rpc.get()
                    if stats is not None:
                        stats.wait_s += time.perf_counter() - waited  # queued for a slot: a wait, not work
            return ticket

        return admit
