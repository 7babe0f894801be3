"""Monthly budgets: per provider (routing skips one at its budget) and per tenant (reserve, settle).

Provider budgets (``<PROVIDER>_MONTHLY_BUDGET_USD``) are checked on every call's plan, so
:meth:`Budgets.provider_exhausted` reads memory only: the ledger's month-to-date estimate for the
provider (every gateway's committed spend as of the last refresh, plus this one's queued records),
plus what using the provider commits beyond a call (for a scale-to-zero GPU, one scale-down
window: waking a container it cannot afford is what the budget is for).

Tenant budgets are held in the database, so several gateways sharing a ledger hold one budget:
before a call, :meth:`Budgets.reserve` adds the call's maximum cost to the tenant's reserved
spend in one atomic statement that refuses when spent + reserved + amount would pass the limit;
after it, :meth:`Budgets.settle` swaps the reservation for the actual cost in the ledger's next
batch (one UPDATE, so the budget never briefly counts neither). When the database cannot be
reached, a reservation is held in this process against the last known figures (``durable`` is
False) and its actual cost is booked when the database returns: a call never fails for the
ledger's sake, and an outage lets a tenant go over only by what other gateways spend meanwhile.

A reservation of a gateway killed mid-call stays counted until its month ends (at most its calls
in flight times their maximum cost): conservative, never an overspend.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from service.spend.engine import BUDGET_EPSILON_USD, Counter, CounterDelta
from service.spend.ledger import SqlLedger
from service.spend.records import clean_text, month_key, next_month_start


@dataclass(frozen=True, slots=True)
class Reservation:
    """A tenant's hold on its budget for one call; pass it to :meth:`Budgets.settle` once.

    Attributes:
        tenant: The tenant.
        amount_usd: The amount held (the call's maximum cost).
        month: The month (``YYYY-MM``) it counts in.
        limited: The tenant has a budget; False means nothing was held (the cost is still booked).
        durable: Held in the database (all gateways see it); False when held in this process only.
        id: Unique id; settling twice settles once.
    """

    tenant: str
    amount_usd: float
    month: str
    limited: bool
    durable: bool
    id: str


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A budget as Health, GetProviderStatus and a QuotaFailure show it.

    Attributes:
        scope: ``provider`` or ``tenant``.
        name: The provider or tenant.
        limit_usd: The monthly budget; None when there is none.
        spent_usd: Month-to-date spend.
        reserved_usd: Held for calls in flight (tenants).
        resets_at: 00:00 UTC on the first day of next month.
        exhausted: No further call may be charged to it.
    """

    scope: Literal["provider", "tenant"]
    name: str
    limit_usd: float | None
    spent_usd: float
    reserved_usd: float
    resets_at: datetime
    exhausted: bool

    @property
    def subject(self) -> str:
        """The QuotaFailure subject: ``tenant:<name>`` or ``provider:<name>``."""
        return f"{self.scope}:{self.name}"

    @property
    def description(self) -> str:
        """A sentence for the QuotaFailure: which budget, how much is used, when it resets."""
        limit = "no limit" if self.limit_usd is None else f"${self.limit_usd:.2f}"
        return (
            f"monthly_budget_usd of {self.subject}: ${self.spent_usd:.4f} spent and ${self.reserved_usd:.4f} "
            f"reserved of {limit}; resets at {self.resets_at.isoformat().replace('+00:00', 'Z')}"
        )


def _usd(value: float) -> float:
    return value if isinstance(value, float | int) and math.isfinite(value) and value > 0 else 0.0


class Budgets:
    """Provider and tenant budgets over a ledger.

    Args:
        ledger: The ledger (its engine holds tenant counters; its writer applies settlements).
        provider_limits_usd: Monthly budget per provider; absent or 0 means no limit.
        tenant_limits_usd: Monthly budget per tenant; absent means no limit, 0 means nothing.
        commit_cost_usd: What using a provider commits beyond a call (``CostModel.wake_cost_usd``).
        clock: Wall clock (UTC), for the month.
    """

    def __init__(
        self,
        ledger: SqlLedger,
        *,
        provider_limits_usd: Mapping[str, float] | None = None,
        tenant_limits_usd: Mapping[str, float] | None = None,
        commit_cost_usd: Callable[[str], float] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._ledger = ledger
        self._provider_limits = {k: v for k, v in (provider_limits_usd or {}).items() if v > 0}
        self._tenant_limits = dict(tenant_limits_usd or {})
        self._commit_cost = commit_cost_usd or (lambda _provider: 0.0)
        self._clock = clock
        self._open: dict[str, Reservation] = {}
        self._known: dict[tuple[str, str], Counter] = {}  # (tenant, month) -> last figures seen
        self._local: dict[tuple[str, str], float] = {}  # (tenant, month) -> held in this process only

    def set_tenant_limits(self, limits_usd: Mapping[str, float]) -> None:
        """Replaces the tenant budgets (a policy reload); open reservations are unaffected."""
        self._tenant_limits = dict(limits_usd)

    def set_tenant_limit(self, tenant: str, limit_usd: float) -> None:
        """One tenant's budget, as its current policy says (cheap when unchanged)."""
        tenant = clean_text(tenant)
        if self._tenant_limits.get(tenant) != limit_usd:
            self._tenant_limits = {**self._tenant_limits, tenant: limit_usd}

    # -- providers ---------------------------------------------------------------------------

    def provider_exhausted(self, name: str) -> bool:
        """Whether routing must skip ``name`` (reason ``budget_exhausted``). Memory only."""
        limit = self._provider_limits.get(name)
        if limit is None:
            return False
        spent = self._ledger.provider_spend_estimate(name)
        return spent + self._commit_cost(name) >= limit - BUDGET_EPSILON_USD

    def provider_status(self, name: str) -> BudgetStatus:
        """A provider's budget for Health and GetProviderStatus."""
        now = self._clock()
        return BudgetStatus(
            scope="provider",
            name=name,
            limit_usd=self._provider_limits.get(name),
            spent_usd=self._ledger.provider_spend_estimate(name),
            reserved_usd=0.0,
            resets_at=next_month_start(now),
            exhausted=self.provider_exhausted(name),
        )

    # -- tenants -----------------------------------------------------------------------------

    async def reserve(self, tenant: str, max_cost_usd: float) -> Reservation | None:
        """Holds a call's maximum cost against the tenant's budget; None when it does not fit.

        One atomic statement in the database, so gateways sharing the ledger never pass the
        budget together. Never raises: with the database unreachable the hold is checked against
        the last known figures and kept in this process.

        Args:
            tenant: The caller's tenant.
            max_cost_usd: The most the call may cost (``CostModel.worst_case_usd``).

        Returns:
            The reservation to settle after the call, or None: the budget is exhausted
            (:meth:`tenant_status` says by how much and when it resets).
        """
        tenant = clean_text(tenant)
        amount = _usd(max_cost_usd)
        month = month_key(self._clock())
        limit = self._tenant_limits.get(tenant)
        if limit is None:
            return self._opened(Reservation(tenant, amount, month, limited=False, durable=False, id=_id()))
        key = (tenant, month)
        try:
            counter = await self._ledger.engine.reserve(tenant, month, amount, limit)
        except Exception:
            known = self._known.get(key, Counter(0.0, 0.0))
            held = self._local.get(key, 0.0)
            if known.spent_usd + known.reserved_usd + held + amount > limit + BUDGET_EPSILON_USD:
                return None
            self._local[key] = held + amount
            return self._opened(Reservation(tenant, amount, month, limited=True, durable=False, id=_id()))
        if counter is None:
            return None
        self._known[key] = counter
        return self._opened(Reservation(tenant, amount, month, limited=True, durable=True, id=_id()))

    def _opened(self, reservation: Reservation) -> Reservation:
        self._open[reservation.id] = reservation
        return reservation

    def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replaces a reservation by the call's actual cost (0 for a call that never ran).

        Pass the ``cost_usd`` of the call's ledger record. Applied in the ledger's next batch;
        never blocks, never raises; a second settle of the same reservation does nothing.
        """
        if self._open.pop(reservation.id, None) is None:
            return
        actual = _usd(actual_usd)
        key = (reservation.tenant, reservation.month)
        release = 0.0
        if reservation.limited and reservation.durable:
            release = reservation.amount_usd
        elif reservation.limited:
            self._local[key] = max(self._local.get(key, 0.0) - reservation.amount_usd, 0.0)
        known = self._known.get(key)
        if known is not None:
            self._known[key] = Counter(known.spent_usd + actual, max(known.reserved_usd - release, 0.0))
        self._ledger.add_delta(
            CounterDelta("tenant", reservation.tenant, reservation.month, spent_usd=actual, reserved_usd=-release)
        )

    async def tenant_status(self, tenant: str) -> BudgetStatus:
        """A tenant's budget this month (from the database; the last known figures when it is
        unreachable)."""
        now = self._clock()
        month = month_key(now)
        tenant = clean_text(tenant)
        limit = self._tenant_limits.get(tenant)
        try:
            counter = (await self._ledger.engine.counters("tenant", month)).get(tenant, Counter(0.0, 0.0))
        except Exception:
            counter = self._known.get((tenant, month), Counter(0.0, 0.0))
        reserved = counter.reserved_usd + self._local.get((tenant, month), 0.0)
        exhausted = limit is not None and counter.spent_usd + reserved >= limit - BUDGET_EPSILON_USD
        return BudgetStatus("tenant", tenant, limit, counter.spent_usd, reserved, next_month_start(now), exhausted)


def _id() -> str:
    return uuid.uuid4().hex
