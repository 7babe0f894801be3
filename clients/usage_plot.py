"""Daily cost per provider as a stacked bar chart (``python -m clients usage --plot FILE``).

matplotlib is optional (a dev dependency of this project): this module imports it when first
used, and says so in one line when it is missing. It draws on a bare ``Figure`` (no pyplot), so
no GUI backend or global state is involved.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from clients.errors import ClientConfigError
from clients.usage import describe

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING = "--plot needs matplotlib, which is not installed here (pip install matplotlib)"


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ClientConfigError(MISSING) from None
    return Figure


def check_target(path: Path) -> None:
    """Checks before any call that the chart can be drawn and written to ``path``.

    Raises:
        ClientConfigError: No matplotlib, a format it cannot write, or no such directory.
    """
    formats = _figure_class()().canvas.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ClientConfigError(f"--plot {str(path)!r}: end the name with .png, .svg, .pdf or another image format")
    if not path.parent.is_dir():
        raise ClientConfigError(f"--plot {str(path)!r}: no such directory {str(path.parent)!r}")


def draw(costs: dict[str, dict[date, float]], start: datetime, end: datetime, *, tenant: str | None = None) -> Figure:
    """The chart: one bar per day of ``[start, end)``, stacked by provider, biggest at the bottom.

    Args:
        costs: USD per day per provider (:func:`clients.usage.daily_cost`).
        start: The range's start (its first day is the first bar).
        end: The range's end, exclusive.
        tenant: The tenant the figures are limited to, for the subtitle.
    """
    import matplotlib
    from matplotlib import ticker

    days = _days(start, end)
    totals = {p: sum(per_day.values()) for p, per_day in costs.items()}
    providers = sorted((p for p in costs if totals[p] > 0), key=lambda p: (-totals[p], p))
    daily = [sum(costs[p].get(d, 0.0) for p in providers) for d in days]
    places = _places(max(daily, default=0.0))

    fig = _figure_class()(figsize=(11, 5.5), layout="constrained")
    ax = fig.add_subplot()
    # One slot per day, labelled by hand: a date axis would centre a day's bar on its midnight
    # and tick hours when the range is short.
    x = list(range(len(days)))
    bottom = [0.0] * len(days)
    cmap = matplotlib.colormaps["tab10" if len(providers) <= 10 else "tab20"]
    for i, provider in enumerate(providers):
        heights = [costs[provider].get(d, 0.0) for d in days]
        label = f"{provider or '(no provider)'}  {_money(totals[provider], places)}"
        ax.bar(x, heights, width=0.8, bottom=bottom, label=label, color=cmap(i % cmap.N), zorder=2)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]

    fig.suptitle("Daily cost per provider", fontsize=14, fontweight="bold")
    scope = f"tenant {tenant}" if tenant else "every tenant the key may see"
    ax.set_title(
        f"{describe(start, end)} (UTC) · total {_money(sum(daily), places)} · {scope}", fontsize=10, color="dimgray"
    )
    ax.set_ylabel("Cost per day (USD)")
    ax.set_xlabel("Day (UTC)")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"${v:,.{places}f}"))
    ax.set_ylim(0, max(daily, default=0.0) * 1.08 or 1.0)  # headroom over the tallest bar
    ax.grid(axis="y", color="0.9", zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    step = math.ceil(len(days) / 12)  # at most a dozen labels, whatever the range
    ax.set_xticks(x[::step], [f"{d:%b %d}" for d in days[::step]])
    ax.set_xlim(-0.6, len(days) - 0.4)
    if providers:
        ax.legend(title="provider (total)", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.text(0.5, 0.5, "no cost recorded in this range", transform=ax.transAxes, ha="center", color="dimgray")
    return fig


def save(fig: Figure, path: Path) -> None:
    """Writes the chart; the format follows the file name.

    Raises:
        ClientConfigError: The file cannot be written.
    """
    try:
        fig.savefig(path, dpi=150)
    except OSError as exc:
        raise ClientConfigError(f"cannot write --plot {str(path)!r}: {exc.strerror or exc}") from None


def _money(value: float, places: int) -> str:
    """Dollars to ``places``, or to two significant digits below a cent (never ``$0.00`` for a cost)."""
    if 0 < value < 0.01:
        places = max(places, 1 - math.floor(math.log10(value)))
    return f"${value:,.{places}f}"


def _days(start: datetime, end: datetime) -> list[date]:
    first, last = start.date(), (end - timedelta(microseconds=1)).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _places(top: float) -> int:
    """Decimal places that keep the axis readable: cents from a dollar up, more below."""
    if top >= 1 or top <= 0:
        return 2
    return min(6, 2 - math.floor(math.log10(top)))
