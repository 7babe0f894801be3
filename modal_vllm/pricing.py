"""What the Modal deployment costs, as data and a few estimate helpers.

Modal bills a GPU container per second from the moment it starts until it scales down, whether
or not it is generating. So the useful unit is "GPU hours": every request that finds no warm
container pays a cold start, and every burst keeps the container up for the scale-down window
after its last request. Prices are list prices in USD per GPU hour, rounded; check
https://modal.com/pricing before budgeting (CPU and memory add a few percent).
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
"""List price per GPU hour, keyed by the GPU types ``settings.ACCEPTED_GPU_TYPES`` accepts."""

DEFAULT_MONTHLY_BUDGET_USD = 30.0
"""The budget the docs plan for: $30/month buys 37.5 L4 hours."""


def price_usd_per_hour(gpu: str) -> float:
    """Looks up a GPU's hourly price.

    Args:
        gpu: GPU type, case-insensitive (``L4``, ``A10G``, ``A100``, ``H100``).

    Returns:
        USD per GPU hour.

    Raises:
        ValueError: The GPU type has no price; the message lists the priced ones.
    """
    try:
        return GPU_PRICE_USD_PER_HOUR[gpu.upper()]
    except KeyError:
        raise ValueError(f"no price for GPU type {gpu!r}; priced: {', '.join(GPU_PRICE_USD_PER_HOUR)}") from None


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


def budget_table(budget_usd: float = DEFAULT_MONTHLY_BUDGET_USD) -> list[BudgetRow]:
    """Rows of what a budget buys on each GPU, cheapest first.

    Args:
        budget_usd: Budget in USD.

    Returns:
        One row per priced GPU.
    """
    rows = []
    for gpu, price in sorted(GPU_PRICE_USD_PER_HOUR.items(), key=lambda item: item[1]):
        burst_usd = cost_for_bursts_usd(gpu, 1, busy_s_per_burst=60, scaledown_window_s=300)
        rows.append(
            BudgetRow(
                gpu=gpu,
                usd_per_hour=price,
                hours=hours_for_budget(budget_usd, gpu),
                bursts_5min_window=int(budget_usd // burst_usd),
            )
        )
    return rows


def format_budget_table(budget_usd: float = DEFAULT_MONTHLY_BUDGET_USD) -> str:
    """Renders :func:`budget_table` as a Markdown table, as the docs show it.

    Args:
        budget_usd: Budget in USD.

    Returns:
        The table text, ending with a newline.
    """
    lines = [
        f"| GPU | USD/hour | GPU hours for ${budget_usd:g} | cold bursts (5 min window) |",
        "|---|---:|---:|---:|",
    ]
    for row in budget_table(budget_usd):
        lines.append(f"| {row.gpu} | {row.usd_per_hour:.2f} | {row.hours:.1f} | {row.bursts_5min_window} |")
    return "\n".join(lines) + "\n"
