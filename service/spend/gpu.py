"""What a GPU billed by the hour costs, shared out over the calls it served.

A scale-to-zero container (Modal) bills from the moment it starts, which is the first request
after a cold start (or a wake-up probe), until the scale-down window has passed after its last
response. The meter follows the calls one gateway sends it and splits that bill:

- While calls are in flight, every second costs ``price / 3600`` shared equally by the calls in
  flight: a call alone pays its whole duration, two overlapping calls pay half each for the
  overlap. A call's charge is the integral of ``rate / in_flight`` over its duration.
- While none is in flight but the container is up (the gaps between calls, and the tail of
  ``idle_window_s`` after the last response), the time is booked to the provider as an ``idle``
  record with no tenant: when the next call starts (the gap), or once the window has passed
  (the tail, by :meth:`GpuMeter.poll`), or at :meth:`GpuMeter.close` (the rest of the window,
  which the provider bills whether or not the gateway is still running).

So the calls' charges and the idle records of a month add up to the time the container was up,
times the price: what the provider bills, as far as one gateway can see (the first call after a
cold start pays the boot it waited for). Assumptions: one container (``MAX_CONTAINERS = 1`` in
the deployment) and one gateway sending to it; two gateways sharing a container each book the
idle time they see, which over-counts it (never under).

An always-on host (vast.ai) has no scale-down window: ``idle_window_s=0`` books no idle time,
so its records count busy time only, a lower bound of the rental.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from service.spend.records import UsageRecord


class MeterTicket:
    """One call's share of a GPU; :meth:`GpuMeter.finish` turns it into dollars once."""

    __slots__ = ("done", "start", "start_share")

    def __init__(self, start: float, start_share: float) -> None:
        self.start = start
        self.start_share = start_share
        self.done = False


class GpuMeter:
    """The bill of one GPU provider's container, split into per-call charges and idle records.

    Args:
        provider: Provider name, e.g. ``modal``.
        usd_per_hour: Price of the container per hour.
        idle_window_s: Idle seconds the provider bills after the last response (the scale-down
            window); 0 for hosts billed by rental, not use.
        sink: Receives the idle records (``Ledger.record``).
        model: The model the container serves, written on idle records.
        clock: Monotonic seconds (tests pass their own); wall time for records is derived.
    """

    def __init__(
        self,
        provider: str,
        usd_per_hour: float,
        idle_window_s: float,
        sink: Callable[[UsageRecord], None],
        *,
        model: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.usd_per_hour = usd_per_hour
        self.idle_window_s = idle_window_s
        self.model = model
        self._rate = usd_per_hour / 3600.0
        self._sink = sink
        self._clock = clock
        self._wall_offset = time.time() - clock()
        self._in_flight = 0
        self._share = 0.0  # integral of 1 / in_flight over the busy time so far
        self._t = clock()  # when _share was last advanced
        self._up = False
        self._idle_from = 0.0  # start of the current idle stretch (meaningful while up and idle)

    @property
    def up(self) -> bool:
        """Whether the container is billing, as far as this meter knows."""
        return self._up

    def wake_cost_usd(self) -> float:
        """What using the provider commits beyond a call's own time: one idle window."""
        return self._rate * self.idle_window_s

    def start(self, now: float | None = None) -> MeterTicket:
        """A call starts on the container (a cold one starts billing now)."""
        now = self._clock() if now is None else now
        self._settle_idle(now, until_call=True)
        self._advance(now)
        self._up = True
        self._in_flight += 1
        return MeterTicket(now, self._share)

    def finish(self, ticket: MeterTicket, now: float | None = None) -> float:
        """A call ended (any outcome); its charge in USD. A second finish of a ticket charges 0."""
        if ticket.done:
            return 0.0
        ticket.done = True
        now = self._clock() if now is None else now
        self._advance(now)
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle_from = max(now, self._t)
        return max(self._share - ticket.start_share, 0.0) * self._rate

    def wake(self, now: float | None = None) -> None:
        """The container was started without a call (a wake-up probe): it bills from now, idle."""
        now = self._clock() if now is None else now
        if not self._up:
            self._up = True
            self._t = now
            self._idle_from = now

    def poll(self, now: float | None = None) -> None:
        """Books the idle tail of a container whose window has passed (it has scaled down)."""
        now = self._clock() if now is None else now
        if self._up and self._in_flight == 0 and now >= self._idle_from + self.idle_window_s:
            self._settle_idle(now, until_call=False)

    def close(self, now: float | None = None) -> None:
        """Shutdown: books the rest of the current idle window, which the provider bills anyway."""
        now = self._clock() if now is None else now
        if self._up and self._in_flight == 0:
            self._settle_idle(max(now, self._idle_from + self.idle_window_s), until_call=False)

    def _advance(self, now: float) -> None:
        if not self._in_flight:
            self._t = now  # nothing shares idle time; the share clock restarts with the next call
        elif now > self._t:
            self._share += (now - self._t) / self._in_flight
            self._t = now

    def _settle_idle(self, now: float, *, until_call: bool) -> None:
        """Books the idle stretch ending at ``now`` (capped at the window) and, when the window
        has passed, marks the container down."""
        if not self._up or self._in_flight:
            return
        window_end = self._idle_from + self.idle_window_s
        end = min(now, window_end)
        if end > self._idle_from:
            self._book(self._idle_from, end)
        if now >= window_end:
            self._up = False  # scaled down: the next call is a cold start
        elif until_call:
            self._idle_from = now  # a call ends the gap; the next idle stretch starts after it
        else:
            self._idle_from = end

    def _book(self, start: float, end: float) -> None:
        seconds = end - start
        self._sink(
            UsageRecord(
                time=datetime.fromtimestamp(start + self._wall_offset, UTC),
                tenant="",
                request_id="",
                rpc="idle",
                served_model=self.model,
                provider=self.provider,
                duration_s=seconds,
                cost_usd=seconds * self._rate,
                kind="idle",
            )
        )
