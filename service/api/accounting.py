"""What each chat RPC costs and who pays: the request id, the tenant budget, the ledger record.

Around every admitted Chat/ChatStream call (:class:`CallAccount`):

1. the request id is the caller's ``x-request-id`` metadata, or one the gateway makes; it goes
   back in the response's trailing metadata, so a caller can find its record;
2. a tenant with a ``monthly_budget_usd`` reserves the call's worst case (prompt estimate +
   max_tokens at the most expensive provider the call may reach) before any provider is asked;
   over budget is RESOURCE_EXHAUSTED with a QuotaFailure ``tenant:<name> monthly_budget_usd``;
3. when the call ends, whatever happened, the reservation is settled with what the call cost and
   one :class:`~service.spend.UsageRecord` goes to the ledger's queue (never blocking the call).

Also the GetUsage RPC and the spend part of Health. gRPC types only at this layer's edge; the
figures come from the router (``RpcStats``) and the spend package.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import secrets
import time
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from inference.v1 import inference_pb2 as pb
from opentelemetry import trace

from service.errors import FieldViolation, InvalidRequestError, PermissionDeniedError, ResourceExhaustedError
from service.guard.auth import Role
from service.guard.interceptor import current_principal
from service.guard.policy import current_policy
from service.guard.security import current_tenant
from service.guard.tokens import estimate_prompt_tokens
from service.observe import metrics
from service.observe.telemetry import RpcStats, current_rpc
from service.providers.base import ChatRequest
from service.routing.router import Router
from service.spend import Attempt, Reservation, Spend, UsageRecord

MAX_REQUEST_ID_CHARS = 128
_DIMENSIONS = {
    pb.USAGE_DIMENSION_TENANT: "tenant",
    pb.USAGE_DIMENSION_PROVIDER: "provider",
    pb.USAGE_DIMENSION_MODEL: "model",
    pb.USAGE_DIMENSION_DAY: "day",
}


# Generated ids: a random per-process prefix and a counter (unique without a syscall per call).
_ID_PREFIX = secrets.token_hex(6)
_ids = itertools.count(1)


def request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's ``x-request-id`` (printable, bounded), else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value.isprintable():
            return value[:MAX_REQUEST_ID_CHARS]
    return f"{_ID_PREFIX}-{next(_ids):x}"


class CallAccount:
    """One chat RPC's budget hold and ledger record (a context manager around the call; entering
    and leaving never wait, so it is a plain one, not async)."""

    def __init__(self, router: Router, rpc: str, request: ChatRequest, context: grpc.aio.ServicerContext[Any, Any]):
        self.router = router
        self.spend: Spend | None = router.spend
        self.rpc = rpc
        self.request = request
        self.context = context
        self.request_id = request_id(context)
        self.tenant = current_tenant.get()
        self.code = grpc.StatusCode.OK
        self.served_model = ""
        self._reservation: Reservation | None = None
        self._started = time.perf_counter()
        self._wall = datetime.datetime.now(datetime.UTC)
        self._stats: RpcStats | None = current_rpc.get()

    def __enter__(self) -> CallAccount:
        # Trailing, not initial, metadata: setting it costs nothing, while a separate send of
        # initial metadata cost ~40 us of CPU per call (bench/floor_cost.py). The telemetry
        # interceptor appends its own trailers to it.
        self.context.set_trailing_metadata((("x-request-id", self.request_id),))
        return self

    async def reserve(self, message: Any) -> None:
        """Holds the call's worst-case cost against its tenant's monthly budget, if it has one.

        Raises:
            ResourceExhaustedError: the budget cannot cover it (QuotaFailure, RetryInfo to the reset).
        """
        policy = current_policy.get()
        budget = None if policy is None else policy.monthly_budget_usd
        if self.spend is not None and budget is not None:
            self.spend.budgets.set_tenant_limit(self.tenant, budget)
            worst = self.spend.costs.worst_case_usd(
                self._candidates(policy.providers if policy else None),
                estimate_prompt_tokens(message),  # the proto request, as the token limits count it
                self.request.max_tokens,
                self.router.settings.request_timeout_s,
            )
            self._reservation = await self.spend.budgets.reserve(self.tenant, worst)
            if self._reservation is None:
                status = await self.spend.budgets.tenant_status(self.tenant)
                wait_s = max(0.0, (status.resets_at - datetime.datetime.now(datetime.UTC)).total_seconds())
                raise ResourceExhaustedError(
                    f"tenant {self.tenant!r} has spent its monthly budget ({status.description}); this call could "
                    f"cost up to ${worst:.4f}. It resets at {status.resets_at:%Y-%m-%d %H:%M} UTC; ask an operator "
                    "to raise monthly_budget_usd, or ask for fewer max_tokens",
                    wait_s,
                    reason="BUDGET_EXHAUSTED",
                    quota=(status.subject, "monthly_budget_usd", status.description),
                )

    def _candidates(self, allowed: frozenset[str] | None) -> list[tuple[str, str]]:
        entry = self.router.catalogue.lookup(self.request.model) if self.router.catalogue.from_file else None
        out = []
        for slot in self.router.slots:
            if allowed is not None and slot.name not in allowed:
                continue
            model = entry.model_for(slot.name) if entry is not None else self.request.model
            if entry is not None and model is None:
                continue
            out.append((slot.name, model or slot.provider.default_model))
        return out

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None and self.code is grpc.StatusCode.OK:
            # A GatewayError's code is set by the servicer before it re-raises; what is left is the
            # caller going away (or a bug).
            self.code = (
                grpc.StatusCode.CANCELLED if issubclass(kind, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN
            )
        if self.spend is None:
            return
        stats = self._stats or RpcStats()
        cost = stats.cost_usd
        if self._reservation is not None:
            self.spend.budgets.settle(self._reservation, cost)
        span = trace.get_current_span().get_span_context()
        outcomes = stats.attempt_outcomes
        provider = stats.provider or (outcomes[-1][0] if outcomes else "")
        metrics.record_cost(provider, self.tenant, cost)
        self.spend.ledger.record(
            UsageRecord(
                time=self._wall,
                tenant=self.tenant,
                request_id=self.request_id,
                trace_id=f"{span.trace_id:032x}" if span.is_valid else "",
                rpc=self.rpc,
                model=self.request.model or "",
                served_model=self.served_model,
                provider=provider,
                attempts=tuple(Attempt(p, o) for p, o in outcomes),
                prompt_tokens=stats.prompt_tokens,
                completion_tokens=stats.completion_tokens,
                duration_s=time.perf_counter() - self._started,
                ttft_s=stats.ttft_s,
                status_code=self.code.value[0],
                cost_usd=cost,
                tags=self.request.metadata,
            )
        )


def _when(ts: timestamp_pb2.Timestamp, field: str) -> datetime.datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    try:
        return ts.ToDatetime(tzinfo=datetime.UTC)
    except (ValueError, OverflowError):
        raise InvalidRequestError.from_violations([FieldViolation(field, "is out of range")]) from None


async def usage(spend: Spend | None, request: pb.GetUsageRequest) -> pb.GetUsageResponse:
    """GetUsage: an admin sees every tenant; a tenant key its own tenant only."""
    if spend is None:
        return pb.GetUsageResponse()
    principal = current_principal.get()
    tenant = request.tenant or None
    if principal is not None and principal.role is not Role.ADMIN:
        if tenant not in (None, principal.name):
            raise PermissionDeniedError(
                f"a tenant key may read its own usage only (tenant {principal.name!r}); use an admin key for others"
            )
        tenant = principal.name
    dims = []
    for i, d in enumerate(request.group_by):
        if d not in _DIMENSIONS:
            raise InvalidRequestError.from_violations(
                [FieldViolation(f"group_by[{i}]", "must be USAGE_DIMENSION_TENANT, _PROVIDER, _MODEL or _DAY")]
            )
        dims.append(_DIMENSIONS[d])
    start = _when(request.start_time, "start_time") if request.HasField("start_time") else None
    end = _when(request.end_time, "end_time") if request.HasField("end_time") else None
    if start is not None and end is not None and end <= start:
        raise InvalidRequestError.from_violations([FieldViolation("end_time", "must be after start_time")])
    try:
        rows = await spend.ledger.usage(start, end, dims, tenant)  # type: ignore[arg-type]
    except ValueError as exc:  # a range that is empty once the unset end defaults (this month)
        raise InvalidRequestError.from_violations([FieldViolation("end_time", str(exc))]) from None
    return pb.GetUsageResponse(
        rows=[
            pb.UsageRow(
                tenant=r.tenant,
                provider=r.provider,
                model=r.model,
                day=r.day,
                requests=r.requests,
                failed_requests=r.failed_requests,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens,
                cost_usd=r.cost_usd,
            )
            for r in rows
        ]
    )


def ledger_health(spend: Spend | None) -> pb.LedgerHealth | None:
    """Health's view of the ledger."""
    if spend is None:
        return None
    state = spend.ledger.state()
    return pb.LedgerHealth(
        state="ok" if state.ok else "degraded",
        engine=state.engine,
        queue_depth=state.queue_depth,
        dropped=state.dropped,
        last_error=state.last_error,
    )


def add_budget(message: pb.ProviderHealth, spend: Spend | None) -> None:
    """A provider's month-to-date spend and budget on its Health entry."""
    if spend is None:
        return
    status = spend.budgets.provider_status(message.name)
    message.month_spend_usd = status.spent_usd
    message.budget_exhausted = status.exhausted
    if status.limit_usd is not None:
        message.monthly_budget_usd = status.limit_usd
