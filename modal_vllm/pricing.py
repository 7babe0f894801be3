"""What the Modal deployment costs, as data and a few estimate helpers.

Modal bills a GPU container per second from the moment it starts until it scales down, whether
or not it is generating. So the useful unit is "GPU hours": every request that finds no warm
container pays a cold start, and every burst keeps the container up for the scale-down window
after its last request. The prices below are the original design's figures in USD per GPU hour,
rounded, not fetched from Modal: check https://modal.com/pricing before budgeting (CPU and
memory add a few percent) and pass your own (``prices=``, or ``python -m modal_vllm cost
--price L4=0.85``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

GPU_PRICE_USD_PER_HOUR: Mapping[str, float] = MappingProxyType(
    {
        "L4": 0.80,
        "A10G": 1.10,
        "A100": 3.00,
        "H100": 4.50,
    }
)
"""The original design's price per GPU hour, keyed by the GPU types ``settings.ACCEPTED_GPU_TYPES``
accepts; every helper below takes ``prices=`` to override them."""

DEFAULT_MONTHLY_BUDGET_USD = 30.0
"""The budget the docs plan for: $30/month buys 37.5 L4 hours."""


def parse_price_overrides(items: list[str]) -> dict[str, float]:
    """Parses ``GPU=USD`` pairs (``["L4=0.85"]``) into a price table over the design's figures.

    Raises:
        ValueError: A pair is malformed or its price is not a positive number.
    """
    prices = dict(GPU_PRICE_USD_PER_HOUR)
    for item in items:
        gpu, sep, raw = item.partition("=")
        try:
            price = float(raw)
        except ValueError:
            price = -1.0
        if not sep or not gpu.strip() or not price > 0 or price == float("inf"):
            raise ValueError(f"a GPU price is GPU=USD_PER_HOUR with a positive number, e.g. L4=0.85; got {item!r}")
        prices[gpu.strip().upper()] = price
    return prices


def price_usd_per_hour(gpu: str, prices: Mapping[str, float] | None = None) -> float:
    """Looks up a GPU's hourly price.

    Args:
        gpu: GPU type, case-insensitive (``L4``, ``A10G``, ``A100``, ``H100``).
        prices: Price table; the design's figures when None.

    Returns:
        USD per GPU hour.

    Raises:
        ValueError: The GPU type has no price; the message lists the priced ones.
    """
    table = GPU_PRICE_USD_PER_HOUR if prices is None else prices
    try:
        return table[gpu.upper()]
    except KeyError:
        raise ValueError(f"no price for GPU type {gpu!r}; priced: {', '.join(table)}") from None


def hours_for_budget(budget_usd: float, gpu: str) -> float:
    """GPU hours a budget buys.

    Args:
        budget_usd: Budget in USD; must not be negative.
        gpu: GPU type.

    Returns:
        Hours of one container running on that GPU ($30 on L4 is 37.5 h).

    Raises:
        ValueError: Negative budget or unknown GPU.
    """
    if budget_usd < 0:
        raise ValueError(f"budget_usd must not be negative, got {budget_usd}")
    return budget_usd / price_usd_per_hour(gpu)


def cost_usd(gpu: str, hours: float) -> float:
    """What running one container for some hours costs.

    Args:
        gpu: GPU type.
        hours: Container hours; must not be negative.

    Returns:
        Cost in USD.

    Raises:
        ValueError: Negative hours or unknown GPU.
    """
    if hours < 0:
        raise ValueError(f"hours must not be negative, got {hours}")
    return price_usd_per_hour(gpu) * hours


def billed_hours_per_burst(busy_s: float, scaledown_window_s: float, cold_start_s: float = 30.0) -> float:
    """Container hours billed for one burst of traffic that starts from zero containers.

    The container is billed while it boots, while it serves, and for the whole scale-down
    window after the last request, which is why a short window matters more than fast requests
    for sparse traffic.

    Args:
        busy_s: Seconds from the first to the last request of the burst.
        scaledown_window_s: Idle seconds before Modal stops the container.
        cold_start_s: Seconds to boot the container and load the model (cached weights).

    Returns:
        Billed container hours for the burst.
    """
    if min(busy_s, scaledown_window_s, cold_start_s) < 0:
        raise ValueError("busy_s, scaledown_window_s and cold_start_s must not be negative")
    return (cold_start_s + busy_s + scaledown_window_s) / 3600.0


def cost_for_bursts_usd(
    gpu: str,
    bursts: int,
    busy_s_per_burst: float,
    scaledown_window_s: float,
    cold_start_s: float = 30.0,
) -> float:
    """Estimated cost of a number of separate bursts of traffic, each from a cold start.

    Args:
        gpu: GPU type.
        bursts: How many times traffic arrives after the container scaled to zero.
        busy_s_per_burst: Seconds each burst keeps the container busy.
        scaledown_window_s: Idle seconds before Modal stops the container.
        cold_start_s: Seconds each cold start is billed for.

    Returns:
        Cost in USD.
    """
    if bursts < 0:
        raise ValueError(f"bursts must not be negative, got {bursts}")
    hours = bursts * billed_hours_per_burst(busy_s_per_burst, scaledown_window_s, cold_start_s)
    return cost_usd(gpu, hours)


@dataclass(frozen=True, slots=True)
class BudgetRow:
    """One GPU's line in a budget table.

    Attributes:
        gpu: GPU type.
        usd_per_hour: List price per GPU hour.
        hours: GPU hours the budget buys.
        bursts_5min_window: Cold-start bursts (30 s boot + 60 s busy + 5 min idle) the
            budget buys, to show how the scale-down window dominates sparse traffic.
    """

    gpu: str
    usd_per_hour: float
    hours: float
    bursts_5min_window: int


def budget_table(
    budget_usd: float = DEFAULT_MONTHLY_BUDGET_USD, prices: Mapping[str, float] | None = None
) -> list[BudgetRow]:
    """Rows of what a budget buys on each GPU, cheapest first.

    Args:
        budget_usd: Budget in USD.
        prices: Price table; the design's figures when None.

    Returns:
        One row per priced GPU.
    """
    if budget_usd < 0:
        raise ValueError(f"budget_usd must not be negative, got {budget_usd}")
    table = GPU_PRICE_USD_PER_HOUR if prices is None else prices
    burst_hours = billed_hours_per_burst(busy_s=60, scaledown_window_s=300)
    rows = []
    for gpu, price in sorted(table.items(), key=lambda item: item[1]):
        rows.append(
            BudgetRow(
                gpu=gpu,
                usd_per_hour=price,
                hours=budget_usd / price,
                bursts_5min_window=int(budget_usd // (burst_hours * price)),
            )
        )
    return rows


def format_budget_table(
    budget_usd: float = DEFAULT_MONTHLY_BUDGET_USD, prices: Mapping[str, float] | None = None
) -> str:
    """Renders :func:`budget_table` as a Markdown table, as the docs show it.

    Args:
        budget_usd: Budget in USD.
        prices: Price table; the design's figures when None.

    Returns:
        The table text, ending with a newline.
    """
    lines = [
        f"| GPU | USD/hour | GPU hours for ${budget_usd:g} | cold bursts (5 min window) |",
        "|---|---:|---:|---:|",
    ]
    for row in budget_table(budget_usd, prices):
        lines.append(f"| {row.gpu} | {row.usd_per_hour:.2f} | {row.hours:.1f} | {row.bursts_5min_window} |")
    return "\n".join(lines) + "\n"
