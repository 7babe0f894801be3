"""The cost model: what one attempt on one provider cost, and the most a call may cost.

Three kinds of provider (docs/cost.md has the worked example):

- per token (``anthropic``): the model's price per million input/output tokens, cache reads and
  writes where reported (:mod:`service.spend.prices`);
- per GPU hour (``modal``, ``vastai`` when priced): the call's share of the container's time
  (:mod:`service.spend.gpu`), the idle time booked to the provider;
- free (``local``, the embedded model, and any provider without a price): 0.

Usage, per attempt::

    charge = costs.start("modal")          # when the attempt is sent
    ...
    usd = charge.finish(model, prompt_tokens=..., completion_tokens=...)   # when it ends, any outcome
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from service.spend.gpu import GpuMeter, MeterTicket
from service.spend.prices import PriceTable

TOKEN_PRICED = frozenset({"anthropic"})
"""Providers billed per token by the Anthropic table."""


class Charge:
    """One attempt's cost in the making; :meth:`finish` once when the attempt ends."""

    __slots__ = ("_done", "_meter", "_model", "_ticket", "provider")

    def __init__(self, model: CostModel, provider: str, meter: GpuMeter | None, ticket: MeterTicket | None) -> None:
        self.provider = provider
        self._model = model
        self._meter = meter
        self._ticket = ticket
        self._done = False

    def finish(
        self,
        model: str = "",
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        now: float | None = None,
    ) -> float:
        """The attempt's cost in USD (0 on a second call).

        Args:
            model: The provider's model id that answered (prices per-token providers).
            prompt_tokens: Uncached input tokens reported.
            completion_tokens: Output tokens reported.
            cache_read_tokens: Prompt-cache reads reported.
            cache_write_tokens: Prompt-cache writes reported.
            now: Monotonic time the attempt ended (tests); default now.
        """
        if self._done:
            return 0.0
        self._done = True
        if self._meter is not None and self._ticket is not None:
            return self._meter.finish(self._ticket, now)
        if self.provider in self._model.token_priced:
            price, _ = self._model.prices.token_price(model)
            return price.cost_usd(prompt_tokens, completion_tokens, cache_read_tokens, cache_write_tokens)
        return 0.0


class CostModel:
    """Prices attempts by provider kind.

    Args:
        prices: The price table (built-in, or with ``PRICES_FILE`` laid over it).
        meters: One :class:`GpuMeter` per GPU-hour provider.
        token_priced: Providers priced per token by the Anthropic table.
    """

    def __init__(
        self,
        prices: PriceTable | None = None,
        *,
        meters: Mapping[str, GpuMeter] | None = None,
        token_priced: Iterable[str] = TOKEN_PRICED,
    ) -> None:
        self.prices = prices or PriceTable()
        self.meters: dict[str, GpuMeter] = dict(meters or {})
        self.token_priced = frozenset(token_priced)

    def start(self, provider: str, now: float | None = None) -> Charge:
        """An attempt on ``provider`` starts (a GPU's meter counts it in flight from now)."""
        meter = self.meters.get(provider)
        return Charge(self, provider, meter, None if meter is None else meter.start(now))

    def max_cost_usd(
        self, provider: str, model: str, prompt_tokens: int, max_tokens: int, max_duration_s: float
    ) -> float:
        """The most one attempt may cost: the amount to reserve against a tenant's budget.

        Per token: the whole prompt as uncached input plus ``max_tokens`` of output (at the long
        tier when the prompt reaches it). Per GPU hour: ``max_duration_s`` of the GPU alone (a
        call's share never exceeds its duration). Free providers: 0.
        """
        if provider in self.meters:
            return self.meters[provider].usd_per_hour / 3600.0 * max(max_duration_s, 0.0)
        if provider in self.token_priced:
            price, _ = self.prices.token_price(model)
            return price.cost_usd(max(prompt_tokens, 0), max(max_tokens, 0))
        return 0.0

    def worst_case_usd(
        self, candidates: Iterable[tuple[str, str]], prompt_tokens: int, max_tokens: int, max_duration_s: float
    ) -> float:
        """:meth:`max_cost_usd` at the most expensive of ``(provider, model)`` the call may reach."""
        costs = [self.max_cost_usd(p, m, prompt_tokens, max_tokens, max_duration_s) for p, m in candidates]
        worst = max(costs, default=0.0)
        return worst if math.isfinite(worst) else 0.0

    def wake_cost_usd(self, provider: str) -> float:
        """What using a GPU provider commits beyond the call: one idle window (0 for others)."""
        meter = self.meters.get(provider)
        return 0.0 if meter is None else meter.wake_cost_usd()

    def poll(self) -> None:
        """Books the idle tails whose scale-down window has passed (the ledger calls it each flush)."""
        for meter in self.meters.values():
            meter.poll()

    def close(self) -> None:
        """Books every container's remaining idle window (shutdown)."""
        for meter in self.meters.values():
            meter.close()
