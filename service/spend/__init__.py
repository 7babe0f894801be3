"""Spend: every call's cost on a durable ledger, monthly budgets, usage on demand (issue 14).

Four parts, opened and closed together by :class:`Spend`:

- :class:`~service.spend.ledger.SqlLedger`: one :class:`UsageRecord` per call, queued without
  blocking and committed in batches to SQLite or PostgreSQL (``LEDGER_URL``); grouped usage and
  month-to-date spend read back.
- :class:`~service.spend.costs.CostModel`: what an attempt cost (per token for Anthropic, a share
  of GPU time for Modal and vast.ai, 0 for the embedded model); docs/cost.md.
- :class:`~service.spend.budgets.Budgets`: provider budgets (``provider_exhausted``, memory only)
  and tenant budgets (``reserve`` before a call, ``settle`` after; atomic across gateways).

One call, as the gateway wires it::

    spend = Spend.from_settings(settings, tenant_budgets_usd=policy_budgets)
    await spend.open()                                   # startup: migrations, writer task
    if spend.budgets.provider_exhausted("modal"): ...    # planner: skip, reason budget_exhausted
    worst = spend.costs.worst_case_usd([("anthropic", model)], prompt_tokens, max_tokens, timeout_s)
    reservation = await spend.budgets.reserve(tenant, worst)   # None: RESOURCE_EXHAUSTED
    charge = spend.costs.start(provider)                  # per attempt
    cost = charge.finish(served_model, prompt_tokens=p, completion_tokens=c)
    spend.budgets.settle(reservation, cost)
    spend.ledger.record(UsageRecord(time=..., tenant=tenant, ..., cost_usd=cost))
    await spend.close()                                  # SIGTERM: idle tails booked, queue flushed
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from service.config import Settings
from service.errors import ConfigError
from service.spend.budgets import Budgets, BudgetStatus, Reservation
from service.spend.costs import Charge, CostModel
from service.spend.engine import engine_for_url
from service.spend.gpu import GpuMeter
from service.spend.ledger import Ledger, LedgerUnavailableError, SqlLedger
from service.spend.prices import PriceTable, TokenPrice
from service.spend.records import (
    Attempt,
    Dimension,
    LedgerState,
    UsageRecord,
    UsageRow,
    month_key,
    next_month_start,
)

__all__ = [
    "Attempt",
    "BudgetStatus",
    "Budgets",
    "Charge",
    "CostModel",
    "Dimension",
    "GpuMeter",
    "Ledger",
    "LedgerState",
    "LedgerUnavailableError",
    "PriceTable",
    "Reservation",
    "Spend",
    "SpendState",
    "SqlLedger",
    "TokenPrice",
    "UsageRecord",
    "UsageRow",
    "month_key",
    "next_month_start",
]

BUDGETED_PROVIDERS = ("modal", "vastai", "anthropic")


@dataclass(frozen=True, slots=True)
class SpendState:
    """Health's view: the ledger, and each provider's month-to-date spend against its budget."""

    ledger: LedgerState
    providers: tuple[BudgetStatus, ...]


class Spend:
    """The ledger, the cost model and the budgets of one gateway."""

    def __init__(self, ledger: SqlLedger, costs: CostModel, budgets: Budgets) -> None:
        self.ledger = ledger
        self.costs = costs
        self.budgets = budgets

    @classmethod
    def from_settings(cls, settings: Settings, tenant_budgets_usd: Mapping[str, float] | None = None) -> Spend:
        """Builds everything from the settings (nothing is opened yet).

        Args:
            settings: ``LEDGER_*``, ``PRICES_FILE``, GPU prices, ``<PROVIDER>_MONTHLY_BUDGET_USD``.
            tenant_budgets_usd: ``monthly_budget_usd`` of each tenant that has one.

        Raises:
            ConfigError: A bad ``LEDGER_URL``, ``PRICES_FILE`` or an unpriced ``MODAL_GPU_TYPE``.
        """
        try:
            engine = engine_for_url(settings.ledger_url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        prices = PriceTable.from_file(settings.prices_file) if settings.prices_file else PriceTable()
        ledger = SqlLedger(
            engine,
            flush_interval_s=settings.ledger_flush_interval_ms / 1000,
            queue_max=settings.ledger_queue_max,
        )
        modal_rate = settings.modal_gpu_price_per_hour
        if modal_rate is None:
            try:
                modal_rate = prices.gpu_price(settings.modal_gpu_type)
            except ValueError as exc:
                raise ConfigError(f"MODAL_GPU_TYPE: {exc}; set MODAL_GPU_PRICE_PER_HOUR") from None
        meters = {
            "modal": GpuMeter(
                "modal",
                modal_rate,
                settings.modal_scaledown_window_minutes * 60,
                ledger.record,
                model=settings.modal_model,
            )
        }
        if settings.vastai_price_per_hour > 0:
            # An always-on host bills its rental, not its use: no idle window (docs/cost.md).
            meters["vastai"] = GpuMeter(
                "vastai", settings.vastai_price_per_hour, 0.0, ledger.record, model=settings.vastai_model
            )
        costs = CostModel(prices, meters=meters)
        budgets = Budgets(
            ledger,
            provider_limits_usd={
                "modal": settings.modal_monthly_budget_usd,
                "vastai": settings.vastai_monthly_budget_usd,
                "anthropic": settings.anthropic_monthly_budget_usd,
            },
            tenant_limits_usd=tenant_budgets_usd,
            commit_cost_usd=costs.wake_cost_usd,
        )
        return cls(ledger, costs, budgets)

    async def open(self) -> None:
        """Migrates the schema and starts the writer (an unreachable database only degrades)."""
        self.ledger.add_tick(self.costs.poll)
        await self.ledger.open()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Books the GPUs' remaining idle windows, then writes everything queued (SIGTERM)."""
        self.costs.close()
        await self.ledger.close(timeout_s)

    def state(self) -> SpendState:
        """The ledger's state and every budgeted provider's spend."""
        return SpendState(self.ledger.state(), tuple(self.budgets.provider_status(name) for name in BUDGETED_PROVIDERS))
